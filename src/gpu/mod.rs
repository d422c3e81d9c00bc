//! The GPU runtime: the only module that touches wgpu.
//!
//! - [`adapter`]: enumerate adapters on every backend, select one (`--backend`, `--adapter`).
//! - [`Gpu`] (context.rs): the device with its real limits and optional features, error scopes
//!   and the device-lost callback mapped to [`crate::Error`], buffer creation and readback.
//! - [`buffer`]: the buffer pool and memory accounting.
//! - [`pipeline`]: WGSL templates specialized by substitution, pipelines cached per variant.
//! - [`Batch`]: many dispatches per submission.
//! - [`GpuMatrix`]: row-major matrices split into binding-sized row chunks.
//! - [`tune`]: kernel configurations per adapter, timed at first use and cached.
//! - [`profile`]: GPU time per kernel (timestamps) and pipeline build time.
//! - kernels: [`gemm`], [`hessian`], the transformer ops in [`ops`], their gradients and the
//!   optimizer in [`grad`], linear and low-rank (LoRA, CALDERA factor) gradients in
//!   [`linear_grad`], attention's in [`attn_grad`], the LM head's loss and gradient in blocks of positions in [`xent`].

pub mod adapter;
pub mod attn_grad;
mod batch;
pub mod buffer;
mod context;
pub mod gemm;
pub mod grad;
pub mod hessian;
pub mod linear_grad;
mod matrix;
mod operand;
pub mod ops;
pub mod pipeline;
pub mod profile;
pub mod quant;
mod reduce;
mod rope;
pub mod tune;
pub mod xent;

pub use adapter::{
    device_options, list_adapters, AdapterReport, AdapterSelector, BackendChoice, DeviceSet,
    GpuOptions,
};
pub use batch::Batch;
pub use buffer::{GpuBuffer, MemoryStats};
pub use context::{Caps, Gpu};
pub use gemm::{
    gemm, gemm_region, gemm_rows, gemm_scaled, gemm_with_config, matmul, GemmConfig, GemmOp,
};
pub use hessian::{HessianAccumulator, HessianConfig};
pub use matrix::{Chunk, GpuMatrix};
pub use tune::{TuneMode, Tuning};
