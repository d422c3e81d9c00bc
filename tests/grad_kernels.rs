//! Backward kernels and the optimizer against their f64 references: each reference checked by
//! central finite differences of the f64 forward, each GPU kernel against finite differences
//! directly (relative error ≤ 1e-3, the must-show of on-device adaptation) and against the
//! analytic reference on awkward shapes (one row, one column, primes, operands split into many
//! binding-sized chunks).

mod common;

use common::random;
use pumice::cpu::grad as reference;
use pumice::dtype::DType;
use pumice::gpu::grad::{adamw_step, rms_norm_backward, sum_squares, swiglu_backward, AdamW};
use pumice::gpu::ops::{self, RopeTable};
use pumice::gpu::{Batch, Gpu, GpuMatrix};

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn up(gpu: &Gpu, rows: usize, cols: usize, v: &[f32]) -> GpuMatrix {
    GpuMatrix::from_f32(gpu, rows, cols, DType::F32, v).unwrap()
}

fn down(gpu: &Gpu, m: &GpuMatrix) -> Vec<f64> {
    wide(&m.to_f32(gpu).unwrap())
}

/// ‖got − want‖ / ‖want‖.
fn rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Finite differences of L(x) = ⟨dy, f(x)⟩.
fn fd(x: &[f64], dy: &[f64], f: &dyn Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    reference::finite_differences(x, 1e-6, &|x| dot(dy, &f(x)))
}

const EPS: f32 = 1e-5;

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let gpu = common::gpu();
    for (rows, h, seed) in [(1usize, 1usize, 1u64), (1, 7, 2), (3, 64, 3), (5, 257, 4)] {
        let x = random(rows * h, seed, 0.1);
        let w = random(h, seed + 1, 1.0);
        let dy = random(rows * h, seed + 2, 0.0);
        let (xd, wd, dyd) = (wide(&x), wide(&w), wide(&dy));
        let eps = EPS as f64;
        let fd_x = fd(&xd, &dyd, &|x| reference::rms_norm(x, &wd, h, eps));
        let fd_w = fd(&wd, &dyd, &|w| reference::rms_norm(&xd, w, h, eps));
        let (rx, rw) = reference::rms_norm_backward(&xd, &wd, &dyd, h, eps);
        // Relative to the whole gradient (x's and w's): with h = 1 the output is ±w and dx is
        // nearly 0, so its own relative error would measure rounding, not the formula.
        let whole = [fd_x.clone(), fd_w.clone()].concat();
        let norm: f64 = dot(&whole, &whole).sqrt();
        let err = |got: &[f64], want: &[f64]| rel(got, want) * dot(want, want).sqrt() / norm;
        assert!(err(&rx, &fd_x) <= 1e-6, "{rows}x{h}: reference dx");
        assert!(err(&rw, &fd_w) <= 1e-6, "{rows}x{h}: reference dw");

        let dx = GpuMatrix::zeros(&gpu, rows, h).unwrap();
        let dw = GpuMatrix::zeros(&gpu, 1, h).unwrap();
        let mut b = Batch::new(&gpu);
        let (xm, wm, dym) = (
            up(&gpu, rows, h, &x),
            up(&gpu, 1, h, &w),
            up(&gpu, rows, h, &dy),
        );
        rms_norm_backward(&mut b, &xm, &wm, &dym, EPS, &dx, false, &dw).unwrap();
        b.submit().unwrap();
        let (ex, ew) = (err(&down(&gpu, &dx), &fd_x), err(&down(&gpu, &dw), &fd_w));
        eprintln!("rmsnorm {rows}x{h}: dx {ex:.2e}, dw {ew:.2e} vs finite differences");
        assert!(ex <= 1e-3 && ew <= 1e-3, "{rows}x{h}: dx {ex:e}, dw {ew:e}");
    }
}

