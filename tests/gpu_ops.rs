//! The transformer kernels (embedding, RMSNorm, RoPE, attention, elementwise, logit statistics,
//! row-ranged GEMM) against the f64 references in `pumice::cpu::ops`, on awkward shapes and on
//! chunked operands.

mod common;

use common::{gpu, gpu_limited, gpu_loop_limited, random};
use proptest::prelude::*;
use pumice::cpu;
use pumice::gpu::ops::{self, AttentionShape, KvLayout, RopeTable};
use pumice::gpu::{gemm_rows, Batch, GemmOp, Gpu, GpuMatrix};
use pumice::DType;

fn max_abs_diff(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0.0, |m, (&g, &w)| m.max((g as f64 - w).abs()))
}

fn mat(g: &Gpu, rows: usize, cols: usize, v: &[f32]) -> GpuMatrix {
    GpuMatrix::from_f32(g, rows, cols, DType::F32, v).unwrap()
}

#[test]
fn embedding_gather_across_table_chunks() {
    for g in [gpu(), gpu_limited(512)] {
        let (vocab, h) = (37, 13);
        let table = random(vocab * h, 1, 0.0);
        let t = GpuMatrix::from_f32(&g, vocab, h, DType::BF16, &table).unwrap();
        let ids: Vec<u32> = vec![0, 36, 5, 5, 17, 1, 30];
        let idb = ops::upload_u32(&g, &ids).unwrap();
        let out = GpuMatrix::uninit(&g, ids.len(), h).unwrap();
        let mut b = Batch::new(&g);
        ops::embed(&mut b, &idb, &t, &out).unwrap();
        b.submit().unwrap();
        let got = out.to_f32(&g).unwrap();
        let tv = t.to_f32(&g).unwrap(); // bf16-rounded table
        for (r, &id) in ids.iter().enumerate() {
            assert_eq!(
                &got[r * h..(r + 1) * h],
                &tv[id as usize * h..(id as usize + 1) * h]
            );
        }
    }
}

#[test]
fn rms_norm_matches_reference() {
    for (g, rows, h) in [
        (gpu(), 1, 1),
        (gpu(), 7, 192),
        (gpu(), 3, 1001),
        (gpu_limited(1024), 50, 24),
    ] {
        let x = random(rows * h, 2, 0.3);
        let w = random(h, 3, 1.0);
        let xm = mat(&g, rows, h, &x);
        let wm = GpuMatrix::from_f32(&g, 1, h, DType::BF16, &w).unwrap();
        let y = GpuMatrix::uninit(&g, rows, h).unwrap();
        let mut b = Batch::new(&g);
        ops::rms_norm(&mut b, &xm, &wm, 1e-5, &y).unwrap();
        b.submit().unwrap();
        let want = cpu::ops::rms_norm(&x, &wm.to_f32(&g).unwrap(), h, 1e-5);
        let e = max_abs_diff(&y.to_f32(&g).unwrap(), &want);
        assert!(e < 2e-5, "rows {rows} h {h}: {e:.3e}");
    }
}

#[test]
fn rope_matches_reference() {
    for g in [gpu(), gpu_limited(1024)] {
        let (rows, heads, half) = (11, 3, 4);
        let d = 2 * half;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let table = RopeTable::new(&g, &inv, 48).unwrap();
        let x = random(rows * heads * d, 4, 0.0);
        let positions: Vec<u32> = (0..rows as u32).map(|r| (r * 5) % 48).collect();
        let pb = ops::upload_u32(&g, &positions).unwrap();
        let xm = mat(&g, rows, heads * d, &x);
        let mut b = Batch::new(&g);
        // Rows 2.. only: rows 0 and 1 must stay untouched.
        ops::rope(&mut b, &xm, 2..rows, heads, &pb, &table).unwrap();
        b.submit().unwrap();
        let got = xm.to_f32(&g).unwrap();
        let mut want = cpu::ops::rope(&x, heads, &inv, &positions);
        for (i, w) in want.iter_mut().enumerate().take(2 * heads * d) {
            *w = x[i] as f64;
        }
        let e = max_abs_diff(&got, &want);
        assert!(e < 2e-6, "{e:.3e}");
    }
}

