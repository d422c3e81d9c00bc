//! Every kernel against its CPU f64 reference, on random shapes including awkward ones
//! (1, primes, non-multiples of the tile) and operands split into chunks.

mod common;

use common::{gpu, gpu_limited, random, rel_err};
use proptest::prelude::*;
use pumice::cpu;
use pumice::gpu::{matmul, GemmOp, Gpu, GpuMatrix, HessianAccumulator};
use pumice::DType;

/// Tolerance on the max-norm relative error: f32 accumulation plus the storage rounding of
/// 16-bit inputs (the reference sees the same rounded values, so only accumulation remains).
fn tol(k: usize) -> f64 {
    2e-6 * (k as f64).sqrt().max(4.0)
}

/// Round values through a storage dtype so the reference sees exactly what the GPU sees.
fn rounded(v: &[f32], dt: DType) -> Vec<f32> {
    let mut out = Vec::new();
    dt.decode_f32(&dt.encode_f32(v), &mut out);
    out
}

#[allow(clippy::too_many_arguments)]
fn check_gemm(g: &Gpu, m: usize, k: usize, n: usize, op: GemmOp, da: DType, db: DType, seed: u64) {
    check_gemm_with(g, None, m, k, n, op, da, db, seed)
}

/// `check_gemm` with a given configuration (None: the one the product would take).
#[allow(clippy::too_many_arguments)]
fn check_gemm_with(
    g: &Gpu,
    cfg: Option<pumice::gpu::GemmConfig>,
    m: usize,
    k: usize,
    n: usize,
    op: GemmOp,
    da: DType,
    db: DType,
    seed: u64,
) {
    let a = rounded(&random(m * k, seed, 0.0), da);
    let b = rounded(&random(k * n, seed + 1, 0.0), db);
    let (br, bc) = match op {
        GemmOp::NN => (k, n),
        GemmOp::NT => (n, k),
    };
    let ga = GpuMatrix::from_f32(g, m, k, da, &a).unwrap();
    let gb = GpuMatrix::from_f32(g, br, bc, db, &b).unwrap();
    let c = match cfg {
        None => matmul(g, &ga, &gb, op).unwrap(),
        Some(cfg) => {
            let gc = GpuMatrix::uninit(g, m, n).unwrap();
            let mut batch = pumice::gpu::Batch::new(g);
            pumice::gpu::gemm_with_config(&mut batch, &ga, 0..m, &gb, op, &gc, 0, 0, false, cfg)
                .unwrap();
            batch.submit().unwrap();
            gc
        }
    };
    let c = c.to_f32(g).unwrap();
    let want = cpu::gemm_f64(&a, &b, m, k, n, op == GemmOp::NT);
    let e = rel_err(&c, &want);
    let label = cfg.map(|c| c.to_string()).unwrap_or_default();
    assert!(
        e < tol(k),
        "{label} {op:?} {m}x{k}x{n} {da}/{db}: rel err {e:.3e}"
    );
}

#[test]
fn gemm_fixed_awkward_shapes() {
    let g = gpu();
    let shapes = [
        (1, 1, 1),
        (1, 7, 1),
        (3, 5, 7),
        (64, 64, 64),
        (65, 33, 31),
        (97, 101, 103),
        (4, 256, 4),
        (128, 3, 129),
        // Fewer rows than the tile take the one- or few-rows-per-invocation configurations.
        (2, 9, 70),
        (1, 300, 517),
        // Fewer columns than the tile take a narrower, taller workgroup.
        (300, 70, 9),
        (200, 64, 64),
    ];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        for op in [GemmOp::NN, GemmOp::NT] {
            check_gemm(&g, m, k, n, op, DType::F32, DType::F32, i as u64);
        }
    }
    // Which configurations those were: one row per invocation for a single row, at most the
    // rows there are for a few, the adapter's tile for many.
    use pumice::gpu::GemmConfig;
    let base = GemmConfig::for_gpu(&g);
    assert_eq!(GemmConfig::for_product(&g, 1, 4096).tm, 1);
    assert!(GemmConfig::for_product(&g, 2, 4096).tm <= 2);
    assert_eq!(GemmConfig::for_product(&g, 4096, 4096), base);
    // Fewer columns than the tile: a narrower workgroup of the same size.
    let narrow = GemmConfig::for_product(&g, 4096, 5);
    assert!(
        narrow.tile_n() < base.tile_n() || base.wg_x == 1,
        "{narrow} vs {base}"
    );
    assert_eq!(narrow.wg_x * narrow.wg_y, base.wg_x * base.wg_y);
}

