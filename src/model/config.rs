//! config.json of a Hugging Face causal LM (Llama, Mistral, Qwen2 families).

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Model families pumice implements. They share the Llama decoder layout and differ in biases
/// and defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
}

pub const SUPPORTED_ARCHITECTURES: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The parsed, validated configuration.
#[derive(Clone, Debug, Serialize)]
pub struct ModelConfig {
    pub architecture: String,
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (and o for Llama with `attention_bias`).
    pub attention_bias: bool,
    /// Bias on o_proj as well (Llama's `attention_bias` covers all four; Qwen2 only q/k/v).
    pub o_proj_bias: bool,
    pub mlp_bias: bool,
    /// `dtype` (transformers ≥ 5) or `torch_dtype`, if given.
    pub dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub sliding_window: Option<usize>,
}

struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| {
                    self.err(format!("field `{key}` must be a positive integer, got {v}"))
                }),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("missing required field `{key}`")))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be a finite number, got {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be a string, got {v}"))),
        }
    }
}

impl ModelConfig {
    /// Read and validate `path` (a config.json).
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse config text; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: PathBuf::from(path),
            source,
        })?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config(path, "expected a JSON object at the top level"))?;
        let f = Fields { path, obj };

        let arch_list = f.get("architectures").and_then(Value::as_array);
        let architecture = match arch_list.and_then(|a| a.first()).and_then(Value::as_str) {
            Some(a) => a.to_string(),
            None => f
                .str_opt("model_type")?
                .ok_or_else(|| {
                    f.err("missing required field `architectures` (or `model_type`)".into())
                })?
                .to_string(),
        };
        let family = match architecture.as_str() {
            "LlamaForCausalLM" | "llama" => Family::Llama,
            "MistralForCausalLM" | "mistral" => Family::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Family::Qwen2,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                    supported: SUPPORTED_ARCHITECTURES,
                })
            }
        };

        // Upper bounds far above any real model, checked before anything is sized from these
        // values (a hostile config.json must not make pumice allocate or overflow).
        let bounded = |key: &str, v: usize, max: usize| -> Result<usize> {
            if v > max {
                Err(f.err(format!(
                    "field `{key}` = {v} is implausibly large (at most {max})"
                )))
            } else {
                Ok(v)
            }
        };
        let hidden_size = bounded("hidden_size", f.usize_req("hidden_size")?, 1 << 17)?;
        let intermediate_size = bounded(
            "intermediate_size",
            f.usize_req("intermediate_size")?,
            1 << 20,
        )?;
        let num_layers = bounded("num_hidden_layers", f.usize_req("num_hidden_layers")?, 4096)?;
        let num_heads = bounded(
            "num_attention_heads",
            f.usize_req("num_attention_heads")?,
            4096,
        )?;
        let num_kv_heads = bounded(
            "num_key_value_heads",
            f.usize_opt("num_key_value_heads")?.unwrap_or(num_heads),
            4096,
        )?;
        let vocab_size = bounded("vocab_size", f.usize_req("vocab_size")?, 1 << 24)?;
        if num_heads % num_kv_heads != 0 {
            return Err(f.err(format!(
                "num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(h) => bounded("head_dim", h, 1024)?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(f.err(format!(
                    "no `head_dim` and hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        let max_position_embeddings = bounded(
            "max_position_embeddings",
            f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            1 << 24,
        )?;
        let rms_norm_eps = f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(f.err(format!("rms_norm_eps must be positive, got {rms_norm_eps}")));
        }
        match f.str_opt("hidden_act")?.unwrap_or("silu") {
            "silu" | "swish" => {}
            other => {
                return Err(f.err(format!("hidden_act `{other}` is not supported (only silu)")))
            }
        }

        let rope = parse_rope(&f)?;
        let tie_word_embeddings = f.bool_opt("tie_word_embeddings")?.unwrap_or(false);
        let (attention_bias, o_proj_bias) = match family {
            // Qwen2 always has q/k/v biases and none on o_proj.
            Family::Qwen2 => (true, false),
            Family::Mistral => (false, false),
            Family::Llama => {
                let b = f.bool_opt("attention_bias")?.unwrap_or(false);
                (b, b)
            }
        };
        let mlp_bias = match family {
            Family::Llama => f.bool_opt("mlp_bias")?.unwrap_or(false),
            _ => false,
        };
        let dtype = match f.str_opt("dtype")?.or(f.str_opt("torch_dtype")?) {
            None => None,
            Some(s) => Some(DType::from_torch(s).ok_or_else(|| {
                f.err(format!(
                    "dtype `{s}` is not supported (float32, float16 or bfloat16)"
                ))
            })?),
        };
        let bos_token_id = f
            .get("bos_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32);
        let eos_token_ids = match f.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        };
        let sliding_window = match family {
            Family::Mistral | Family::Qwen2 => {
                let enabled = f
                    .bool_opt("use_sliding_window")?
                    .unwrap_or(family == Family::Mistral);
                if enabled {
                    f.usize_opt("sliding_window")?
                } else {
                    None
                }
            }
            Family::Llama => None,
        };
        Ok(ModelConfig {
            architecture,
            family,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope,
            tie_word_embeddings,
            attention_bias,
            o_proj_bias,
            mlp_bias,
            dtype,
            bos_token_id,
            eos_token_ids,
            sliding_window,
        })
    }
}