#[allow(clippy::too_many_arguments)]
fn check_attention(
    g: &Gpu,
    nseq: usize,
    t: usize,
    heads: usize,
    kv: usize,
    d: usize,
    q_pos0: usize,
    window: usize,
    seed: u64,
) {
    let s = q_pos0 + t;
    let q = random(nseq * t * heads * d, seed, 0.0);
    let k = random(nseq * s * kv * d, seed + 1, 0.0);
    let v = random(nseq * s * kv * d, seed + 2, 0.0);
    let up = |rows: usize, cols: usize, group: usize, vals: &[f32]| {
        GpuMatrix::from_f32_grouped(g, rows, cols, group, vals).unwrap()
    };
    let qm = up(nseq * t, heads * d, t, &q);
    let km = up(nseq * s, kv * d, s, &k);
    let vm = up(nseq * s, kv * d, s, &v);
    let out = GpuMatrix::uninit_grouped(g, nseq * t, heads * d, t).unwrap();
    let mut b = Batch::new(g);
    let sh = AttentionShape {
        t,
        s,
        heads,
        kv_heads: kv,
        head_dim: d,
        q_pos0,
        window,
        kv_layout: KvLayout::Contiguous,
    };
    ops::attention(&mut b, &qm, &km, &vm, &out, sh).unwrap();
    b.submit().unwrap();
    let want = cpu::ops::attention(&q, &k, &v, nseq, t, s, heads, kv, d, q_pos0, window);
    let e = max_abs_diff(&out.to_f32(g).unwrap(), &want);
    assert!(e < 1e-5, "{sh:?} nseq {nseq}: {e:.3e}");
}

#[test]
fn attention_matches_reference() {
    let g = gpu();
    check_attention(&g, 1, 1, 1, 1, 2, 0, 0, 1);
    check_attention(&g, 2, 13, 6, 2, 32, 0, 0, 2);
    check_attention(&g, 3, 9, 8, 4, 8, 0, 0, 3);
    // Decode-style: 1 and 3 new queries after a cache of 20 positions.
    check_attention(&g, 1, 1, 4, 2, 16, 20, 0, 4);
    check_attention(&g, 1, 3, 4, 4, 16, 20, 0, 5);
    // Sliding window.
    check_attention(&g, 2, 17, 2, 1, 8, 0, 5, 6);
    // Sequences spread over several chunks.
    check_attention(&gpu_limited(2048), 5, 7, 2, 1, 8, 0, 0, 7);
    // Prefill long enough to share loads across a subgroup on CPU adapters (blocks padded
    // to whole subgroups): exactly one subgroup of blocks, head dims below the subgroup
    // size and not multiples of 4, a window, a chunked batch.
    check_attention(&g, 3, 32, 4, 2, 64, 0, 0, 8);
    check_attention(&g, 2, 45, 6, 2, 12, 0, 7, 9);
    check_attention(&g, 1, 64, 2, 1, 6, 0, 0, 10);
    check_attention(&gpu_limited(16 << 10), 6, 37, 2, 1, 8, 3, 0, 18);
    let blocks = ops::attention_blocks_per_sequence(32);
    if g.caps().is_cpu && g.caps().fixed_subgroup().is_some() {
        assert!(ops::attention_lanes(&g, blocks) > 0, "{}", g.describe());
    }
}

/// Mesa's CPU drivers (lavapipe, llvmpipe-GL) silently end an invocation's loops after 65,535
/// iterations in all; the device probe must find exactly that there, and an override can only
/// lower it.
#[test]
fn loop_limit_probe() {
    let g = gpu();
    if g.report().name.contains("llvmpipe") {
        assert_eq!(g.caps().loop_limit, Some(65_535), "{}", g.describe());
    }
    let l = gpu_loop_limited(1000);
    assert_eq!(l.caps().loop_limit, Some(1000));
    assert!(l.caps().loop_budget() < 1000);
}

