//! The GPU runtime itself: adapter selection, pipeline cache, buffer pool, typed errors,
//! operands larger than the device's real binding limit.

mod common;

use common::{gpu, gpu_with, random, rel_err};
use pumice::gpu::pipeline::{Kernel, Spec};
use pumice::gpu::{
    list_adapters, matmul, AdapterSelector, Batch, GemmOp, Gpu, GpuMatrix, GpuOptions,
};
use pumice::{cpu, DType, Error};

#[test]
fn adapters_are_listed_and_selectable() {
    let opts = GpuOptions::from_env().unwrap();
    let all = list_adapters(&opts);
    assert!(
        !all.is_empty(),
        "no adapter: install mesa-vulkan-drivers (lavapipe)"
    );
    assert_eq!(all.iter().filter(|a| a.selected).count(), 1);
    for a in &all {
        assert!(a.limits.max_storage_buffer_binding_size >= 1 << 20, "{a:?}");
        assert!(
            a.limits.subgroup_min_size <= a.limits.subgroup_max_size
                || a.limits.subgroup_max_size == 0
        );
    }
    // By index and by name substring (case-insensitive).
    let last = all.last().unwrap();
    let g = gpu_with(&GpuOptions {
        adapter: Some(AdapterSelector::Index(last.index)),
        ..opts.clone()
    });
    assert_eq!(g.report().name, last.name);
    let needle = last.name.to_uppercase();
    let g = gpu_with(&GpuOptions {
        adapter: Some(AdapterSelector::Name(needle[..needle.len().min(6)].into())),
        ..opts.clone()
    });
    assert!(g
        .report()
        .name
        .to_uppercase()
        .contains(&needle[..needle.len().min(6)]));
    // Out of range and unknown names are typed errors listing what exists.
    let e = Gpu::new(&GpuOptions {
        adapter: Some(AdapterSelector::Index(999)),
        ..opts.clone()
    })
    .unwrap_err();
    assert!(
        matches!(e, Error::NoAdapter(_)) && e.to_string().contains("available"),
        "{e}"
    );
    let e = Gpu::new(&GpuOptions {
        adapter: Some(AdapterSelector::Name("no such gpu".into())),
        ..opts
    })
    .unwrap_err();
    assert!(matches!(e, Error::NoAdapter(_)), "{e}");
}

#[test]
fn device_uses_real_limits() {
    let g = gpu();
    let r = g.report();
    assert_eq!(
        g.caps().max_binding,
        r.limits
            .max_storage_buffer_binding_size
            .min(r.limits.max_buffer_size)
            & !15
    );
    assert_eq!(
        g.caps().max_workgroups_per_dim,
        r.limits.max_compute_workgroups_per_dimension
    );
}

#[test]
fn pipelines_are_cached_per_variant() {
    let g = gpu();
    let a = GpuMatrix::from_f32(&g, 8, 8, DType::F32, &random(64, 1, 0.0)).unwrap();
    matmul(&g, &a, &a, GemmOp::NT).unwrap();
    let n = g.pipelines_built();
    for _ in 0..3 {
        matmul(&g, &a, &a, GemmOp::NT).unwrap();
    }
    assert_eq!(g.pipelines_built(), n, "same variant rebuilt");
    matmul(&g, &a, &a, GemmOp::NN).unwrap();
    assert_eq!(
        g.pipelines_built(),
        n + 1,
        "a new variant is one new pipeline"
    );
}