impl ModelConfig {
    /// Inverse RoPE frequency of each of the head_dim/2 rotation pairs, with the configured
    /// scaling, computed in f32 as transformers computes it.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope.theta as f32;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope.scaling {
            RopeScaling::Default => inv,
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                inv.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect()
            }
        }
    }
}

/// RoPE from either `rope_parameters` (transformers ≥ 5) or top-level `rope_theta` plus
/// `rope_scaling` (earlier versions).
fn parse_rope(f: &Fields<'_>) -> Result<RopeConfig> {
    let (theta, params) = match f.get("rope_parameters") {
        Some(Value::Object(p)) => {
            let sub = Fields {
                path: f.path,
                obj: p,
            };
            let theta = match sub.f64_opt("rope_theta")? {
                Some(t) => t,
                None => f.f64_opt("rope_theta")?.unwrap_or(10000.0),
            };
            (theta, Some(p))
        }
        Some(other) => {
            return Err(f.err(format!(
                "field `rope_parameters` must be an object, got {other}"
            )))
        }
        None => {
            let theta = f.f64_opt("rope_theta")?.unwrap_or(10000.0);
            match f.get("rope_scaling") {
                Some(Value::Object(p)) => (theta, Some(p)),
                Some(other) => {
                    return Err(f.err(format!(
                        "field `rope_scaling` must be an object or null, got {other}"
                    )))
                }
                None => (theta, None),
            }
        }
    };
    if theta <= 0.0 {
        return Err(f.err(format!("rope_theta must be positive, got {theta}")));
    }
    let scaling = match params {
        None => RopeScaling::Default,
        Some(p) => {
            let sub = Fields {
                path: f.path,
                obj: p,
            };
            let kind = sub
                .str_opt("rope_type")?
                .or(sub.str_opt("type")?)
                .unwrap_or("default");
            let factor = || {
                sub.f64_opt("factor")?
                    .filter(|x| *x > 0.0)
                    .ok_or_else(|| f.err(format!("rope type `{kind}` needs a positive `factor`")))
            };
            match kind {
                "default" => RopeScaling::Default,
                "linear" => RopeScaling::Linear { factor: factor()? },
                "llama3" => RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: sub.f64_opt("low_freq_factor")?.unwrap_or(1.0),
                    high_freq_factor: sub.f64_opt("high_freq_factor")?.unwrap_or(4.0),
                    original_max_position_embeddings: sub
                        .usize_opt("original_max_position_embeddings")?
                        .unwrap_or(8192),
                },
                other => {
                    return Err(f.err(format!(
                        "rope type `{other}` is not supported (default, linear, llama3)"
                    )))
                }
            }
        }
    };
    Ok(RopeConfig { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512"#;

    #[test]
    fn old_style_rope_and_defaults() {
        let c = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0,
               "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
               "torch_dtype": "bfloat16"}}"#
        ))
        .unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rope.theta, 500000.0);
        assert!(matches!(c.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.dtype, Some(DType::BF16));
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn new_style_rope_parameters() {
        let c = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "dtype": "float32",
               "rope_parameters": {{"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}}}}"#
        ))
        .unwrap();
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.dtype, Some(DType::F32));
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let c = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}}}"#
        ))
        .unwrap();
        assert!(c.attention_bias && !c.o_proj_bias);
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#).unwrap_err();
        assert!(e.to_string().contains("`intermediate_size`"), "{e}");
        let e = parse(&format!(
            r#"{{"architectures": ["GPT2LMHeadModel"], {BASE}}}"#
        ))
        .unwrap_err();
        assert!(matches!(e, Error::UnsupportedArchitecture { .. }), "{e}");
        let e = parse(&format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"type": "yarn", "factor": 4}}}}"#)).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = parse("{ not json").unwrap_err();
        assert!(
            e.to_string().starts_with("config.json: not valid JSON"),
            "{e}"
        );
    }
}
