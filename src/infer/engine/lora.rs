//! A PEFT LoRA adapter applied at inference (`--lora`): each adapted linear layer becomes
//! W + s·B·A kept factored, y = x Wᵀ + (x Aᵀ)(s·B)ᵀ, through the engine's low-rank form (a
//! CALDERA weight's factors and the adapter's are stacked: [L | s·B], [R; A]).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::lora::LoraAdapter;
use crate::gpu::GpuMatrix;

use super::{Engine, LayerWeights, LinearWeight};

/// One adapted linear on the GPU: (s·B)ᵀ [r, out] and A [r, in].
pub(crate) struct LoraWeights {
    layer: usize,
    kind: crate::model::LinearKind,
    lt: GpuMatrix,
    a: GpuMatrix,
}

impl<'a> Engine<'a> {
    /// Apply `adapter` to every forward pass from now on (before any layer is loaded); its
    /// exits, when it has some, are loaded for voting with [`load_exits`](Self::load_exits).
    pub fn apply_lora(&mut self, adapter: &LoraAdapter) -> Result<()> {
        if self.layers.iter().any(Option::is_some) {
            return Err(Error::InvalidArgument(
                "apply_lora: layers were already loaded".into(),
            ));
        }
        let mut loaded = Vec::with_capacity(adapter.modules.len());
        for m in &adapter.modules {
            let out = m.b.len() / m.rank;
            let inp = m.a.len() / m.rank;
            let mut lt = vec![0f32; m.rank * out];
            for o in 0..out {
                for k in 0..m.rank {
                    lt[k * out + o] = m.scale * m.b[o * m.rank + k];
                }
            }
            loaded.push(LoraWeights {
                layer: m.layer,
                kind: m.kind,
                lt: GpuMatrix::from_f32(self.gpu, m.rank, out, DType::F32, &lt)?,
                a: GpuMatrix::from_f32(self.gpu, m.rank, inp, DType::F32, &m.a)?,
            });
        }
        self.lora = loaded;
        Ok(())
    }

    /// Layer `l`'s weights with the adapter's modules of that layer added.
    pub(crate) fn with_lora(&self, l: usize, mut w: LayerWeights) -> Result<LayerWeights> {
        if !self.lora.iter().any(|m| m.layer == l) {
            return Ok(w);
        }
        let stack = |top: &GpuMatrix, bottom: &GpuMatrix| -> Result<GpuMatrix> {
            let mut v = top.to_f32(self.gpu)?;
            v.extend(bottom.to_f32(self.gpu)?);
            GpuMatrix::from_f32(
                self.gpu,
                top.rows() + bottom.rows(),
                top.cols(),
                DType::F32,
                &v,
            )
        };
        w.linears = w
            .linears
            .into_iter()
            .map(|(kind, weight, bias)| {
                let Some(m) = self.lora.iter().find(|m| m.layer == l && m.kind == kind) else {
                    return Ok((kind, weight, bias));
                };
                let weight = match weight {
                    LinearWeight::Dense(q) => LinearWeight::LowRank {
                        q,
                        lt: m.lt.duplicate(self.gpu)?,
                        r: m.a.duplicate(self.gpu)?,
                    },
                    LinearWeight::LowRank { q, lt, r } => LinearWeight::LowRank {
                        q,
                        lt: stack(&lt, &m.lt)?,
                        r: stack(&r, &m.a)?,
                    },
                };
                Ok((kind, weight, bias))
            })
            .collect::<Result<_>>()?;
        Ok(w)
    }
}