#[test]
fn broken_shader_is_a_typed_error() {
    let g = gpu();
    const BAD: Kernel = Kernel {
        expand: None,
        name: "broken",
        template: "@compute @workgroup_size(1) fn main() { let x: u32 = {{V}}; }",
    };
    let e = g.pipeline(&BAD, &Spec::new().set("V", "1.5")).unwrap_err();
    match &e {
        Error::Shader { kernel, msg } => {
            assert!(kernel.starts_with("broken"), "{kernel}");
            assert!(!msg.is_empty());
        }
        other => panic!("expected a shader error, got {other:?}"),
    }
    assert_eq!(e.to_string().lines().count(), 1, "{e}");
    // The device is still usable afterwards.
    let a = GpuMatrix::from_f32(&g, 2, 2, DType::F32, &[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(
        matmul(&g, &a, &a, GemmOp::NN).unwrap().to_f32(&g).unwrap(),
        [7.0, 10.0, 15.0, 22.0]
    );
}

#[test]
fn lost_device_is_a_typed_error() {
    let g = gpu();
    let a = GpuMatrix::from_f32(&g, 2, 2, DType::F32, &[1.0; 4]).unwrap();
    g.simulate_device_loss();
    let e = g.wait().unwrap_err();
    assert!(matches!(e, Error::DeviceLost(_)), "{e:?}");
    let e = matmul(&g, &a, &a, GemmOp::NN).unwrap_err();
    assert!(matches!(e, Error::DeviceLost(_)), "{e:?}");
}

#[test]
fn buffer_pool_reuses_and_accounts() {
    let g = gpu();
    let before = g.memory();
    let b1 = g.storage(1 << 20, false).unwrap();
    let live = g.memory().live_bytes;
    assert!(live >= before.live_bytes + (1 << 20));
    drop(b1);
    assert_eq!(g.memory().live_bytes, before.live_bytes);
    assert!(
        g.memory().idle_bytes >= 1 << 20,
        "returned buffer not pooled"
    );
    // Same size class comes from the pool: idle shrinks, nothing new is created.
    let _b2 = g.storage((1 << 20) - 100, false).unwrap();
    assert_eq!(g.memory().idle_bytes, before.idle_bytes);
    assert!(g.memory().peak_bytes >= 1 << 20);
    g.trim();
    assert_eq!(g.memory().idle_bytes, 0);
}

#[test]
fn many_dispatches_in_one_submission() {
    let g = gpu();
    let n = 16;
    let a = GpuMatrix::from_f32(&g, n, n, DType::F32, &random(n * n, 3, 0.0)).unwrap();
    let b = GpuMatrix::from_f32(&g, n, n, DType::F32, &random(n * n, 4, 0.0)).unwrap();
    let c = GpuMatrix::zeros(&g, n, n).unwrap();
    let mut batch = Batch::new(&g);
    for _ in 0..50 {
        pumice::gpu::gemm(&mut batch, &a, &b, GemmOp::NN, &c, true).unwrap();
    }
    assert_eq!(batch.len(), 50);
    batch.submit().unwrap();
    let got = c.to_f32(&g).unwrap();
    let want: Vec<f64> = cpu::gemm_f64(
        &a.to_f32(&g).unwrap(),
        &b.to_f32(&g).unwrap(),
        n,
        n,
        n,
        false,
    )
    .iter()
    .map(|v| v * 50.0)
    .collect();
    assert!(rel_err(&got, &want) < 1e-5);
}

/// An operand larger than the device's real storage-binding limit (128 MiB on lavapipe) is
/// chunked and multiplied correctly.
#[test]
fn operand_larger_than_real_binding_limit() {
    let g = gpu();
    let limit = g.caps().max_binding as usize;
    let k = 4100;
    let m = limit / (4 * k) + 37; // just over one binding of f32 rows
    let a = random(m * k, 11, 0.0);
    let b = random(3 * k, 12, 0.0);
    let ga = GpuMatrix::from_f32(&g, m, k, DType::F32, &a).unwrap();
    assert!(
        ga.chunks().len() >= 2,
        "{} bytes fit one binding of {limit}?",
        m * k * 4
    );
    let gb = GpuMatrix::from_f32(&g, 3, k, DType::F32, &b).unwrap();
    let c = matmul(&g, &ga, &gb, GemmOp::NT)
        .unwrap()
        .to_f32(&g)
        .unwrap();
    let want = cpu::gemm_f64(&a, &b, m, k, 3, true);
    let e = rel_err(&c, &want);
    assert!(e < 1e-5, "rel err {e:.3e}");
}

/// Kernel tuning: measured once (every candidate checked and timed, the fastest kept), then read
/// from the cache; `again` re-measures; a damaged cache file is replaced, never an error; `off`
/// takes the adapter class's defaults; nothing is left under a temporary name.
#[test]
fn kernel_tuning_is_measured_once_then_cached() {
    use pumice::gpu::tune::{
        self, gemm_candidates, gemv_candidates, hessian_candidates, Origin, TuneMode,
    };
    let g = gpu();
    let dir = tempfile::tempdir().unwrap();
    let caps = g.caps().clone();
    let first = tune::tune(&g, TuneMode::Auto, Some(dir.path()));
    let saved = match &first.origin {
        Origin::Measured {
            saved: Some(p),
            seconds,
        } => {
            assert!(*seconds > 0.0);
            p.clone()
        }
        o => panic!("first tuning should measure and save, got {o:?}"),
    };
    let n = gemm_candidates(caps.is_cpu, caps.max_invocations, caps.fixed_subgroup()).len()
        + gemv_candidates(caps.is_cpu, caps.max_invocations, caps.fixed_subgroup()).len()
        + hessian_candidates(caps.is_cpu, caps.max_invocations).len();
    assert_eq!(first.trials.len(), n);
    // The chosen configurations are the fastest of their kind.
    for (kind, chosen) in [
        ("gemm", first.gemm.to_string()),
        ("gemv", first.gemv.to_string()),
        ("hessian", first.hessian.to_string()),
    ] {
        let best = first
            .trials
            .iter()
            .filter(|t| t.kernel == kind && t.median_s.is_some())
            .min_by(|a, b| a.median_s.unwrap().total_cmp(&b.median_s.unwrap()))
            .unwrap();
        assert_eq!(best.config, chosen);
    }
    let cached = tune::tune(&g, TuneMode::Auto, Some(dir.path()));
    assert_eq!(cached.origin, Origin::Cached(saved.clone()));
    assert_eq!(
        (cached.gemm, cached.gemv, cached.hessian),
        (first.gemm, first.gemv, first.hessian)
    );
    assert_eq!(cached.trials, first.trials);

    let again = tune::tune(&g, TuneMode::Again, Some(dir.path()));
    assert!(matches!(again.origin, Origin::Measured { .. }));

    std::fs::write(&saved, "{ not json").unwrap();
    let repaired = tune::tune(&g, TuneMode::Auto, Some(dir.path()));
    assert!(matches!(
        repaired.origin,
        Origin::Measured { saved: Some(_), .. }
    ));
    let reread = tune::tune(&g, TuneMode::Auto, Some(dir.path()));
    assert!(matches!(reread.origin, Origin::Cached(_)));

    let off = tune::tune(&g, TuneMode::Off, Some(dir.path()));
    assert_eq!(off.origin, Origin::Defaults);
    assert_eq!(
        off.gemm,
        gemm_candidates(caps.is_cpu, caps.max_invocations, caps.fixed_subgroup())[0]
    );
    assert_eq!(
        off.gemv,
        gemv_candidates(caps.is_cpu, caps.max_invocations, caps.fixed_subgroup())[0]
    );

    let files: Vec<_> = std::fs::read_dir(saved.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
}

/// `--profile`: GPU time per kernel from timestamps (one entry per kernel, every dispatch
/// counted) where the adapter has timestamp queries; build times always; results unchanged.
#[test]
fn profile_times_every_dispatch_by_kernel() {
    use pumice::gpu::{matmul, Batch, GemmOp, GpuMatrix, HessianAccumulator};
    let mut opts = GpuOptions::from_env().expect("valid PUMICE_* environment");
    opts.profile = true;
    let g = gpu_with(&opts);
    let plain = gpu();
    // Tuning (when this process measures it) is not part of the profile.
    g.tuning();
    assert!(g.profile().gpu.is_empty(), "{:?}", g.profile().gpu);
    let a: Vec<f32> = (0..37 * 29).map(|i| (i % 7) as f32 - 3.0).collect();
    let b: Vec<f32> = (0..29 * 11).map(|i| (i % 5) as f32 - 2.0).collect();
    let product = |gpu: &pumice::gpu::Gpu| {
        let am = GpuMatrix::from_f32(gpu, 37, 29, pumice::DType::F32, &a).unwrap();
        let bm = GpuMatrix::from_f32(gpu, 29, 11, pumice::DType::F32, &b).unwrap();
        matmul(gpu, &am, &bm, GemmOp::NN)
            .unwrap()
            .to_f32(gpu)
            .unwrap()
    };
    assert_eq!(product(&g), product(&plain), "profiling changed a result");
    let mut h = HessianAccumulator::new(&g, 29).unwrap();
    let am = GpuMatrix::from_f32(&g, 37, 29, pumice::DType::F32, &a).unwrap();
    for _ in 0..3 {
        let mut batch = Batch::new(&g);
        h.accumulate(&mut batch, &am).unwrap();
        batch.submit().unwrap();
    }
    let p = g.profile();
    if g.caps().timestamps {
        assert!(g.profiling());
        let count = |k: &str| p.gpu.iter().find(|t| t.kernel == k).map(|t| t.count);
        assert_eq!(count("gemm"), Some(1), "{:?}", p.gpu);
        assert_eq!(count("hessian"), Some(3), "{:?}", p.gpu);
        assert!(p
            .gpu
            .iter()
            .all(|t| t.seconds >= 0.0 && t.seconds.is_finite()));
        // Largest first.
        assert!(p.gpu.windows(2).all(|w| w[0].seconds >= w[1].seconds));
    } else {
        assert!(!g.profiling() && p.gpu.is_empty());
    }
    assert!(plain.profile().gpu.is_empty());
    assert!(!plain.profile().builds.is_empty() || plain.pipelines_built() == 0);
}

/// Row ranges read straight back: across chunk boundaries, 16-bit rows that start halfway
/// into a 4-byte word, an empty range, and a range past the end refused.
#[test]
fn row_ranges_read_back_as_stored() {
    let g = common::gpu_limited(1024);
    for (dtype, rows, cols) in [
        (DType::F32, 37, 13),
        (DType::BF16, 101, 7),
        (DType::F16, 9, 5),
    ] {
        let vals: Vec<f32> = (0..rows * cols).map(|i| (i % 29) as f32 - 14.0).collect();
        let m = GpuMatrix::from_f32(&g, rows, cols, dtype, &vals).unwrap();
        assert!(m.chunks().len() > 1 || dtype == DType::F16, "{dtype}");
        for r in [0..rows, 1..2, 3..rows - 1, 5..5] {
            let got = m.rows_to_f32(&g, r.clone()).unwrap();
            assert_eq!(
                got,
                vals[r.start * cols..r.end * cols],
                "{dtype} rows {r:?}"
            );
        }
        assert!(m.rows_to_f32(&g, rows - 1..rows + 1).is_err());
    }
}
