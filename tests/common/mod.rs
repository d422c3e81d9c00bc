//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use pumice::gpu::{Gpu, GpuOptions};

/// Open the GPU the environment selects (PUMICE_BACKEND / PUMICE_ADAPTER). GPU tests must fail,
/// never skip, when no adapter exists, so this panics with the reason.
pub fn gpu_with(opts: &GpuOptions) -> Gpu {
    match Gpu::new(opts) {
        Ok(g) => {
            static ONCE: OnceLock<()> = OnceLock::new();
            // Written to the real stderr (the harness captures eprintln!) so every test run names
            // its adapter.
            ONCE.get_or_init(|| {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "GPU tests run on adapter: {}", g.describe());
            });
            g
        }
        Err(e) => panic!("GPU tests need an adapter (install mesa-vulkan-drivers for lavapipe): {e}"),
    }
}

pub fn gpu() -> Gpu {
    gpu_with(&GpuOptions::from_env().expect("valid PUMICE_* environment"))
}

/// A GPU whose bindings are artificially limited to `bytes`, to force chunking.
pub fn gpu_limited(bytes: u64) -> Gpu {
    let mut opts = GpuOptions::from_env().expect("valid PUMICE_* environment");
    opts.max_binding_bytes = Some(bytes);
    gpu_with(&opts)
}

/// Deterministic pseudo-random values (xorshift), uniform in [-1, 1) plus `bias`.
pub fn random(n: usize, seed: u64, bias: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + bias
        })
        .collect()
}

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// ../shared beside the project, if present.
pub fn shared() -> Option<PathBuf> {
    let p = project_root().join("..").join("shared");
    p.is_dir().then_some(p)
}

/// Relative max-norm error of `got` against an f64 reference.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
        / scale
}