#[test]
fn rms_norm_backward_on_awkward_and_chunked_shapes() {
    // 1 KiB bindings: 37 f32 columns give 4 rows per chunk, so x, dy and dx (and the r
    // buffer's rows) are split many times; bf16 weights as checkpoints store them.
    for (gpu, rows, h, chunked) in [
        (common::gpu(), 1usize, 3000usize, false),
        (common::gpu(), 131, 97, false),
        (common::gpu_limited(1024), 61, 37, true),
    ] {
        let x = random(rows * h, 7, 0.0);
        let w: Vec<f32> = random(h, 8, 1.0)
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let dy = random(rows * h, 9, 0.0);
        let (rx, rw) =
            reference::rms_norm_backward(&wide(&x), &wide(&w), &wide(&dy), h, EPS as f64);
        let wm = GpuMatrix::from_f32(&gpu, 1, h, DType::BF16, &w).unwrap();
        let prior = random(rows * h, 10, 0.0);
        let dx = up(&gpu, rows, h, &prior);
        let dw = up(&gpu, 1, h, &vec![0.5; h]);
        let mut b = Batch::new(&gpu);
        let (xm, dym) = (up(&gpu, rows, h, &x), up(&gpu, rows, h, &dy));
        // Accumulating: dx += gradient, dw += gradient.
        rms_norm_backward(&mut b, &xm, &wm, &dym, EPS, &dx, true, &dw).unwrap();
        b.submit().unwrap();
        let want_x: Vec<f64> = rx.iter().zip(&prior).map(|(g, p)| g + *p as f64).collect();
        let want_w: Vec<f64> = rw.iter().map(|g| g + 0.5).collect();
        let (ex, ew) = (
            rel(&down(&gpu, &dx), &want_x),
            rel(&down(&gpu, &dw), &want_w),
        );
        assert!(ex <= 1e-5 && ew <= 1e-5, "{rows}x{h}: dx {ex:e}, dw {ew:e}");
        assert_eq!(dx.chunks().len() > 1, chunked);
    }
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    for (gpu, rows, cols) in [
        (common::gpu(), 1usize, 1usize),
        (common::gpu(), 7, 13),
        (common::gpu(), 33, 517),
        (common::gpu_limited(1024), 29, 61),
    ] {
        let g: Vec<f32> = random(rows * cols, 11, 0.0)
            .iter()
            .map(|v| 4.0 * v)
            .collect();
        let u = random(rows * cols, 12, 0.0);
        let dy = random(rows * cols, 13, 0.0);
        let (gd, ud, dyd) = (wide(&g), wide(&u), wide(&dy));
        let (rg, ru) = reference::swiglu_backward(&gd, &ud, &dyd);
        if rows * cols <= 1000 {
            let fd_g = fd(&gd, &dyd, &|g| reference::swiglu(g, &ud));
            let fd_u = fd(&ud, &dyd, &|u| reference::swiglu(&gd, u));
            assert!(rel(&rg, &fd_g) <= 1e-6 && rel(&ru, &fd_u) <= 1e-6);
        }
        let (dg, du) = (
            GpuMatrix::zeros(&gpu, rows, cols).unwrap(),
            GpuMatrix::zeros(&gpu, rows, cols).unwrap(),
        );
        let mut b = Batch::new(&gpu);
        let (gm, um, dym) = (
            up(&gpu, rows, cols, &g),
            up(&gpu, rows, cols, &u),
            up(&gpu, rows, cols, &dy),
        );
        swiglu_backward(&mut b, &gm, &um, &dym, &dg, &du).unwrap();
        b.submit().unwrap();
        let (eg, eu) = (rel(&down(&gpu, &dg), &rg), rel(&down(&gpu, &du), &ru));
        eprintln!("swiglu {rows}x{cols}: dg {eg:.2e}, du {eu:.2e}");
        assert!(
            eg <= 1e-5 && eu <= 1e-5,
            "{rows}x{cols}: dg {eg:e}, du {eu:e}"
        );
    }
}