/// Attention over more keys than one invocation may loop over (the cause of wrong perplexity
/// past ~460 positions at head_dim 64 on lavapipe): head dims 64 and 128 at 2048 and 700
/// positions on the real device, and forced splits into many dispatches (with a sliding
/// window, a decode-style offset, an odd head dim and chunked sequences) on small budgets.
#[test]
fn attention_longer_than_the_loop_limit() {
    let g = gpu();
    check_attention(&g, 1, 2048, 2, 1, 64, 0, 0, 11);
    check_attention(&g, 1, 700, 2, 2, 128, 0, 0, 12);
    for budget in [200, 1500] {
        let s = gpu_loop_limited(budget);
        check_attention(&s, 2, 97, 3, 1, 64, 0, 0, 13);
        check_attention(&s, 1, 61, 2, 1, 6, 0, 0, 14);
        check_attention(&s, 2, 83, 4, 2, 16, 0, 29, 15);
        check_attention(&s, 1, 5, 4, 2, 32, 150, 0, 16);
    }
    let mut opts = pumice::gpu::GpuOptions::from_env().unwrap();
    opts.max_loop_iterations = Some(300);
    opts.max_binding_bytes = Some(8 << 10);
    check_attention(&common::gpu_with(&opts), 5, 40, 2, 1, 8, 0, 0, 17);
}

/// Top-k over a vocabulary longer than the loop limit (Qwen2's 151,936 on lavapipe), and over
/// many small forced splits.
#[test]
fn top_k_longer_than_the_loop_limit() {
    for (g, rows, v, k) in [
        (gpu(), 3, 70_001, 10),
        (gpu_loop_limited(150), 5, 1009, 10),
        (gpu_loop_limited(150), 4, 333, 64),
    ] {
        let z: Vec<f32> = random(rows * v, v as u64, 0.0)
            .into_iter()
            .map(|x| (x * 64.0).round())
            .collect();
        let zm = mat(&g, rows, v, &z);
        let out = g.storage((rows * k * 4) as u64, true).unwrap();
        let mut b = Batch::new(&g);
        ops::top_k(&mut b, &zm, k, &out, 0).unwrap();
        b.submit().unwrap();
        let got: Vec<u32> =
            bytemuck::cast_slice(&g.read_bytes(&out, 0, (rows * k * 4) as u64).unwrap()).to_vec();
        let want = cpu::ops::top_k(&z, v, k);
        for r in 0..rows {
            let gr: Vec<usize> = got[r * k..(r + 1) * k]
                .iter()
                .map(|&i| i as usize)
                .collect();
            assert_eq!(gr, want[r], "row {r} of {rows}x{v}, k {k}");
        }
    }
}

/// An interleaved KV cache (key j of sequence b at row j·nseq + b), one query per sequence.
#[test]
fn attention_interleaved_cache() {
    let g = gpu();
    let (nseq, heads, kv, d, pos) = (5, 4, 2, 8, 11);
    let s = pos + 1;
    let q = random(nseq * heads * d, 31, 0.0);
    let k = random(nseq * s * kv * d, 32, 0.0);
    let v = random(nseq * s * kv * d, 33, 0.0);
    // Interleave the contiguous reference layout.
    let row = kv * d;
    let inter = |x: &[f32]| {
        let mut out = vec![0.0f32; x.len()];
        for b in 0..nseq {
            for j in 0..s {
                out[(j * nseq + b) * row..][..row].copy_from_slice(&x[(b * s + j) * row..][..row]);
            }
        }
        out
    };
    let qm = GpuMatrix::from_f32(&g, nseq, heads * d, DType::F32, &q).unwrap();
    let km = GpuMatrix::from_f32(&g, nseq * s, row, DType::F32, &inter(&k)).unwrap();
    let vm = GpuMatrix::from_f32(&g, nseq * s, row, DType::F32, &inter(&v)).unwrap();
    let out = GpuMatrix::uninit(&g, nseq, heads * d).unwrap();
    let mut b = Batch::new(&g);
    let sh = AttentionShape {
        t: 1,
        s,
        heads,
        kv_heads: kv,
        head_dim: d,
        q_pos0: pos,
        window: 0,
        kv_layout: KvLayout::Interleaved,
    };
    ops::attention(&mut b, &qm, &km, &vm, &out, sh).unwrap();
    b.submit().unwrap();
    let want = cpu::ops::attention(&q, &k, &v, nseq, 1, s, heads, kv, d, pos, 0);
    assert!(max_abs_diff(&out.to_f32(&g).unwrap(), &want) < 1e-5);
}