/// Every configuration tuning may choose, on any adapter class, against the f64 reference:
/// awkward shapes, one row, 16-bit operands, and operands split into binding-sized chunks.
#[test]
fn every_tuning_candidate_matches_the_f64_reference() {
    use pumice::gpu::tune;
    let g = gpu();
    let small = gpu_limited(1024);
    let max = g.caps().max_invocations;
    let mut configs = Vec::new();
    for cpu_class in [true, false] {
        for c in tune::gemm_candidates(cpu_class, max, g.caps().fixed_subgroup())
            .into_iter()
            .chain(tune::gemv_candidates(
                cpu_class,
                max,
                g.caps().fixed_subgroup(),
            ))
        {
            if !configs.contains(&c) {
                configs.push(c);
            }
        }
    }
    // Where the adapter has one fixed subgroup size (lavapipe: 8), the subgroup variants are
    // among them and take the subgroup path.
    if g.caps().fixed_subgroup().is_some() {
        assert!(
            configs.iter().any(|c| c.subgroup_lanes(&g) > 0),
            "{configs:?}"
        );
    }
    for (ci, &cfg) in configs.iter().enumerate() {
        for (i, &(m, k, n)) in [
            (1, 1, 1),
            (1, 300, 517),
            (3, 5, 7),
            (65, 33, 31),
            (97, 101, 103),
        ]
        .iter()
        .enumerate()
        {
            for op in [GemmOp::NN, GemmOp::NT] {
                let seed = (ci * 100 + i) as u64;
                check_gemm_with(&g, Some(cfg), m, k, n, op, DType::F32, DType::F32, seed);
            }
        }
        for op in [GemmOp::NN, GemmOp::NT] {
            check_gemm_with(
                &g,
                Some(cfg),
                33,
                70,
                41,
                op,
                DType::BF16,
                DType::F16,
                ci as u64,
            );
            check_gemm_with(
                &small,
                Some(cfg),
                70,
                64,
                37,
                op,
                DType::F32,
                DType::F32,
                ci as u64,
            );
        }
    }
}

#[test]
fn gemm_16bit_inputs() {
    let g = gpu();
    for (i, &(m, k, n)) in [(1, 1, 1), (5, 9, 3), (33, 64, 40), (17, 130, 66)]
        .iter()
        .enumerate()
    {
        for op in [GemmOp::NN, GemmOp::NT] {
            for (da, db) in [
                (DType::F32, DType::BF16),
                (DType::F16, DType::F32),
                (DType::BF16, DType::F16),
                (DType::BF16, DType::BF16),
            ] {
                check_gemm(&g, m, k, n, op, da, db, 100 + i as u64);
            }
        }
    }
}

#[test]
fn gemm_chunked_operands() {
    // 1 KiB bindings: every operand below is split into many row chunks, some chunk boundaries
    // not multiples of the tile, and for A·B the contraction itself is chunked.
    let g = gpu_limited(1024);
    assert_eq!(g.caps().max_binding, 1024);
    for (i, &(m, k, n)) in [(37, 19, 23), (70, 64, 9), (5, 200, 3), (130, 8, 129)]
        .iter()
        .enumerate()
    {
        for op in [GemmOp::NN, GemmOp::NT] {
            check_gemm(&g, m, k, n, op, DType::F32, DType::F32, 200 + i as u64);
            check_gemm(&g, m, k, n, op, DType::BF16, DType::F16, 300 + i as u64);
        }
    }
    let a = GpuMatrix::from_f32(&g, 70, 64, DType::F32, &random(70 * 64, 9, 0.0)).unwrap();
    assert!(a.chunks().len() > 1, "operand was not chunked");
}

/// Contractions split over several dispatches when one invocation may not loop over all of k
/// (Mesa's CPU drivers stop at 65,535 iterations): both operand layouts, awkward k, 16-bit
/// operands, and a contraction longer than the real limit.
#[test]
fn gemm_contraction_split_by_loop_budget() {
    let g = common::gpu_loop_limited(120);
    for (m, k, n, op) in [
        (5, 257, 7, GemmOp::NT),
        (3, 1001, 9, GemmOp::NN),
        (17, 64, 33, GemmOp::NT),
        (2, 3, 5, GemmOp::NN),
    ] {
        check_gemm(&g, m, k, n, op, DType::F32, DType::F32, k as u64);
        check_gemm(&g, m, k, n, op, DType::BF16, DType::F16, k as u64 + 1);
    }
    check_gemm(
        &common::gpu(),
        2,
        300_001,
        3,
        GemmOp::NT,
        DType::F32,
        DType::F32,
        5,
    );
}