#[test]
fn rope_backward_is_the_gradient_of_rope() {
    let gpu = common::gpu();
    for (rows, heads, half, seed) in [
        (1usize, 1usize, 1usize, 1u64),
        (5, 3, 16, 2),
        (17, 2, 32, 3),
    ] {
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / (2 * half) as f32))
            .collect();
        let positions: Vec<u32> = (0..rows).map(|r| ((r as u32) * 389 + 7) % 2048).collect();
        let cols = heads * 2 * half;
        let x = wide(&random(rows * cols, seed, 0.0));
        let dy = random(rows * cols, seed + 1, 0.0);
        let dyd = wide(&dy);
        let fd_x = fd(&x, &dyd, &|x| {
            reference::rope(x, heads, &inv_freq, &positions, false)
        });
        let rx = reference::rope_backward(&dyd, heads, &inv_freq, &positions);
        assert!(rel(&rx, &fd_x) <= 1e-6, "reference");
        let table = RopeTable::new(&gpu, &inv_freq, 2048).unwrap();
        let pos = ops::upload_u32(&gpu, &positions).unwrap();
        let m = up(&gpu, rows, cols, &dy);
        let mut b = Batch::new(&gpu);
        ops::rope_backward(&mut b, &m, 0..rows, heads, &pos, &table).unwrap();
        b.submit().unwrap();
        let e = rel(&down(&gpu, &m), &fd_x);
        eprintln!("rope {rows}x{heads}x{half}: {e:.2e} vs finite differences");
        assert!(
            e <= 1e-3,
            "{rows} rows, {heads} heads of {}: {e:e}",
            2 * half
        );
    }
}

#[test]
fn adamw_steps_match_the_f64_reference() {
    for (gpu, rows, cols) in [
        (common::gpu(), 1usize, 1usize),
        (common::gpu(), 5, 311),
        (common::gpu_limited(1024), 23, 45),
    ] {
        let n = rows * cols;
        let opt = AdamW {
            lr: 3e-3,
            weight_decay: 0.1,
            ..AdamW::default()
        };
        let hyper = (
            opt.lr as f64,
            opt.beta1 as f64,
            opt.beta2 as f64,
            opt.eps as f64,
            opt.weight_decay as f64,
        );
        let theta0 = random(n, 21, 0.0);
        let (theta, m, v) = (
            up(&gpu, rows, cols, &theta0),
            GpuMatrix::zeros(&gpu, rows, cols).unwrap(),
            GpuMatrix::zeros(&gpu, rows, cols).unwrap(),
        );
        let mut want = (wide(&theta0), vec![0.0; n], vec![0.0; n]);
        for t in 1..=4u32 {
            let grad = random(n, 30 + t as u64, 0.0);
            // Gradients are representable in f32, so the f64 reference sees the same ones.
            let scale = if t == 3 { 0.25f32 } else { 1.0 };
            want = reference::adamw(
                &want.0,
                &want.1,
                &want.2,
                &wide(&grad),
                t,
                scale as f64,
                hyper,
            );
            let mut b = Batch::new(&gpu);
            let gm = up(&gpu, rows, cols, &grad);
            adamw_step(&mut b, &opt, t, scale, &gm, &theta, &m, &v).unwrap();
            b.submit().unwrap();
        }
        let e = rel(&down(&gpu, &theta), &want.0);
        let em = rel(&down(&gpu, &m), &want.1);
        let ev = rel(&down(&gpu, &v), &want.2);
        assert!(
            e <= 1e-6 && em <= 1e-6 && ev <= 1e-6,
            "{rows}x{cols}: θ {e:e}, m {em:e}, v {ev:e}"
        );
    }
}

#[test]
fn sum_squares_of_several_chunked_matrices() {
    let gpu = common::gpu_limited(1024);
    let a = random(1, 41, 0.0);
    let b = random(97 * 33, 42, 0.3);
    let c = random(300 * 7, 43, -0.2);
    let want: f64 = [&a, &b, &c]
        .iter()
        .flat_map(|v| v.iter())
        .map(|&x| x as f64 * x as f64)
        .sum();
    let (am, bm, cm) = (
        up(&gpu, 1, 1, &a),
        up(&gpu, 97, 33, &b),
        up(&gpu, 300, 7, &c),
    );
    assert!(bm.chunks().len() > 1);
    let got = sum_squares(&gpu, &[&am, &bm, &cm]).unwrap();
    assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
}