#[test]
fn attention_long_context_is_stable() {
    // Large logits (scaled inputs) over 600 keys: the online softmax must not overflow.
    let g = gpu();
    let (t, h, d) = (600, 1, 16);
    let q: Vec<f32> = random(t * h * d, 9, 0.0).iter().map(|v| v * 30.0).collect();
    let k: Vec<f32> = random(t * h * d, 10, 0.0)
        .iter()
        .map(|v| v * 30.0)
        .collect();
    let v = random(t * h * d, 11, 0.0);
    let qm = GpuMatrix::from_f32_grouped(&g, t, h * d, t, &q).unwrap();
    let km = GpuMatrix::from_f32_grouped(&g, t, h * d, t, &k).unwrap();
    let vm = GpuMatrix::from_f32_grouped(&g, t, h * d, t, &v).unwrap();
    let out = GpuMatrix::uninit_grouped(&g, t, h * d, t).unwrap();
    let mut b = Batch::new(&g);
    ops::attention(
        &mut b,
        &qm,
        &km,
        &vm,
        &out,
        AttentionShape {
            t,
            s: t,
            heads: h,
            kv_heads: h,
            head_dim: d,
            q_pos0: 0,
            window: 0,
            kv_layout: KvLayout::Contiguous,
        },
    )
    .unwrap();
    b.submit().unwrap();
    let got = out.to_f32(&g).unwrap();
    assert!(got.iter().all(|v| v.is_finite()));
    let want = cpu::ops::attention(&q, &k, &v, 1, t, t, h, h, d, 0, 0);
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

#[test]
fn elementwise_ops_match_reference() {
    for g in [gpu(), gpu_limited(512)] {
        let (rows, cols) = (19, 23);
        let a = random(rows * cols, 12, 0.0);
        let c = random(rows * cols, 13, 0.0);
        let bias = random(cols, 14, 0.0);
        // add
        let y = mat(&g, rows, cols, &a);
        let x = mat(&g, rows, cols, &c);
        let mut b = Batch::new(&g);
        ops::add(&mut b, &y, &x).unwrap();
        b.submit().unwrap();
        let want: Vec<f64> = a
            .iter()
            .zip(&c)
            .map(|(p, q)| *p as f64 + *q as f64)
            .collect();
        assert!(max_abs_diff(&y.to_f32(&g).unwrap(), &want) < 1e-6);
        // swiglu
        let y = mat(&g, rows, cols, &a);
        let mut b = Batch::new(&g);
        ops::swiglu(&mut b, &y, &x).unwrap();
        b.submit().unwrap();
        assert!(max_abs_diff(&y.to_f32(&g).unwrap(), &cpu::ops::swiglu(&a, &c)) < 1e-6);
        // bias on rows 3..17 only
        let y = mat(&g, rows, cols, &a);
        let bm = GpuMatrix::from_f32(&g, 1, cols, DType::F32, &bias).unwrap();
        let mut b = Batch::new(&g);
        ops::add_bias(&mut b, &y, 3..17, &bm).unwrap();
        b.submit().unwrap();
        let want: Vec<f64> = a
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                v as f64
                    + if (3..17).contains(&(i / cols)) {
                        bias[i % cols] as f64
                    } else {
                        0.0
                    }
            })
            .collect();
        assert!(max_abs_diff(&y.to_f32(&g).unwrap(), &want) < 1e-6);
    }
}

