//! What `pumice inspect` reports about a checkpoint.

use serde::Serialize;

use super::arch::{InputGroup, LinearKind};
use super::checkpoint::Checkpoint;
use super::config::{Family, RopeConfig};

#[derive(Clone, Debug, Serialize)]
pub struct LinearGroupSummary {
    pub input: InputGroup,
    pub in_features: usize,
    pub linears: Vec<LinearKind>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub path: String,
    pub architecture: String,
    pub family: Family,
    pub parameters: usize,
    /// Parameters in the decoder layers' linear weights (what compression acts on).
    pub linear_parameters: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub dtype: String,
    pub bytes_on_disk: u64,
    pub files: Vec<String>,
    pub tokenizer: bool,
    /// Linear layers of each decoder layer grouped by the input they share (one Hessian each).
    pub linear_groups: Vec<LinearGroupSummary>,
    /// Bits stored per parameter, whole safetensors file(s) over all parameters.
    pub bits_per_parameter: f64,
    /// Bits stored per parameter of the decoder linear layers.
    pub linear_bits_per_parameter: f64,
    /// For a pumice-compressed checkpoint: method, parameters, source and calibration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<serde_json::Value>,
    /// Depths of Edge-LLM's exits stored with the model (their bytes are in bytes_on_disk).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exits: Vec<usize>,
}

impl ModelSummary {
    pub fn of(ck: &Checkpoint) -> ModelSummary {
        let c = ck.config();
        let linear_groups = ck
            .arch()
            .layers
            .first()
            .map(|l| {
                l.groups()
                    .into_iter()
                    .map(|(g, ls)| LinearGroupSummary {
                        input: g,
                        in_features: ls.first().map(|l| l.in_features).unwrap_or(0),
                        linears: ls.iter().map(|l| l.kind).collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ModelSummary {
            path: ck.dir().display().to_string(),
            architecture: c.architecture.clone(),
            family: c.family,
            parameters: ck.parameter_count(),
            linear_parameters: ck.arch().linear_parameter_count(),
            layers: c.num_layers,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_heads,
            num_key_value_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings,
            rms_norm_eps: c.rms_norm_eps,
            rope: c.rope.clone(),
            tie_word_embeddings: c.tie_word_embeddings,
            attention_bias: c.attention_bias,
            dtype: ck.dtype().to_string(),
            bytes_on_disk: ck.bytes_on_disk(),
            files: ck
                .files()
                .iter()
                .map(|f| {
                    f.path()
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .chain(ck.exits().map(|_| super::exits::EXITS_FILE.to_string()))
                .collect(),
            tokenizer: ck.dir().join(super::tokenizer::TOKENIZER_FILE).is_file(),
            linear_groups,
            bits_per_parameter: ck.bytes_on_disk() as f64 * 8.0
                / ck.parameter_count().max(1) as f64,
            linear_bits_per_parameter: match ck.manifest() {
                Some(m) => m.linear.bits_per_parameter,
                None => (ck.dtype().size() * 8) as f64,
            },
            compression: ck.manifest().map(|m| {
                serde_json::json!({
                    "format_version": m.format_version,
                    "method": m.method,
                    "params": m.params,
                    "source": m.source,
                    "calibration": m.calibration,
                    "linear": m.linear,
                    "total": m.total,
                })
            }),
            exits: ck.exits().map(|e| e.depths().to_vec()).unwrap_or_default(),
        }
    }
}