/// The LM head's loss and dh over blocks of positions: cross-entropy (with ignored positions)
/// and KL against a teacher, against the f64 reference (itself checked by finite differences),
/// with block sizes that split the positions unevenly, bf16 heads and heads larger than a
/// binding.
#[test]
fn lm_head_loss_and_gradient_in_blocks_of_positions() {
    use pumice::cpu::grad::{lm_head_loss, lm_head_loss_grads, Scored};
    use pumice::gpu::xent::{
        lm_head_loss_backward, lm_head_loss_backward_trainable, Objective, IGNORE,
    };
    for (gpu, t, d, v, block, seed) in [
        (common::gpu(), 1usize, 1usize, 1usize, None, 1u64),
        (common::gpu(), 5, 3, 7, Some(2), 2),
        (common::gpu(), 37, 64, 1000, Some(8), 3),
        (common::gpu(), 19, 32, 4099, None, 4),
        // 64 KiB bindings: the head is split into chunks, 16 positions per logit block.
        (common::gpu_limited(64 << 10), 41, 48, 1000, None, 5),
    ] {
        let h = random(t * d, seed, 0.0);
        let head: Vec<f32> = random(v * d, seed + 1, 0.0)
            .iter()
            .map(|&x| half::bf16::from_f32(2.0 * x).to_f32())
            .collect();
        let targets: Vec<u32> = (0..t)
            .map(|r| {
                if r % 5 == 3 {
                    IGNORE
                } else {
                    ((r * 7919 + 13) % v) as u32
                }
            })
            .collect();
        let dt = d + 3;
        let th = random(t * dt, seed + 2, 0.0);
        let thead = random(v * dt, seed + 3, 0.0);
        let (hd, wd) = (wide(&h), wide(&head));
        let (thd, twd) = (wide(&th), wide(&thead));
        let hm = up(&gpu, t, d, &h);
        let wm = GpuMatrix::from_f32(&gpu, v, d, DType::BF16, &head).unwrap();
        let (thm, twm) = (up(&gpu, t, dt, &th), up(&gpu, v, dt, &thead));
        let cases: [(&str, Scored, Objective); 2] = [
            (
                "ce",
                Scored::Targets(&targets),
                Objective::Targets(&targets),
            ),
            (
                "kl",
                Scored::Teacher {
                    hidden: &thd,
                    head: &twd,
                    d: dt,
                },
                Objective::Teacher {
                    hidden: &thm,
                    head: &twm,
                },
            ),
        ];
        for (name, scored, objective) in cases {
            let (want_loss, want_dh) = lm_head_loss(&hd, &wd, t, d, v, &scored);
            if t * d <= 200 {
                let fd_h = reference::finite_differences(&hd, 1e-6, &|x| {
                    lm_head_loss(x, &wd, t, d, v, &scored).0
                });
                assert!(rel(&want_dh, &fd_h) <= 1e-6, "{name} reference {t}x{d}x{v}");
            }
            let dh = up(&gpu, t, d, &vec![7.0; t * d]);
            let loss = lm_head_loss_backward(&gpu, &hm, &wm, &objective, &dh, block).unwrap();
            let e = rel(&down(&gpu, &dh), &want_dh);
            eprintln!(
                "{name} t {t} d {d} v {v} block {block:?}: loss {loss:.6} vs {want_loss:.6}, dh {e:.2e}"
            );
            assert!(
                (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1e-3),
                "{name}: loss {loss} vs {want_loss}"
            );
            assert!(
                e <= 1e-4 || (want_dh.iter().all(|&x| x == 0.0) && e.is_finite()),
                "{name}: dh {e:e}"
            );
            // A trainable head: dW (added to what the buffer holds) against the f64 gradient,
            // itself checked by finite differences on small shapes.
            let (_, _, want_dw) = lm_head_loss_grads(&hd, &wd, t, d, v, &scored);
            if v * d <= 200 {
                let fd_w = reference::finite_differences(&wd, 1e-6, &|w| {
                    lm_head_loss(&hd, w, t, d, v, &scored).0
                });
                assert!(
                    rel(&want_dw, &fd_w) <= 1e-6,
                    "{name} reference dW {t}x{d}x{v}"
                );
            }
            let dw = up(&gpu, v, d, &vec![0.5; v * d]);
            let loss2 =
                lm_head_loss_backward_trainable(&gpu, &hm, &wm, &objective, &dh, Some(&dw), block)
                    .unwrap();
            assert_eq!(
                loss2, loss,
                "{name}: the loss does not depend on the head's gradient"
            );
            let got_dw: Vec<f64> = down(&gpu, &dw).iter().map(|x| x - 0.5).collect();
            let ew = rel(&got_dw, &want_dw);
            eprintln!("{name} t {t} d {d} v {v} block {block:?}: dW {ew:.2e}");
            assert!(
                ew <= 1e-4 || (want_dw.iter().all(|&x| x == 0.0) && ew < 1e-6),
                "{name}: dW {ew:e}"
            );
        }
    }
}