/// Edge-LLM's vote: log max_e softmax(z_e), accumulated exit by exit, equals the f64
/// reference; read back through logit_stats it is the renormalized vote's NLL. Awkward
/// shapes: one row and one token, primes, rows over several bindings (chunked), logits far
/// apart in scale so different exits win different tokens.
#[test]
fn vote_matches_reference() {
    for (g, rows, v, exits) in [
        (gpu(), 1, 1, 1),
        (gpu(), 1, 7, 3),
        (gpu(), 5, 4096, 2),
        (gpu(), 3, 1009, 4),
        (gpu_limited(4096), 9, 301, 3),
    ] {
        let zs: Vec<Vec<f32>> = (0..exits)
            .map(|e| {
                random(rows * v, 40 + e as u64, 0.0)
                    .iter()
                    .map(|x| x * (2.0 + 4.0 * e as f32))
                    .collect()
            })
            .collect();
        let out = GpuMatrix::uninit(&g, rows, v).unwrap();
        let mats: Vec<GpuMatrix> = zs.iter().map(|z| mat(&g, rows, v, z)).collect();
        if g.caps().max_binding < (rows * v * 4) as u64 {
            assert!(out.chunks().len() > 1, "not chunked");
        }
        let mut b = Batch::new(&g);
        for (e, m) in mats.iter().enumerate() {
            ops::vote(&mut b, m, &out, e == 0).unwrap();
        }
        b.submit().unwrap();
        let refs: Vec<&[f32]> = zs.iter().map(|z| &z[..]).collect();
        let want = cpu::ops::vote(&refs, v);
        assert!(
            max_abs_diff(&out.to_f32(&g).unwrap(), &want) < 2e-5,
            "rows {rows} v {v} exits {exits}"
        );
        // Read as logits, the vote is renormalized: NLL = log Σ_c max_e p_e − log max_e p_e[t].
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 31) % v as u32).collect();
        let tb = ops::upload_u32(&g, &targets).unwrap();
        let st = g.storage((rows * 16) as u64, true).unwrap();
        let mut b = Batch::new(&g);
        ops::logit_stats(&mut b, &out, None, &tb, &st, 0).unwrap();
        b.submit().unwrap();
        let got: Vec<f32> =
            bytemuck::cast_slice(&g.read_bytes(&st, 0, (rows * 16) as u64).unwrap()).to_vec();
        for r in 0..rows {
            let row = &want[r * v..(r + 1) * v];
            let total: f64 = row.iter().map(|x| x.exp()).sum();
            let nll = total.ln() - row[targets[r] as usize];
            assert!(
                (got[4 * r] as f64 - nll).abs() < 3e-5 * nll.abs().max(1.0),
                "row {r}: {} vs {nll}",
                got[4 * r]
            );
        }
    }
    // Shapes or dtypes that differ are refused.
    let g = gpu();
    let a = GpuMatrix::uninit(&g, 2, 5).unwrap();
    let b2 = GpuMatrix::uninit(&g, 2, 6).unwrap();
    let mut b = Batch::new(&g);
    assert!(ops::vote(&mut b, &a, &b2, true).is_err());
}

