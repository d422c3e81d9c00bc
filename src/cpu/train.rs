//! The f64 reference of a fine-tune's loss: the whole model's forward with low-rank adapters
//! (y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ) and the LM head's loss, built from `cpu::grad`'s forwards, so
//! that finite differences of it check the GPU's composed gradient (`train::TrainModel`).
//! Slow by design; for tiny models.

use crate::error::Result;
use crate::model::{Checkpoint, LinearKind};

use super::forward::tensor;
use super::grad::{self, Scored};

/// A low-rank adapter of the reference: A (rank × in), B (out × rank), scale.
#[derive(Clone, Debug)]
pub struct RefAdapter {
    pub layer: usize,
    pub kind: LinearKind,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub rank: usize,
    pub scale: f64,
}

/// y = x·Wᵀ (+ b), x: rows × inp, W: out × inp.
fn matmul_t(x: &[f64], w: &[f64], inp: usize, out: usize) -> Vec<f64> {
    let rows = x.len() / inp;
    let mut y = vec![0.0; rows * out];
    for r in 0..rows {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..out {
            y[r * out + o] = xr
                .iter()
                .zip(&w[o * inp..(o + 1) * inp])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    y
}

/// An early exit of the reference: after `depth` layers, its own final norm and head.
#[derive(Clone, Debug)]
pub struct RefExit {
    pub depth: usize,
    pub norm: Vec<f64>,
    pub head: Vec<f64>,
}

/// The mean loss of sequences of `t` tokens against `objective` (targets per position, or a
/// teacher's final hidden states and head), with `adapters` added to their linears.
pub fn model_loss(
    ck: &Checkpoint,
    adapters: &[RefAdapter],
    ids: &[u32],
    t: usize,
    objective: &Scored<'_>,
) -> Result<f64> {
    model_loss_at(ck, adapters, None, ids, t, objective)
}

/// [`model_loss`] at an early exit (None: the model's own final norm and head).
pub fn model_loss_at(
    ck: &Checkpoint,
    adapters: &[RefAdapter],
    exit: Option<&RefExit>,
    ids: &[u32],
    t: usize,
    objective: &Scored<'_>,
) -> Result<f64> {
    let c = ck.config();
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (nh, nkv) = (c.num_heads, c.num_kv_heads);
    let rows = ids.len();
    let eps = c.rms_norm_eps;
    let emb = tensor(ck, &ck.arch().embed_tokens.name)?;
    let mut x: Vec<f64> = ids
        .iter()
        .flat_map(|&id| emb[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect();
    let inv = c.rope_inv_freq();
    let positions: Vec<u32> = (0..rows).map(|r| (r % t) as u32).collect();
    let window = c.sliding_window.unwrap_or(0);
    let depth = exit.map_or(ck.arch().layers.len(), |e| e.depth);
    for (l, spec) in ck.arch().layers.iter().enumerate().take(depth) {
        let lin = |kind: LinearKind, inp: &[f64]| -> Result<Vec<f64>> {
            let ls = spec.linear(kind);
            let (n, m) = (ls.in_features, ls.out_features);
            let mut y = matmul_t(inp, &tensor(ck, &ls.weight.name)?, n, m);
            if let Some(b) = &ls.bias {
                let b = tensor(ck, &b.name)?;
                y.chunks_mut(m)
                    .for_each(|row| row.iter_mut().zip(&b).for_each(|(y, b)| *y += b));
            }
            if let Some(ad) = adapters.iter().find(|a| a.layer == l && a.kind == kind) {
                let u = matmul_t(inp, &ad.a, n, ad.rank);
                let d = matmul_t(&u, &ad.b, ad.rank, m);
                y.iter_mut().zip(&d).for_each(|(y, d)| *y += ad.scale * d);
            }
            Ok(y)
        };
        let h1 = grad::rms_norm(&x, &tensor(ck, &spec.input_norm.name)?, h, eps);
        let q = grad::rope(&lin(LinearKind::QProj, &h1)?, nh, &inv, &positions, false);
        let k = grad::rope(&lin(LinearKind::KProj, &h1)?, nkv, &inv, &positions, false);
        let v = lin(LinearKind::VProj, &h1)?;
        let a = grad::attention(&q, &k, &v, rows / t, t, nh, nkv, hd, window);
        let o = lin(LinearKind::OProj, &a)?;
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let h2 = grad::rms_norm(&x, &tensor(ck, &spec.post_attention_norm.name)?, h, eps);
        let act = grad::swiglu(
            &lin(LinearKind::GateProj, &h2)?,
            &lin(LinearKind::UpProj, &h2)?,
        );
        let d = lin(LinearKind::DownProj, &act)?;
        x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
    }
    let (norm, head) = match exit {
        Some(e) => (e.norm.clone(), e.head.clone()),
        None => (
            tensor(ck, &ck.arch().final_norm.name)?,
            match &ck.arch().lm_head {
                Some(hs) => tensor(ck, &hs.name)?,
                None => tensor(ck, &ck.arch().embed_tokens.name)?,
            },
        ),
    };
    let hf = grad::rms_norm(&x, &norm, h, eps);
    Ok(grad::lm_head_loss(&hf, &head, rows, h, c.vocab_size, objective).0)
}
