//! The compression pipeline: calibrate, then for each decoder layer in turn collect the
//! Hessians of its linear inputs on the GPU, quantize, and propagate the calibration
//! activations through the *quantized* layer (sequential mode), streaming the result into a
//! compressed checkpoint that is renamed into place only when complete.
//!
//! Within a layer the order is the true-sequential one: q/k/v see the normed input; o_proj sees
//! the attention output computed with quantized q/k/v; gate/up see the post-attention norm of
//! the updated residual; down_proj sees the SwiGLU product of quantized gate/up.
//!
//! Files by stage: `options` (what is asked, what is reported), `checks` (before any GPU
//! work), `job` (engine, calibration, shards, fingerprint), `layer` (one layer's work),
//! `layout` (the stored form), `output` (the checkpoint being written), `run` (`compress`),
//! `merge`, `hessians`.

mod checks;
mod hessians;
mod job;
mod layer;
mod layout;
mod matrix;
mod merge;
mod options;
mod output;
mod run;
mod spread;

pub use hessians::{collect_hessians, collect_hessians_on, HessianDevice, HessiansSummary};
pub use job::shard_layers;
pub(crate) use layer::{
    accumulate_hessian, calibration_batches, compress_layer, CalibBatches, LayerInput, LayerShared,
};
pub(crate) use layout::pack;
pub(crate) use layout::planned_entries;
pub use layout::planned_linear_bits;
pub use merge::merge;
pub use options::{
    CalderaSettings, CalibSource, CompressOptions, CompressSummary, DeviceUse, Event, LayerRecipe,
    Method, StageTimes,
};
pub use output::{peak_rss_bytes, source_info};
pub use run::{compress, compress_on};
