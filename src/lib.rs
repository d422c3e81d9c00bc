//! pumice: make large language models small enough for the hardware people have, on whatever
//! GPU is in the machine (wgpu: Vulkan, Metal, DX12, GL).
//!
//! See ARCHITECTURE.md for the module map and the invariants.

pub mod base;
pub mod bench;
pub mod budget;
pub mod compress;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod format;
pub mod gpu;
pub mod infer;
pub mod interrupt;
pub mod lowrank;
pub mod model;
pub mod quant;
pub mod text;
pub mod train;

pub use dtype::DType;
pub use error::{Error, Result};
