//! Quantization: uniform grids and bit packing ([`grid`]), CPU f64 references of Hessian
//! preparation, RTN and GPTQ ([`reference`]). The GPU quantizers live in `gpu::quant`.

pub mod grid;
pub mod reference;
pub mod rht;

pub use grid::Grid;
pub use reference::{GptqOptions, PreparedHessian, Quantized};
