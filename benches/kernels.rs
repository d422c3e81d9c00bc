//! GEMM and Hessian accumulation on the selected GPU adapter, each beside the same operation on
//! the CPU with faer, in the same run.
//!
//! `cargo bench --bench kernels` (PUMICE_BACKEND / PUMICE_ADAPTER pick the adapter). Criterion
//! reports each as throughput in Gelem/s where one element is one floating-point operation, i.e.
//! GFLOP/s; a summary table of medians and GPU/CPU ratios is printed at the end.
//!
//! Shapes:
//! - `gemm_1024`: C[1024×1024] = A[1024×1024]·B[1024×1024] (2·1024³ flop)
//! - `linear_4096x4096x512`: a Llama-7B attention projection on 512 tokens,
//!   Y[512×4096] = X[512×4096]·Wᵀ, W [4096×4096] (2·512·4096² flop)
//! - `hessian_4096`: H += XᵀX for X [512 tokens × 4096 features]; counted as the
//!   512·4096·4097 flop of the symmetric result (the GPU computes the upper triangle, faer the
//!   full product, so the ratio is one of times for the same answer).

use std::time::Duration;

mod support;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pumice::gpu::{gemm, Batch, GemmOp, Gpu, GpuMatrix, HessianAccumulator};
use pumice::{cpu, DType};
use support::values;

fn open_gpu() -> Gpu {
    let g = Gpu::from_env().expect("benchmarks need a GPU adapter (lavapipe works)");
    eprintln!("GPU: {}", g.describe());
    g
}

struct GemmCase {
    id: &'static str,
    m: usize,
    k: usize,
    n: usize,
    op: GemmOp,
}

const GEMM_CASES: [GemmCase; 2] = [
    GemmCase {
        id: "gemm_1024",
        m: 1024,
        k: 1024,
        n: 1024,
        op: GemmOp::NN,
    },
    GemmCase {
        id: "linear_4096x4096x512",
        m: 512,
        k: 4096,
        n: 4096,
        op: GemmOp::NT,
    },
];

fn bench_gemm(c: &mut Criterion) {
    let g = open_gpu();
    for case in &GEMM_CASES {
        let (m, k, n) = (case.m, case.k, case.n);
        let flop = 2 * m * k * n;
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let (br, bc) = match case.op {
            GemmOp::NN => (k, n),
            GemmOp::NT => (n, k),
        };
        let ga = GpuMatrix::from_f32(&g, m, k, DType::F32, &a).unwrap();
        let gb = GpuMatrix::from_f32(&g, br, bc, DType::F32, &b).unwrap();
        let gc = GpuMatrix::uninit(&g, m, n).unwrap();
        let mut group = c.benchmark_group(case.id);
        group.throughput(Throughput::Elements(flop as u64));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(8));
        group.bench_function(BenchmarkId::new("gpu", "f32"), |bench| {
            bench.iter(|| {
                let mut batch = Batch::new(&g);
                gemm(&mut batch, &ga, &gb, case.op, &gc, false).unwrap();
                batch.submit().unwrap();
                g.wait().unwrap();
            })
        });
        // Weights stored as bf16 (how checkpoints arrive), converted inside the kernel.
        let gb16 = GpuMatrix::from_f32(&g, br, bc, DType::BF16, &b).unwrap();
        group.bench_function(BenchmarkId::new("gpu", "bf16-weights"), |bench| {
            bench.iter(|| {
                let mut batch = Batch::new(&g);
                gemm(&mut batch, &ga, &gb16, case.op, &gc, false).unwrap();
                batch.submit().unwrap();
                g.wait().unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("cpu-faer", "f32"), |bench| {
            bench.iter(|| cpu::gemm_faer(&a, &b, m, k, n, case.op == GemmOp::NT))
        });
        group.finish();
    }
}

fn bench_hessian(c: &mut Criterion) {
    let g = open_gpu();
    let (t, f) = (512usize, 4096usize);
    let flop = t * f * (f + 1);
    let x = values(t * f, 3);
    let gx = GpuMatrix::from_f32(&g, t, f, DType::F32, &x).unwrap();
    let mut acc = HessianAccumulator::new(&g, f).unwrap();
    let mut group = c.benchmark_group("hessian_4096");
    group.throughput(Throughput::Elements(flop as u64));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.bench_function(BenchmarkId::new("gpu", "f32"), |bench| {
        bench.iter(|| {
            let mut batch = Batch::new(&g);
            acc.accumulate(&mut batch, &gx).unwrap();
            batch.submit().unwrap();
            g.wait().unwrap();
        })
    });
    group.bench_function(BenchmarkId::new("cpu-faer", "f32"), |bench| {
        bench.iter(|| cpu::hessian_faer(&x, t, f))
    });
    group.finish();
}

/// Median time (ns) criterion recorded for one benchmark in this run.
fn median_ns(group: &str, func: &str, param: &str) -> Option<f64> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let p = dir
        .join("criterion")
        .join(group)
        .join(func)
        .join(param)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn summary(_c: &mut Criterion) {
    let rows: Vec<(&str, usize)> = GEMM_CASES
        .iter()
        .map(|c| (c.id, 2 * c.m * c.k * c.n))
        .chain(std::iter::once(("hessian_4096", 512 * 4096 * 4097)))
        .collect();
    println!(
        "\n{:<24} {:>14} {:>20} {:>14} {:>10}",
        "operation", "GPU GFLOP/s", "GPU bf16-w GFLOP/s", "faer GFLOP/s", "GPU/faer"
    );
    for (id, flop) in rows {
        let gf = |ns: Option<f64>| ns.map(|t| flop as f64 / t);
        let gpu = gf(median_ns(id, "gpu", "f32"));
        let gpu16 = gf(median_ns(id, "gpu", "bf16-weights"));
        let cpu = gf(median_ns(id, "cpu-faer", "f32"));
        let fmt = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        let ratio = match (gpu, cpu) {
            (Some(a), Some(b)) => format!("{:.3}", a / b),
            _ => "-".into(),
        };
        println!(
            "{id:<24} {:>14} {:>20} {:>14} {:>10}",
            fmt(gpu),
            fmt(gpu16),
            fmt(cpu),
            ratio
        );
    }
    println!("(medians of this run; GFLOP/s = flop / median time)");
}

criterion_group!(benches, bench_gemm, bench_hessian, summary);
criterion_main!(benches);
