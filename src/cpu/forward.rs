//! A plain f64 forward pass of a whole checkpoint: the reference the GPU engine is tested
//! against on configurations transformers reference data does not cover (biases, tied heads,
//! scaled RoPE, sliding windows). Slow by design; for tiny models.

use crate::error::Result;
use crate::model::{Checkpoint, LinearKind};

/// A checkpoint tensor's values in f64.
pub(crate) fn tensor(ck: &Checkpoint, name: &str) -> Result<Vec<f64>> {
    Ok(ck
        .tensor(name)?
        .to_f32()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// y[r] = x[r] · Wᵀ (+ b) for x [rows, inp], W [out, inp], in f64 (faer, all cores).
fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, inp: usize, out: usize) -> Vec<f64> {
    use faer::{Accum, MatRef, Par};
    let rows = x.len() / inp;
    let xm = MatRef::from_row_major_slice(x, rows, inp);
    let wm = MatRef::from_row_major_slice(w, out, inp).transpose();
    let mut c = faer::Mat::<f64>::zeros(rows, out);
    faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, xm, wm, 1.0f64, Par::rayon(0));
    let mut y = vec![0.0; rows * out];
    for r in 0..rows {
        for o in 0..out {
            y[r * out + o] = c[(r, o)] + b.map_or(0.0, |b| b[o]);
        }
    }
    y
}

/// The final RMSNorm of the residual stream leaving the last decoder layer, [ids.len(),
/// hidden] in f64: what the LM head reads (for models whose full f64 logits are too costly).
pub fn reference_final_hidden(ck: &Checkpoint, ids: &[u32], seq_len: usize) -> Result<Vec<f64>> {
    let mut last = Vec::new();
    let n = ck.arch().layers.len();
    forward_layers(ck, ids, seq_len, &mut |l, x| {
        if l == n {
            last = x.to_vec();
        }
    })?;
    let norm = tensor(ck, &ck.arch().final_norm.name)?;
    Ok(rms_norm(&last, &norm, ck.config().rms_norm_eps))
}

/// Logits [rows, vocab] in f64 of normed hidden states [rows, hidden] through the LM head (the
/// embedding when tied).
pub fn reference_head(ck: &Checkpoint, hidden: &[f64]) -> Result<Vec<f64>> {
    let c = ck.config();
    let head = match &ck.arch().lm_head {
        Some(hs) => tensor(ck, &hs.name)?,
        None => tensor(ck, &ck.arch().embed_tokens.name)?,
    };
    Ok(linear(hidden, &head, None, c.hidden_size, c.vocab_size))
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    super::grad::rms_norm(x, w, w.len(), eps)
}

fn rope(x: &mut [f64], heads: usize, inv_freq: &[f32], seq_len: usize) {
    let half = inv_freq.len();
    let d = 2 * half;
    for (r, row) in x.chunks_mut(heads * d).enumerate() {
        let pos = (r % seq_len) as f32;
        for h in 0..heads {
            for i in 0..half {
                let a = (pos * inv_freq[i]) as f64;
                let (x1, x2) = (row[h * d + i], row[h * d + i + half]);
                row[h * d + i] = x1 * a.cos() - x2 * a.sin();
                row[h * d + i + half] = x2 * a.cos() + x1 * a.sin();
            }
        }
    }
}

/// Logits [ids.len(), vocab] for sequences of `seq_len` tokens (each starting at position 0).
pub fn reference_logits(ck: &Checkpoint, ids: &[u32], seq_len: usize) -> Result<Vec<f64>> {
    reference_logits_observed(ck, ids, seq_len, &mut |_, _| {})
}

/// The logits of the residual stream entering each decoder layer and leaving the last one,
/// each through the final norm and the LM head: num_layers + 1 matrices [ids.len(), vocab].
pub fn reference_layer_logits(
    ck: &Checkpoint,
    ids: &[u32],
    seq_len: usize,
) -> Result<Vec<Vec<f64>>> {
    let mut streams = Vec::new();
    reference_logits_observed(ck, ids, seq_len, &mut |_, x| streams.push(x.to_vec()))?;
    let c = ck.config();
    let norm = tensor(ck, &ck.arch().final_norm.name)?;
    let head = match &ck.arch().lm_head {
        Some(hs) => tensor(ck, &hs.name)?,
        None => tensor(ck, &ck.arch().embed_tokens.name)?,
    };
    Ok(streams
        .iter()
        .map(|x| {
            let xn = rms_norm(x, &norm, c.rms_norm_eps);
            linear(&xn, &head, None, c.hidden_size, c.vocab_size)
        })
        .collect())
}

/// [`reference_logits`], calling `observe(l, x)` with the residual stream entering layer l
/// and `observe(num_layers, x)` with the one leaving the last layer.
pub fn reference_logits_observed(
    ck: &Checkpoint,
    ids: &[u32],
    seq_len: usize,
    observe: &mut dyn FnMut(usize, &[f64]),
) -> Result<Vec<f64>> {
    let c = ck.config();
    let x = forward_layers(ck, ids, seq_len, observe)?;
    let xn = rms_norm(&x, &tensor(ck, &ck.arch().final_norm.name)?, c.rms_norm_eps);
    let head = match &ck.arch().lm_head {
        Some(hs) => tensor(ck, &hs.name)?,
        None => tensor(ck, &ck.arch().embed_tokens.name)?,
    };
    Ok(linear(&xn, &head, None, c.hidden_size, c.vocab_size))
}