#[test]
fn logit_stats_match_reference() {
    for (g, rows, v) in [
        (gpu(), 1, 1),
        (gpu(), 5, 4096),
        (gpu(), 3, 1000),
        (gpu_limited(4096), 9, 301),
    ] {
        let z: Vec<f32> = random(rows * v, 15, 0.0).iter().map(|x| x * 8.0).collect();
        let zr: Vec<f32> = z
            .iter()
            .zip(random(rows * v, 16, 0.0))
            .map(|(a, b)| a + 0.5 * b)
            .collect();
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 7919) % v as u32).collect();
        let tb = ops::upload_u32(&g, &targets).unwrap();
        let zm = mat(&g, rows, v, &z);
        let zrm = mat(&g, rows, v, &zr);
        for with_ref in [false, true] {
            let out = g.storage((rows * 16) as u64, true).unwrap();
            let mut b = Batch::new(&g);
            ops::logit_stats(&mut b, &zm, with_ref.then_some(&zrm), &tb, &out, 0).unwrap();
            b.submit().unwrap();
            let got: Vec<f32> =
                bytemuck::cast_slice(&g.read_bytes(&out, 0, (rows * 16) as u64).unwrap()).to_vec();
            let want = cpu::ops::logit_stats(&z, with_ref.then_some(&zr[..]), &targets, v);
            for r in 0..rows {
                let (nll, kl, am, amr) = want[r];
                assert!(
                    (got[4 * r] as f64 - nll).abs() < 2e-5 * nll.abs().max(1.0),
                    "row {r}: nll {} vs {nll}",
                    got[4 * r]
                );
                assert!(
                    (got[4 * r + 1] as f64 - kl).abs() < 2e-5,
                    "row {r}: kl {} vs {kl}",
                    got[4 * r + 1]
                );
                assert_eq!(got[4 * r + 2] as usize, am);
                assert_eq!(got[4 * r + 3] as usize, amr);
            }
        }
        // KL of identical logits is zero.
        let out = g.storage((rows * 16) as u64, true).unwrap();
        let mut b = Batch::new(&g);
        ops::logit_stats(&mut b, &zm, Some(&zm), &tb, &out, 0).unwrap();
        b.submit().unwrap();
        let got: Vec<f32> =
            bytemuck::cast_slice(&g.read_bytes(&out, 0, (rows * 16) as u64).unwrap()).to_vec();
        for r in 0..rows {
            assert!(got[4 * r + 1].abs() < 1e-6, "self-KL {}", got[4 * r + 1]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// Row-ranged GEMM: A[a0..a0+m] · op(B) written at row c0 of C, others untouched.
    #[test]
    fn gemm_rows_ranges(arows in 1usize..40, k in 1usize..30, n in 1usize..30, a0f in 0.0f64..1.0, mf in 0.0f64..1.0, crows_extra in 0usize..20, c0f in 0.0f64..1.0, nt: bool, limited: bool) {
        let g = if limited { gpu_limited(512) } else { gpu() };
        let a0 = ((arows - 1) as f64 * a0f) as usize;
        let m = 1 + ((arows - a0 - 1) as f64 * mf) as usize;
        let crows = m + crows_extra;
        let c0 = ((crows - m) as f64 * c0f) as usize;
        let a = random(arows * k, 20, 0.0);
        let bv = random(k * n, 21, 0.0);
        let (br, bc) = if nt { (n, k) } else { (k, n) };
        let am = mat(&g, arows, k, &a);
        let bm = mat(&g, br, bc, &bv);
        let fill = random(crows * n, 22, 0.0);
        let cm = mat(&g, crows, n, &fill);
        let mut b = Batch::new(&g);
        gemm_rows(&mut b, &am, a0..a0 + m, &bm, if nt { GemmOp::NT } else { GemmOp::NN }, &cm, c0, false).unwrap();
        b.submit().unwrap();
        let got = cm.to_f32(&g).unwrap();
        let prod = cpu::gemm_f64(&a[a0 * k..(a0 + m) * k], &bv, m, k, n, nt);
        for r in 0..crows {
            for j in 0..n {
                let want = if (c0..c0 + m).contains(&r) { prod[(r - c0) * n + j] } else { fill[r * n + j] as f64 };
                prop_assert!((got[r * n + j] as f64 - want).abs() < 1e-5, "row {} col {}", r, j);
            }
        }
    }
}

/// Top-k indices per row against the CPU reference, including ties (coarsely rounded values,
/// where the lower index must win), k = 1 and k = v, awkward widths and chunked rows.
#[test]
fn top_k_matches_reference() {
    for (g, rows, v, k) in [
        (gpu(), 1, 1, 1),
        (gpu(), 7, 5, 5),
        (gpu(), 130, 997, 10),
        (gpu(), 3, 4099, 64),
        (gpu_limited(16 << 10), 33, 1000, 7),
    ] {
        for ties in [false, true] {
            let z: Vec<f32> = random(rows * v, (rows * v + k) as u64, 0.0)
                .into_iter()
                .map(|x| if ties { (x * 4.0).round() } else { x })
                .collect();
            let zm = mat(&g, rows, v, &z);
            let out = g.storage((rows * k * 4 + 8 * k) as u64, true).unwrap();
            let mut b = Batch::new(&g);
            ops::top_k(&mut b, &zm, k, &out, 2).unwrap();
            b.submit().unwrap();
            let got: Vec<u32> = bytemuck::cast_slice(
                &g.read_bytes(&out, (8 * k) as u64, (rows * k * 4) as u64)
                    .unwrap(),
            )
            .to_vec();
            let want = cpu::ops::top_k(&z, v, k);
            for r in 0..rows {
                let gr: Vec<usize> = got[r * k..(r + 1) * k]
                    .iter()
                    .map(|&i| i as usize)
                    .collect();
                assert_eq!(gr, want[r], "row {r} of {rows}x{v}, k {k}, ties {ties}");
            }
        }
    }
    let g = gpu();
    let zm = mat(&g, 2, 3, &[0.0; 6]);
    let out = g.storage(64, true).unwrap();
    let mut b = Batch::new(&g);
    assert!(ops::top_k(&mut b, &zm, 4, &out, 0).is_err());
    assert!(ops::top_k(&mut b, &zm, 0, &out, 0).is_err());
}
