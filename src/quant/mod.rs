//! Quantization: uniform grids and bit packing ([`grid`]), CPU f64 references of Hessian
//! preparation, RTN and GPTQ ([`reference`]). The GPU quantizers live in `gpu::quant`.

pub mod grid;
pub mod kquant;
pub mod reference;
pub mod rht;
pub mod sparsity;

pub use grid::{Grid, GridKind};
pub use reference::{GptqOptions, PreparedHessian, Quantized};

/// Deterministic pseudo-random values in [-1, 1) for the unit tests of this module.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