/// Every decoder layer in f64; returns the residual stream leaving the last one.
fn forward_layers(
    ck: &Checkpoint,
    ids: &[u32],
    seq_len: usize,
    observe: &mut dyn FnMut(usize, &[f64]),
) -> Result<Vec<f64>> {
    let c = ck.config();
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (nh, nkv) = (c.num_heads, c.num_kv_heads);
    let rows = ids.len();
    let emb = tensor(ck, &ck.arch().embed_tokens.name)?;
    let mut x: Vec<f64> = ids
        .iter()
        .flat_map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let inv = c.rope_inv_freq();
    let window = c.sliding_window.unwrap_or(0);
    for (l, spec) in ck.arch().layers.iter().enumerate() {
        observe(l, &x);
        let lin = |kind: LinearKind, inp: &[f64]| -> Result<Vec<f64>> {
            let l = spec.linear(kind);
            let w = tensor(ck, &l.weight.name)?;
            let b = l.bias.as_ref().map(|b| tensor(ck, &b.name)).transpose()?;
            Ok(linear(inp, &w, b.as_deref(), l.in_features, l.out_features))
        };
        let hn = rms_norm(&x, &tensor(ck, &spec.input_norm.name)?, c.rms_norm_eps);
        let mut q = lin(LinearKind::QProj, &hn)?;
        let mut k = lin(LinearKind::KProj, &hn)?;
        let v = lin(LinearKind::VProj, &hn)?;
        rope(&mut q, nh, &inv, seq_len);
        rope(&mut k, nkv, &inv, seq_len);
        let mut attn = vec![0.0; rows * nh * hd];
        let scale = 1.0 / (hd as f64).sqrt();
        let row_len = nh * hd;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = rows.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for (part, out) in attn.chunks_mut(per * row_len).enumerate() {
                let (q, k, v) = (&q, &k, &v);
                scope.spawn(move || {
                    for (rr, orow) in out.chunks_mut(row_len).enumerate() {
                        let r = part * per + rr;
                        let (seq, i) = (r / seq_len, r % seq_len);
                        let lo = if window > 0 && i + 1 > window {
                            i + 1 - window
                        } else {
                            0
                        };
                        for head in 0..nh {
                            let kh = head / (nh / nkv);
                            let qr = &q[r * nh * hd + head * hd..][..hd];
                            let scores: Vec<f64> = (lo..=i)
                                .map(|j| {
                                    let kr = &k[(seq * seq_len + j) * nkv * hd + kh * hd..][..hd];
                                    qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() * scale
                                })
                                .collect();
                            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                            let oh = &mut orow[head * hd..(head + 1) * hd];
                            for (jj, s) in scores.iter().enumerate() {
                                let p = (s - m).exp() / z;
                                let vr = &v[(seq * seq_len + lo + jj) * nkv * hd + kh * hd..][..hd];
                                for d in 0..hd {
                                    oh[d] += p * vr[d];
                                }
                            }
                        }
                    }
                });
            }
        });
        let o = lin(LinearKind::OProj, &attn)?;
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h2 = rms_norm(
            &x,
            &tensor(ck, &spec.post_attention_norm.name)?,
            c.rms_norm_eps,
        );
        let g = lin(LinearKind::GateProj, &h2)?;
        let u = lin(LinearKind::UpProj, &h2)?;
        let act: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let d = lin(LinearKind::DownProj, &act)?;
        x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
    }
    observe(ck.arch().layers.len(), &x);
    Ok(x)
}

/// Edge-LLM's vote in f64, [ids.len(), vocab]: log max_e softmax(z_e) over the model's head
/// (unless `alone` names one exit, which then votes by itself) and every exit of `exits`
/// (each exit: its RMSNorm and head on the stream after its depth). Softmax of a row is the
/// renormalized vote.
pub fn reference_vote(
    ck: &Checkpoint,
    exits: &crate::model::exits::Exits,
    alone: Option<usize>,
    ids: &[u32],
    seq_len: usize,
) -> Result<Vec<f64>> {
    let c = ck.config();
    let mut streams = Vec::new();
    let last = reference_logits_observed(ck, ids, seq_len, &mut |l, x| {
        if exits.depths().contains(&l) {
            streams.push(x.to_vec());
        }
    })?;
    let f64s = |t: crate::model::TensorRef<'_>| -> Result<Vec<f64>> {
        Ok(t.to_f32()?.into_iter().map(f64::from).collect())
    };
    let mut heads = if alone.is_some() { vec![] } else { vec![last] };
    for (x, &d) in streams.iter().zip(exits.depths()) {
        if alone.is_some_and(|a| a != d) {
            continue;
        }
        let xn = rms_norm(x, &f64s(exits.norm(d))?, c.rms_norm_eps);
        heads.push(linear(
            &xn,
            &f64s(exits.head(d))?,
            None,
            c.hidden_size,
            c.vocab_size,
        ));
    }
    let heads: Vec<&[f64]> = heads.iter().map(Vec::as_slice).collect();
    Ok(super::ops::vote(&heads, c.vocab_size))
}