#[test]
fn gemm_rejects_mismatched_shapes() {
    let g = gpu();
    let a = GpuMatrix::from_f32(&g, 2, 3, DType::F32, &[0.0; 6]).unwrap();
    let b = GpuMatrix::from_f32(&g, 4, 2, DType::F32, &[0.0; 8]).unwrap();
    let err = matmul(&g, &a, &b, GemmOp::NN).unwrap_err();
    assert!(err.to_string().contains("shape mismatch"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gemm_random_shapes(m in 1usize..90, k in 1usize..90, n in 1usize..90, nt: bool, da in 0u8..3, db in 0u8..3, seed: u64) {
        let dts = [DType::F32, DType::F16, DType::BF16];
        let g = gpu();
        check_gemm(&g, m, k, n, if nt { GemmOp::NT } else { GemmOp::NN }, dts[da as usize], dts[db as usize], seed);
    }

    #[test]
    fn gemm_random_shapes_chunked(m in 1usize..60, k in 1usize..60, n in 1usize..60, nt: bool, seed: u64) {
        let g = gpu_limited(512);
        check_gemm(&g, m, k, n, if nt { GemmOp::NT } else { GemmOp::NN }, DType::F32, DType::BF16, seed);
    }
}

fn check_hessian(
    g: &Gpu,
    batches: &[usize],
    f: usize,
    bias: f32,
    seed: u64,
) -> (f64, Vec<f32>, Vec<f64>) {
    let mut acc = HessianAccumulator::new(g, f).unwrap();
    let mut all = Vec::new();
    for (i, &rows) in batches.iter().enumerate() {
        let x = random(rows * f, seed + i as u64, bias);
        acc.accumulate_host(g, &x).unwrap();
        all.extend_from_slice(&x);
    }
    let total: usize = batches.iter().sum();
    assert_eq!(acc.rows_seen(), total as u64);
    let got = acc.read(g).unwrap();
    let want = cpu::hessian_f64(&all, total, f);
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    (err, all, want)
}

#[test]
fn hessian_small_awkward_shapes() {
    let g = gpu();
    for (i, &(batches, f)) in [
        (&[1usize][..], 1usize),
        (&[3, 5], 7),
        (&[100], 33),
        (&[64, 1, 17], 64),
        (&[5], 131),
    ]
    .iter()
    .enumerate()
    {
        let (err, _, _) = check_hessian(&g, batches, f, 0.0, i as u64);
        assert!(err < 1e-6, "f={f} batches={batches:?}: rel err {err:.3e}");
    }
}

/// Every Hessian configuration tuning may choose, on any adapter class, against f64: awkward
/// feature counts (1, primes, past a block), several batches, and chunked operands.
#[test]
fn every_hessian_candidate_matches_the_f64_reference() {
    use pumice::gpu::{tune, Batch, HessianConfig};
    let g = gpu();
    let small = gpu_limited(2048);
    let max = g.caps().max_invocations;
    let mut configs: Vec<HessianConfig> = Vec::new();
    for cpu_class in [true, false] {
        for c in tune::hessian_candidates(cpu_class, max) {
            if !configs.contains(&c) {
                configs.push(c);
            }
        }
    }
    for (ci, &cfg) in configs.iter().enumerate() {
        for (i, &(t, f, gg)) in [
            (9usize, 1usize, &g),
            (40, 37, &g),
            (70, 131, &g),
            (50, 37, &small),
        ]
        .iter()
        .enumerate()
        {
            let x = random(t * f, (ci * 10 + i) as u64, 0.1);
            let mut acc = HessianAccumulator::new(gg, f).unwrap();
            // Two batches, the second of one row.
            for (r0, r1) in [(0, t - 1), (t - 1, t)] {
                let xm =
                    GpuMatrix::from_f32(gg, r1 - r0, f, DType::F32, &x[r0 * f..r1 * f]).unwrap();
                let mut b = Batch::new(gg);
                acc.accumulate_with(&mut b, &xm, cfg).unwrap();
                b.submit().unwrap();
            }
            let h = acc.read(gg).unwrap();
            let want = cpu::hessian_f64(&x, t, f);
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = h
                .iter()
                .zip(&want)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(err < 1e-6, "{cfg} t={t} f={f}: rel err {err:.3e}");
        }
    }
}

#[test]
fn hessian_chunked() {
    // 2 KiB bindings: H (37×37 f32 = 5.5 KiB) and X are split into row chunks.
    let g = gpu_limited(2048);
    let (err, _, _) = check_hessian(&g, &[50, 23], 37, 0.1, 7);
    assert!(err < 1e-6, "chunked Hessian rel err {err:.3e}");
}

/// 10⁵+ rows with a non-zero mean (every product positive on average, so the sum grows
/// linearly, the worst case for plain f32 accumulation). The compensated scheme must stay
/// near f32 resolution and far below what a plain running f32 sum gives.
#[test]
fn hessian_long_sum_accuracy() {
    let g = gpu();
    let f = 24;
    let batches = [40_000usize, 40_000, 30_011];
    let (err, all, want) = check_hessian(&g, &batches, f, 0.5, 42);
    // Plain sequential f32 accumulation over the same rows, as a naive kernel would do.
    let rows: usize = batches.iter().sum();
    let mut naive = vec![0.0f32; f * f];
    for r in 0..rows {
        let x = &all[r * f..(r + 1) * f];
        for i in 0..f {
            for j in 0..f {
                naive[i * f + j] += x[i] * x[j];
            }
        }
    }
    let naive_err = rel_err(&naive, &want);
    eprintln!("Hessian over {rows} rows: compensated rel err {err:.3e}, naive f32 {naive_err:.3e}");
    // Measured on lavapipe: 3e-9 (and 1.9e-7 when a compiler folded the TwoSum away, which
    // this bound catches).
    assert!(err < 2e-8, "compensated Hessian rel err {err:.3e}");
    assert!(
        err * 100.0 < naive_err,
        "scheme no better than naive f32 ({err:.3e} vs {naive_err:.3e})"
    );
}
