//! What a compression is asked to do (methods, recipes, options) and what it reports
//! (events, the summary).

use std::path::PathBuf;

use serde::Serialize;

use crate::error::Result;
use crate::format::FormatKind;
use crate::model::compressed::{CalibInfo, LayerReport};
use crate::quant::sparsity::Sparsity;
use crate::quant::{GptqOptions, Grid, GridKind};

use crate::compress::calib::CalibOptions;

/// Quantization method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Gptq,
    /// W ≈ Q + L·R (Q by GPTQ on `grid`, factors on their own grid).
    Caldera,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Caldera => "caldera",
        }
    }
}

/// CALDERA settings (used with [`Method::Caldera`]).
#[derive(Clone, Debug)]
pub struct CalderaSettings {
    /// Bits per weight each matrix may use, everything stored counted; picks the rank.
    pub target_bpw: f64,
    /// A fixed rank instead of the budget.
    pub rank: Option<usize>,
    pub lr_bits: u32,
    pub lr_group_size: usize,
    pub outer_iters: usize,
    pub inner_iters: usize,
    /// Early stop after this many outer iterations without progress (0: never).
    pub patience: usize,
    /// Least-squares clip search for the L and R grids.
    pub clip: bool,
    /// Where the low-rank step's products run (`--lowrank-on`).
    pub placement: crate::lowrank::fit::Placement,
}

impl Default for CalderaSettings {
    fn default() -> Self {
        CalderaSettings {
            target_bpw: 2.5,
            rank: None,
            lr_bits: 4,
            lr_group_size: 64,
            outer_iters: 15,
            inner_iters: 10,
            patience: 0,
            clip: true,
            placement: crate::lowrank::fit::Placement::Auto,
        }
    }
}

impl CalderaSettings {
    pub fn lr_grid(&self) -> Result<Grid> {
        Ok(Grid::new(self.lr_bits, self.lr_group_size, GridKind::Asymmetric)?.with_clip(self.clip))
    }

    /// Rank for an m × n matrix with backbone grid `q`.
    pub fn rank_for(&self, q: &Grid, m: usize, n: usize) -> Result<usize> {
        Ok(match self.rank {
            Some(k) => k.min(m).min(n),
            None => {
                crate::lowrank::caldera::rank_for_budget(q, &self.lr_grid()?, m, n, self.target_bpw)
            }
        })
    }
}

/// Where calibration text comes from.
#[derive(Clone, Debug)]
pub enum CalibSource {
    /// Text files or directories of .txt files.
    Text(Vec<PathBuf>),
    /// Sequences sampled from the model itself.
    SelfGenerated,
}

/// What one decoder layer gets: method, backbone grid, CALDERA settings.
#[derive(Clone, Debug)]
pub struct LayerRecipe {
    pub method: Method,
    pub grid: Grid,
    pub caldera: CalderaSettings,
    /// Pruning (gptq only).
    pub sparsity: Sparsity,
}

#[derive(Clone, Debug)]
pub struct CompressOptions {
    /// Per-layer recipes (from an allocation); empty: every layer gets `method`, `grid`,
    /// `caldera`.
    pub layers: Vec<LayerRecipe>,
    /// Recorded in the manifest when `layers` came from an allocation.
    pub allocation: Option<serde_json::Value>,
    /// Pruning of every layer (gptq only; per layer in `layers`).
    pub sparsity: Sparsity,
    pub method: Method,
    pub grid: Grid,
    pub gptq: GptqOptions,
    pub calib_source: CalibSource,
    pub calib: CalibOptions,
    pub caldera: CalderaSettings,
    pub output: PathBuf,
    /// Replace an existing output directory (never the input).
    pub force: bool,
    /// Incoherence processing: quantize T_m W T_nᵀ against T_n H T_nᵀ (randomized Hadamard
    /// transforms, seeds stored, undone at load).
    pub rht: bool,
    /// Hessians saved by [`collect_hessians`] instead of a calibration pass (layers are then
    /// independent: nothing propagates through quantized layers).
    pub hessians: Option<PathBuf>,
    /// Keep each finished layer here (atomic files) so an interrupted run resumes.
    pub work_dir: Option<PathBuf>,
    /// Continue the job in `work_dir` (a fresh one starts if it holds none).
    pub resume: bool,
    /// Compress only shard `(i, n)`'s layers into `work_dir` (needs `hessians`); [`merge`]
    /// writes the output. `output` and `force` are then unused.
    pub shard: Option<(usize, usize)>,
    /// The output's format (checked against every planned weight before any GPU work).
    pub format: FormatKind,
    /// Dtype of a dense output (default: the source's) or of a GGUF adapter's factors.
    pub dtype: Option<crate::format::StoreType>,
}

