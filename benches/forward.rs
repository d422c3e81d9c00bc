//! Forward-pass throughput: evaluation tokens/s on the asset model, and one decoder layer of
//! Llama-2-7B shape (hidden 4096, intermediate 11008, 32 heads; synthetic bf16 weights) in
//! GFLOP/s. `cargo bench --bench forward`; PUMICE_BACKEND / PUMICE_ADAPTER pick the adapter.
//!
//! Throughput is reported by criterion in Gelem/s: one element is one token for `eval_*`, one
//! floating-point operation for `llama2_7b_layer` (so Gelem/s = GFLOP/s).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pumice::gpu::Gpu;
use pumice::infer::eval::{evaluate, EvalOptions};
use pumice::infer::{Engine, EngineOptions};
use pumice::model::synthetic::SyntheticLlama;
use pumice::model::Checkpoint;

fn ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761) % vocab as u64) as u32)
        .collect()
}

fn bench_eval(c: &mut Criterion) {
    let g = Gpu::from_env().expect("a GPU adapter (lavapipe works)");
    eprintln!("GPU: {}", g.describe());
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/gutenberg-llama");
    let ck = Checkpoint::open(&dir).unwrap();
    let (ctx, windows) = (256, 8);
    let tokens = ids(ctx * windows, ck.config().vocab_size);
    let mut engine = Engine::new(
        &g,
        &ck,
        &EngineOptions {
            max_positions: ctx,
            ..Default::default()
        },
    )
    .unwrap();
    let mut group = c.benchmark_group("eval_gutenberg_llama");
    group.throughput(Throughput::Elements((ctx * windows) as u64));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    group.bench_function(BenchmarkId::new("ctx256", "batch8"), |b| {
        b.iter(|| {
            evaluate(
                &mut engine,
                None,
                &tokens,
                &EvalOptions {
                    ctx,
                    max_windows: None,
                    batch: 8,
                },
                &mut |_| {},
            )
            .unwrap()
        })
    });
    group.finish();
}

fn bench_7b_layer(c: &mut Criterion) {
    let g = Gpu::from_env().expect("a GPU adapter (lavapipe works)");
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticLlama::llama2_7b_layers(1);
    spec.write(tmp.path()).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let t = 256;
    let tokens = ids(t, spec.vocab);
    let mut engine = Engine::new(
        &g,
        &ck,
        &EngineOptions {
            max_positions: t,
            ..Default::default()
        },
    )
    .unwrap();
    // Linear layers 2·params·T plus attention (QKᵀ and PV over the causal half).
    let layer_params = ck.arch().linear_parameter_count();
    let flop = 2 * layer_params * t + 2 * 2 * (t * (t + 1) / 2) * spec.hidden;
    let mut group = c.benchmark_group("llama2_7b_layer");
    group.throughput(Throughput::Elements(flop as u64));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20));
    group.bench_function(BenchmarkId::new("tokens", t), |b| {
        b.iter(|| {
            let h = engine.hidden_states(&tokens, t).unwrap();
            g.wait().unwrap();
            h
        })
    });
    group.finish();
}

criterion_group!(benches, bench_eval, bench_7b_layer);
criterion_main!(benches);