/// Attention backward: the f64 reference against finite differences of the f64 attention,
/// the GPU against finite differences (small shapes) and the reference (GQA, windows, head
/// dimensions that are and are not multiples of 4, one position, sequences in separate chunks).
#[test]
fn attention_backward_matches_finite_differences() {
    use pumice::gpu::attn_grad::{attention_backward, AttnGradShape};
    for (gpu, nseq, t, heads, kv, d, window, seed, chunked) in [
        (
            common::gpu(),
            1usize,
            1usize,
            1usize,
            1usize,
            4usize,
            0usize,
            1u64,
            false,
        ),
        (common::gpu(), 2, 5, 2, 1, 3, 0, 2, false),
        (common::gpu(), 1, 7, 4, 2, 8, 3, 3, false),
        (common::gpu(), 3, 37, 6, 2, 16, 0, 4, false),
        (common::gpu(), 2, 64, 2, 2, 64, 0, 5, false),
        // A real family's attention at a real context: Qwen2.5-0.5B (14 heads, 2 kv heads of
        // 64) over 1024 positions.
        (common::gpu(), 1, 1024, 14, 2, 64, 0, 7, false),
        // 3 KiB bindings: one sequence of 13 rows per chunk of q, o, dout, dq; two per
        // chunk of k, v, dk, dv — so the segments follow both.
        (common::gpu_limited(3072), 4, 13, 4, 2, 12, 5, 6, true),
    ] {
        let (qw, kw) = (heads * d, kv * d);
        let rows = nseq * t;
        let q = random(rows * qw, seed, 0.0);
        let k = random(rows * kw, seed + 1, 0.0);
        let v = random(rows * kw, seed + 2, 0.0);
        let dout = random(rows * qw, seed + 3, 0.0);
        let (qd, kd, vd, gd) = (wide(&q), wide(&k), wide(&v), wide(&dout));
        let (rq, rk, rv) =
            reference::attention_backward(&qd, &kd, &vd, &gd, nseq, t, heads, kv, d, window);
        let small = rows * qw <= 300;
        let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
            reference::attention(q, k, v, nseq, t, heads, kv, d, window)
        };
        if small {
            let fq = fd(&qd, &gd, &|x| fwd(x, &kd, &vd));
            let fk = fd(&kd, &gd, &|x| fwd(&qd, x, &vd));
            let fv = fd(&vd, &gd, &|x| fwd(&qd, &kd, x));
            assert!(
                rel(&rq, &fq) <= 1e-6 && rel(&rk, &fk) <= 1e-6 && rel(&rv, &fv) <= 1e-6,
                "reference"
            );
        }
        let o: Vec<f32> = fwd(&qd, &kd, &vd).iter().map(|&x| x as f32).collect();
        let grouped = |w: usize, vals: &[f32]| {
            let m = GpuMatrix::from_f32_grouped(&gpu, rows, w, t, vals).unwrap();
            assert_eq!(m.chunks().len() > 1, chunked);
            m
        };
        let (qm, km, vm, om, gm) = (
            grouped(qw, &q),
            grouped(kw, &k),
            grouped(kw, &v),
            grouped(qw, &o),
            grouped(qw, &dout),
        );
        let (dq, dk, dv) = (
            grouped(qw, &vec![0.0; rows * qw]),
            grouped(kw, &vec![0.0; rows * kw]),
            grouped(kw, &vec![0.0; rows * kw]),
        );
        let shape = AttnGradShape {
            nseq,
            t,
            heads,
            kv_heads: kv,
            head_dim: d,
            window,
        };
        let mut b = Batch::new(&gpu);
        attention_backward(&mut b, shape, &qm, &km, &vm, &om, &gm, &dq, &dk, &dv).unwrap();
        b.submit().unwrap();
        let (eq, ek, ev) = (
            rel(&down(&gpu, &dq), &rq),
            rel(&down(&gpu, &dk), &rk),
            rel(&down(&gpu, &dv), &rv),
        );
        eprintln!("attention {shape:?}: dq {eq:.2e}, dk {ek:.2e}, dv {ev:.2e}");
        assert!(
            eq <= 1e-4 && ek <= 1e-4 && ev <= 1e-4,
            "{shape:?}: {eq:e} {ek:e} {ev:e}"
        );
    }
}

/// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (W bf16 and frozen, LoRA's A and B): dx, dA, dB (and a dense dW)
/// against the f64 gradients, themselves checked by finite differences of ⟨dy, y⟩ on the
/// small shapes; awkward and chunked shapes.
#[test]
fn linear_and_low_rank_gradients_match_finite_differences() {
    use pumice::gpu::linear_grad::{
        linear_backward_input, linear_backward_weight, low_rank_backward, low_rank_forward,
    };
    // y (t × m) of row-major x (t × n), w (m × n), a (r × n), b (m × r), in f64.
    let forward = |x: &[f64],
                   w: &[f64],
                   a: &[f64],
                   b: &[f64],
                   s: f64,
                   t: usize,
                   n: usize,
                   m: usize,
                   r: usize| {
        let mut y = vec![0.0; t * m];
        for i in 0..t {
            let u: Vec<f64> = (0..r)
                .map(|q| (0..n).map(|c| x[i * n + c] * a[q * n + c]).sum())
                .collect();
            for o in 0..m {
                let dense: f64 = (0..n).map(|c| x[i * n + c] * w[o * n + c]).sum();
                let low: f64 = (0..r).map(|q| u[q] * b[o * r + q]).sum();
                y[i * m + o] = dense + s * low;
            }
        }
        y
    };
    for (gpu, t, n, m, r, seed) in [
        (common::gpu(), 1usize, 1usize, 1usize, 1usize, 1u64),
        (common::gpu(), 7, 13, 11, 3, 2),
        (common::gpu(), 37, 192, 64, 8, 3),
        (common::gpu_limited(2048), 29, 67, 41, 5, 4),
    ] {
        let s = 16.0 / r as f32;
        let x = random(t * n, seed, 0.0);
        let w: Vec<f32> = random(m * n, seed + 1, 0.0)
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let a = random(r * n, seed + 2, 0.0);
        let bm = random(m * r, seed + 3, 0.0);
        let dy = random(t * m, seed + 4, 0.0);
        let (xd, wd, ad, bd, dyd) = (wide(&x), wide(&w), wide(&a), wide(&bm), wide(&dy));
        let sd = s as f64;
        // The analytic gradients in f64, checked by finite differences where that is cheap:
        // du = s·dy·B, dx = dy·W + du·A, dA = duᵀ·x, dB = s·dyᵀ·(x·Aᵀ), dW = dyᵀ·x.
        let mul =
            |p: &[f64], q: &[f64], rows: usize, inner: usize, cols: usize, pt: bool, qt: bool| {
                let at = |v: &[f64], i: usize, j: usize, ld: usize, tr: bool| {
                    if tr {
                        v[j * ld + i]
                    } else {
                        v[i * ld + j]
                    }
                };
                let (lp, lq) = (if pt { rows } else { inner }, if qt { inner } else { cols });
                (0..rows * cols)
                    .map(|idx| {
                        (0..inner)
                            .map(|k| at(p, idx / cols, k, lp, pt) * at(q, k, idx % cols, lq, qt))
                            .sum()
                    })
                    .collect::<Vec<f64>>()
            };
        let du: Vec<f64> = mul(&dyd, &bd, t, m, r, false, false)
            .iter()
            .map(|v| sd * v)
            .collect();
        let fx: Vec<f64> = mul(&dyd, &wd, t, m, n, false, false)
            .iter()
            .zip(mul(&du, &ad, t, r, n, false, false))
            .map(|(p, q)| p + q)
            .collect();
        let fa = mul(&du, &xd, r, t, n, true, false);
        let ud = mul(&xd, &ad, t, n, r, false, true);
        let fb: Vec<f64> = mul(&dyd, &ud, m, t, r, true, false)
            .iter()
            .map(|v| sd * v)
            .collect();
        let fw = mul(&dyd, &xd, m, t, n, true, false);
        if t * n <= 100 {
            let f =
                |x: &[f64], w: &[f64], a: &[f64], b: &[f64]| forward(x, w, a, b, sd, t, n, m, r);
            assert!(rel(&fx, &fd(&xd, &dyd, &|x| f(x, &wd, &ad, &bd))) <= 1e-6);
            assert!(rel(&fa, &fd(&ad, &dyd, &|a| f(&xd, &wd, a, &bd))) <= 1e-6);
            assert!(rel(&fb, &fd(&bd, &dyd, &|b| f(&xd, &wd, &ad, b))) <= 1e-6);
            assert!(rel(&fw, &fd(&wd, &dyd, &|w| f(&xd, w, &ad, &bd))) <= 1e-6);
        }

        let xm = up(&gpu, t, n, &x);
        let wm = GpuMatrix::from_f32(&gpu, m, n, DType::BF16, &w).unwrap();
        let (am, bmm) = (up(&gpu, r, n, &a), up(&gpu, m, r, &bm));
        let y = GpuMatrix::zeros(&gpu, t, m).unwrap();
        let u = low_rank_forward(&gpu, &xm, &am, &bmm, s, &y).unwrap();
        let want_low: Vec<f64> = forward(&xd, &vec![0.0; m * n], &ad, &bd, sd, t, n, m, r);
        assert!(rel(&down(&gpu, &y), &want_low) <= 1e-5, "low-rank forward");
        let dym = up(&gpu, t, m, &dy);
        let dx = GpuMatrix::zeros(&gpu, t, n).unwrap();
        let (da, db) = (
            GpuMatrix::zeros(&gpu, r, n).unwrap(),
            GpuMatrix::zeros(&gpu, m, r).unwrap(),
        );
        let dw = GpuMatrix::zeros(&gpu, m, n).unwrap();
        linear_backward_input(&gpu, &dym, &wm, &dx, false).unwrap();
        low_rank_backward(&gpu, &xm, &am, &bmm, s, &u, &dym, &da, &db, Some(&dx)).unwrap();
        linear_backward_weight(&gpu, &xm, &dym, &dw, true).unwrap();
        let errs = [
            ("dx", rel(&down(&gpu, &dx), &fx)),
            ("dA", rel(&down(&gpu, &da), &fa)),
            ("dB", rel(&down(&gpu, &db), &fb)),
            ("dW", rel(&down(&gpu, &dw), &fw)),
        ];
        eprintln!("linear t {t} n {n} m {m} r {r}: {errs:?}");
        for (name, e) in errs {
            assert!(e <= 1e-3, "{t}x{n}x{m} r {r}: {name} {e:e}");
        }
    }
}