impl CompressOptions {
    /// The recipe of decoder layer `l`.
    pub fn recipe(&self, l: usize) -> LayerRecipe {
        self.layers.get(l).cloned().unwrap_or_else(|| LayerRecipe {
            method: self.method,
            grid: self.grid,
            caldera: self.caldera.clone(),
            sparsity: self.sparsity,
        })
    }
}

/// Progress events.
#[derive(Clone, Debug)]
pub enum Event {
    Calibrating {
        kind: &'static str,
        done: usize,
        total: usize,
    },
    Matrix {
        layer: usize,
        name: String,
        done: usize,
        total: usize,
        relative_error: Option<f64>,
    },
    /// A decoder layer finished (`done` of `total` this run compresses).
    Layer {
        layer: usize,
        done: usize,
        total: usize,
        seconds: f64,
    },
    Note(String),
    Writing,
}

/// Where a compression's wall time went, seconds. Layers finished by an earlier run count in
/// none of them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageTimes {
    /// Up to the first layer: the checks, then sampling or reading the calibration text and
    /// embedding it (or reading saved activations or Hessians).
    pub calibration: f64,
    /// Accumulating every linear input's Hessian XᵀX.
    pub hessians: f64,
    /// Quantizing (GPTQ/RTN/CALDERA), packing, and putting the compressed weights in place.
    pub quantization: f64,
    /// Running each layer forward (what the next stage and layer see), per layer the rest.
    pub propagation: f64,
    /// Writing the work directory and the output.
    pub writing: f64,
    /// Where the Hessians were accumulated ("host" or "gpu"; absent when they were read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hessians_on: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompressSummary {
    pub output: String,
    pub method: String,
    pub source_bytes: u64,
    pub output_bytes: u64,
    pub parameters: usize,
    pub bits_per_parameter: f64,
    pub linear_bits_per_parameter: f64,
    pub seconds: f64,
    /// The wall time by stage.
    pub stages: StageTimes,
    pub calibration: CalibInfo,
    pub layers: Vec<LayerReport>,
    /// Set for a shard: which one and its layers (the sizes then cover those layers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// Peak resident memory of the process (Linux), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Peak GPU memory in pumice's buffers, bytes.
    pub peak_gpu_bytes: u64,
    /// Shader build time per kernel, and GPU time per kernel with `--profile` (the first
    /// adapter's).
    pub kernels: crate::gpu::profile::ProfileReport,
    /// Each adapter's share: the layers it computed and its busy time. With several adapters
    /// the stage times above sum every adapter's, so they can exceed the wall time.
    pub devices: Vec<DeviceUse>,
}

/// What one adapter did in a run.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceUse {
    /// "name (backend)".
    pub adapter: String,
    /// The layers it computed (in the order it finished them).
    pub layers: Vec<usize>,
    /// Matrices it quantized where each group's matrices were spread over the adapters
    /// (without saved Hessians; 0 otherwise).
    pub matrices: usize,
    /// Wall seconds it spent on its layers and matrices.
    pub seconds: f64,
}

impl DeviceUse {
    /// An adapter that has done nothing yet.
    pub fn new(adapter: String) -> DeviceUse {
        DeviceUse {
            adapter,
            layers: Vec::new(),
            matrices: 0,
            seconds: 0.0,
        }
    }
}
