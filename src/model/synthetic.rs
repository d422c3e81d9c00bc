//! Synthetic Llama checkpoints of any shape, for tests and benchmarks (e.g. one decoder layer
//! of Llama-2-7B shape without downloading it). Weights are deterministic pseudo-random values
//! scaled like a trained model's (≈ 1/√fan_in), so activations stay in a realistic range.

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Shape of a synthetic model.
#[derive(Clone, Debug)]
pub struct SyntheticLlama {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub dtype: DType,
    pub seed: u64,
    /// `architectures[0]` (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).
    pub architecture: String,
    /// Extra config.json fields (rope_scaling, tie_word_embeddings, attention_bias,
    /// sliding_window, ...), merged over the defaults.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl SyntheticLlama {
    /// Llama-2-7B's decoder shape (hidden 4096, intermediate 11008, 32 heads) with `layers`
    /// layers and a small vocabulary.
    pub fn llama2_7b_layers(layers: usize) -> SyntheticLlama {
        SyntheticLlama {
            hidden: 4096,
            intermediate: 11008,
            layers,
            heads: 32,
            kv_heads: 32,
            vocab: 512,
            dtype: DType::BF16,
            seed: 1,
            architecture: "LlamaForCausalLM".into(),
            extra: serde_json::Map::new(),
        }
    }

    /// A tiny model of the given architecture (f32), for tests.
    pub fn tiny(architecture: &str) -> SyntheticLlama {
        SyntheticLlama {
            hidden: 32,
            intermediate: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 64,
            dtype: DType::F32,
            seed: 7,
            architecture: architecture.into(),
            extra: serde_json::Map::new(),
        }
    }

    /// The decoder shape of a real model family with `layers` layers (real hidden sizes,
    /// heads, head_dim 64, RoPE bases and scaling, biases, tied vocabularies):
    /// `smollm2-135m` (576, 9/3 heads, θ 1e5, 49,152 tokens, f32), `qwen2.5-0.5b` (896, 14/2,
    /// q/k/v biases, θ 1e6, 151,936 tokens, bf16), `llama-3.2-1b` (2048, 32/8, llama3 scaling,
    /// 128,256 tokens, bf16).
    pub fn family(name: &str, layers: usize) -> Option<SyntheticLlama> {
        let (arch, dims, dtype, seed, extra) = match name {
            "smollm2-135m" => (
                "LlamaForCausalLM",
                (576, 1536, 9, 3, 49_152),
                DType::F32,
                135,
                serde_json::json!({"rope_theta": 100000.0, "tie_word_embeddings": true,
                                   "max_position_embeddings": 8192}),
            ),
            "qwen2.5-0.5b" => (
                "Qwen2ForCausalLM",
                (896, 4864, 14, 2, 151_936),
                DType::BF16,
                500,
                serde_json::json!({"rope_theta": 1000000.0, "tie_word_embeddings": true,
                                   "sliding_window": 32768, "use_sliding_window": false,
                                   "max_window_layers": 21, "max_position_embeddings": 32768}),
            ),
            "llama-3.2-1b" => (
                "LlamaForCausalLM",
                (2048, 8192, 32, 8, 128_256),
                DType::BF16,
                1000,
                serde_json::json!({"rope_theta": 500000.0, "tie_word_embeddings": true,
                                   "max_position_embeddings": 131072,
                                   "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192}}),
            ),
            _ => return None,
        };
        let (hidden, intermediate, heads, kv_heads, vocab) = dims;
        Some(SyntheticLlama {
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            vocab,
            dtype,
            seed,
            architecture: arch.into(),
            extra: extra.as_object().cloned().unwrap_or_default(),
        })
    }

    /// Names [`SyntheticLlama::family`] knows.
    pub const FAMILIES: [&'static str; 3] = ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"];

    fn values(&self, n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = (self.seed ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// The config.json this model is written with.
    pub fn config_json(&self) -> serde_json::Value {
        let hd = self.hidden / self.heads;
        // transformers finds the model class by `model_type`.
        let model_type = match self.architecture.as_str() {
            "Qwen2ForCausalLM" => "qwen2",
            "MistralForCausalLM" => "mistral",
            _ => "llama",
        };
        let mut config = serde_json::json!({
            "architectures": [self.architecture],
            "model_type": model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": hd,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "torch_dtype": self.dtype.to_string(),
        });
        let obj = config.as_object_mut().expect("object");
        for (k, v) in &self.extra {
            obj.insert(k.clone(), v.clone());
        }
        config
    }

    /// Write config.json and model.safetensors into `dir` (created if needed): every tensor
    /// the config implies, biases included.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config = self.config_json();
        let cfg_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("json");
        let parsed = super::config::ModelConfig::from_json_str(&text, &cfg_path)?;
        std::fs::write(&cfg_path, &text).map_err(|e| Error::io(&cfg_path, e))?;
        let arch = super::arch::Architecture::from_config(&parsed);
        let shapes: Vec<(String, Vec<usize>, f32)> = arch
            .tensors()
            .into_iter()
            .map(|t| {
                let scale = if t.name.ends_with("norm.weight") {
                    -1.0 // norm weights: 1 ± 0.1
                } else if t.name.ends_with(".bias") {
                    0.1
                } else if t.name == arch.embed_tokens.name {
                    // A tied head reads the embedding: keep its logits in a trained model's
                    // range (std ≈ 1) instead of ±√hidden.
                    if parsed.tie_word_embeddings {
                        2.0 / (self.hidden as f32).sqrt()
                    } else {
                        1.0
                    }
                } else {
                    1.0 / (t.shape[1] as f32).sqrt()
                };
                (t.name.clone(), t.shape.clone(), scale)
            })
            .collect();

        let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape, scale))| {
                let n: usize = shape.iter().product();
                // Norm weights (scale < 0) are 1 ± 0.1, like a trained model's.
                let vals = if scale < 0.0 {
                    self.values(n, k as u64, 0.1)
                        .iter()
                        .map(|v| 1.0 + v)
                        .collect()
                } else {
                    self.values(n, k as u64, scale)
                };
                (name, shape, self.dtype.encode_f32(&vals))
            })
            .collect();
        let st_dtype = match self.dtype {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
        };
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, s, b)| {
                safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::InvalidArgument(format!("synthetic tensor {n}: {e}")))
            })
            .collect::<Result<_>>()?;
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| Error::safetensors(&path, format!("writing failed: {e}")))?;
        Ok(())
    }
}
