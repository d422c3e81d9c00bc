//! On-device adaptation: fine-tuning a (compressed) model on the GPU.
//!
//! `model` holds the frozen weights and runs the forward and backward passes (layer-wise
//! recomputation); `params` the trainable adapters (CALDERA's factors, LoRA) and AdamW.
//! Invariant: every gradient is composed of `gpu`'s backward kernels, each checked against
//! its f64 reference; the whole composition is checked against finite differences of
//! `cpu::train`'s f64 loss (tests/train.rs).

pub mod finetune;
pub mod model;
mod output;
pub mod params;
pub mod store;
pub mod workdir;

pub use finetune::{finetune, Data, Event, FinetuneOptions, FinetuneReport, Loss};
pub use model::{AdapterPlan, TrainModel};
pub use params::{Adapter, Param, StepInfo, Trainable};
