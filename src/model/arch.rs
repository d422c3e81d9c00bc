//! The typed layout of a Llama-family decoder: which tensors exist with which shapes, which
//! belong to which decoder layer, and which linear layers read the same input (and so share one
//! calibration Hessian).

use serde::Serialize;

use super::config::ModelConfig;

/// The seven linear layers of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearKind {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        LinearKind::QProj,
        LinearKind::KProj,
        LinearKind::VProj,
        LinearKind::OProj,
        LinearKind::GateProj,
        LinearKind::UpProj,
        LinearKind::DownProj,
    ];

    /// Name of the module within the layer (`self_attn.q_proj`, `mlp.down_proj`, ...).
    pub fn module(self) -> &'static str {
        match self {
            LinearKind::QProj => "self_attn.q_proj",
            LinearKind::KProj => "self_attn.k_proj",
            LinearKind::VProj => "self_attn.v_proj",
            LinearKind::OProj => "self_attn.o_proj",
            LinearKind::GateProj => "mlp.gate_proj",
            LinearKind::UpProj => "mlp.up_proj",
            LinearKind::DownProj => "mlp.down_proj",
        }
    }

    /// Which input this layer reads.
    pub fn input(self) -> InputGroup {
        match self {
            LinearKind::QProj | LinearKind::KProj | LinearKind::VProj => InputGroup::AttnIn,
            LinearKind::OProj => InputGroup::AttnOut,
            LinearKind::GateProj | LinearKind::UpProj => InputGroup::MlpIn,
            LinearKind::DownProj => InputGroup::MlpOut,
        }
    }
}

/// Linear layers that read the same activations: one Hessian per group and layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputGroup {
    /// Normed hidden state into q, k, v.
    AttnIn,
    /// Attention output into o_proj.
    AttnOut,
    /// Normed hidden state into gate and up.
    MlpIn,
    /// SwiGLU product into down_proj.
    MlpOut,
}

impl InputGroup {
    pub const ALL: [InputGroup; 4] = [
        InputGroup::AttnIn,
        InputGroup::AttnOut,
        InputGroup::MlpIn,
        InputGroup::MlpOut,
    ];
}

/// A tensor the checkpoint must contain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn new(name: String, shape: Vec<usize>) -> Self {
        TensorSpec { name, shape }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One linear layer: `y = x Wᵀ (+ b)`, W of shape [out_features, in_features].
#[derive(Clone, Debug, Serialize)]
pub struct LinearSpec {
    pub kind: LinearKind,
    pub weight: TensorSpec,
    pub bias: Option<TensorSpec>,
    pub out_features: usize,
    pub in_features: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerSpec {
    pub index: usize,
    pub input_norm: TensorSpec,
    pub post_attention_norm: TensorSpec,
    pub linears: Vec<LinearSpec>,
}

impl LayerSpec {
    pub fn linear(&self, kind: LinearKind) -> &LinearSpec {
        self.linears
            .iter()
            .find(|l| l.kind == kind)
            .expect("every layer has all seven linears")
    }

    /// The linear layers of each input group, in order.
    pub fn groups(&self) -> Vec<(InputGroup, Vec<&LinearSpec>)> {
        InputGroup::ALL
            .iter()
            .map(|&g| {
                (
                    g,
                    self.linears
                        .iter()
                        .filter(|l| l.kind.input() == g)
                        .collect(),
                )
            })
            .collect()
    }

    pub fn tensors(&self) -> Vec<&TensorSpec> {
        let mut v = vec![&self.input_norm, &self.post_attention_norm];
        for l in &self.linears {
            v.push(&l.weight);
            if let Some(b) = &l.bias {
                v.push(b);
            }
        }
        v
    }
}

/// The whole model's tensor layout.
#[derive(Clone, Debug, Serialize)]
pub struct Architecture {
    pub embed_tokens: TensorSpec,
    pub final_norm: TensorSpec,
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<TensorSpec>,
    pub layers: Vec<LayerSpec>,
}

impl Architecture {
    pub fn from_config(c: &ModelConfig) -> Architecture {
        let h = c.hidden_size;
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        let layers = (0..c.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let linears = LinearKind::ALL
                    .iter()
                    .map(|&kind| {
                        let (out, inp) = match kind {
                            LinearKind::QProj => (q, h),
                            LinearKind::KProj | LinearKind::VProj => (kv, h),
                            LinearKind::OProj => (h, q),
                            LinearKind::GateProj | LinearKind::UpProj => (c.intermediate_size, h),
                            LinearKind::DownProj => (h, c.intermediate_size),
                        };
                        let has_bias = match kind {
                            LinearKind::QProj | LinearKind::KProj | LinearKind::VProj => {
                                c.attention_bias
                            }
                            LinearKind::OProj => c.o_proj_bias,
                            _ => c.mlp_bias,
                        };
                        let m = kind.module();
                        LinearSpec {
                            kind,
                            weight: TensorSpec::new(format!("{p}.{m}.weight"), vec![out, inp]),
                            bias: has_bias
                                .then(|| TensorSpec::new(format!("{p}.{m}.bias"), vec![out])),
                            out_features: out,
                            in_features: inp,
                        }
                    })
                    .collect();
                LayerSpec {
                    index: i,
                    input_norm: TensorSpec::new(format!("{p}.input_layernorm.weight"), vec![h]),
                    post_attention_norm: TensorSpec::new(
                        format!("{p}.post_attention_layernorm.weight"),
                        vec![h],
                    ),
                    linears,
                }
            })
            .collect();
        Architecture {
            embed_tokens: TensorSpec::new(
                "model.embed_tokens.weight".into(),
                vec![c.vocab_size, h],
            ),
            final_norm: TensorSpec::new("model.norm.weight".into(), vec![h]),
            lm_head: (!c.tie_word_embeddings)
                .then(|| TensorSpec::new("lm_head.weight".into(), vec![c.vocab_size, h])),
            layers,
        }
    }

    /// Every tensor the checkpoint must hold.
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        let mut v = vec![&self.embed_tokens];
        for l in &self.layers {
            v.extend(l.tensors());
        }
        v.push(&self.final_norm);
        if let Some(h) = &self.lm_head {
            v.push(h);
        }
        v
    }

    /// Parameters of the model (tied weights counted once).
    pub fn parameter_count(&self) -> usize {
        self.tensors().iter().map(|t| t.numel()).sum()
    }

    /// Parameters in the decoder layers' linear weights (what compression methods act on).
    pub fn linear_parameter_count(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.linears)
            .map(|l| l.weight.numel())
            .sum()
    }
}
