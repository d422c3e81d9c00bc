//! Model input: Hugging Face checkpoints (config.json, safetensors single or sharded, memory
//! mapped), their typed architecture, and tokenizer.json. Nothing here touches the GPU.

pub mod arch;
pub mod checkpoint;
pub mod compressed;
pub mod config;
pub mod exits;
pub mod safetensors;
pub mod summary;
pub mod synthetic;
pub mod tokenizer;

pub use arch::{Architecture, InputGroup, LayerSpec, LinearKind, LinearSpec, TensorSpec};
pub use checkpoint::{Checkpoint, TensorRef};
pub use config::{Family, ModelConfig, RopeConfig, RopeScaling};
pub use summary::ModelSummary;
pub use tokenizer::Tokenizer;
