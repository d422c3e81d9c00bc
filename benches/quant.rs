//! GPTQ on Llama-7B-shaped matrices: W 4096×4096 (attention projection) and 11008×4096 (MLP
//! gate/up), H = XᵀX from synthetic correlated inputs (4096 features). The Hessian preparation
//! (damping, Cholesky and triangular inverse in f64 on the CPU, shared by every matrix that
//! reads the same input) is measured separately from the GPU quantizer.
//!
//! `cargo bench --bench quant`; PUMICE_BACKEND / PUMICE_ADAPTER pick the adapter. Criterion's
//! Gelem/s for `gptq_*` counts weights quantized per second ×10⁻⁹.

use std::time::Duration;

mod support;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pumice::cpu;
use pumice::gpu::quant::gptq;
use pumice::gpu::Gpu;
use pumice::quant::reference::prepare_hessian;
use pumice::quant::{GptqOptions, Grid, GridKind};
use support::values;

/// Inputs with a few dominant directions and outlier channels, like real activations.
fn activations(t: usize, n: usize) -> Vec<f32> {
    let z = values(t * 16, 1);
    let mix = values(16 * n, 2);
    let noise = values(t * n, 3);
    (0..t * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let v: f32 =
                (0..16).map(|k| z[r * 16 + k] * mix[k * n + c]).sum::<f32>() + 0.1 * noise[i];
            if c % 97 == 0 {
                v * 10.0
            } else {
                v
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let g = Gpu::from_env().expect("a GPU adapter (lavapipe works)");
    eprintln!("GPU: {}", g.describe());
    let n = 4096;
    let t = 1024;
    let x = activations(t, n);
    let h: Vec<f64> = cpu::hessian_faer(&x, t, n)
        .into_iter()
        .map(f64::from)
        .collect();
    let opts = GptqOptions::default();
    let grid = Grid::new(4, 128, GridKind::Asymmetric).unwrap();

    let mut group = c.benchmark_group("gptq_prepare_hessian_4096");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function(BenchmarkId::new("cpu-f64", n), |b| {
        b.iter(|| prepare_hessian(&h, n, &opts).unwrap())
    });
    group.finish();

    let prep = prepare_hessian(&h, n, &opts).unwrap();
    for m in [4096usize, 11008] {
        let w = values(m * n, m as u64);
        let mut group = c.benchmark_group(format!("gptq_{m}x{n}"));
        group.throughput(Throughput::Elements((m * n) as u64));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(10));
        group.bench_function(BenchmarkId::new("gpu", "4bit-g128"), |b| {
            b.iter(|| {
                let q = gptq(&g, &w, m, n, &prep, grid, opts.block).unwrap();
                g.wait().unwrap();
                q
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
