//! Running models: the streamed forward pass ([`Engine`]), the evaluation protocol
//! ([`eval`]: perplexity, KL divergence against a reference) and generation ([`generate`]).
//! Uses `gpu` ops only; never wgpu directly.

pub mod engine;
pub mod eval;
pub mod generate;
pub(crate) mod weights;

pub use engine::{Engine, EngineOptions, KvCache};
