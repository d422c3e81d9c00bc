//! LSAQ layer importance: how much a decoder layer changes what the model would predict.
//!
//! For decoder layer l, take the residual stream entering it (x_l) and leaving it (x_{l+1}),
//! send both through the model's final RMSNorm and LM head (the final norm is applied, so both
//! are read exactly as the head reads the last layer's output), and take at every calibration
//! position the set of the k most likely tokens (ties to the lower id). The layer's Jaccard
//! similarity J_l is the mean over positions of |A ∩ B| / |A ∪ B|; its importance is 1 − J_l.
//! A layer that leaves the top-k predictions unchanged scores 0; one that replaces them all
//! scores 1.
//!
//! The logits are formed on the GPU in row blocks and reduced there to k indices per row by the
//! top-k kernel; only the indices are read back.

use serde::Serialize;

use crate::error::Result;
use crate::gpu::{ops, Batch, GpuMatrix};
use crate::infer::engine::Engine;

/// Importance of one decoder layer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerImportance {
    pub layer: usize,
    /// Mean top-k Jaccard similarity of the layer's input and output predictions.
    pub jaccard: f64,
    /// 1 − jaccard.
    pub importance: f64,
}

/// |A ∩ B| / |A ∪ B| of two index sets given as slices without repeats.
pub fn jaccard(a: &[u32], b: &[u32]) -> f64 {
    let inter = a.iter().filter(|x| b.contains(x)).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Top-k token indices (k per row) of the residual stream `x` read through the final norm and
/// the LM head.
fn top_k_of_stream(
    engine: &Engine<'_>,
    x: &GpuMatrix,
    seq_len: usize,
    k: usize,
) -> Result<Vec<u32>> {
    let gpu = engine.gpu();
    let rows = x.rows();
    let normed = engine.final_normed(x, seq_len)?;
    let out = gpu.storage((rows * k * 4) as u64, true)?;
    let block = engine.logit_block_rows();
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + block).min(rows);
        let z = engine.logits(&normed, r0..r1)?;
        let mut b = Batch::new(gpu);
        ops::top_k(&mut b, &z, k, &out, r0)?;
        b.submit()?;
        r0 = r1;
    }
    Ok(bytemuck::cast_slice(&gpu.read_bytes(&out, 0, (rows * k * 4) as u64)?).to_vec())
}

/// LSAQ importance of every decoder layer over `tokens` (whole sequences of `seq_len`),
/// `batch` sequences per pass. `progress(done, total)` counts sequences.
pub fn lsaq(
    engine: &mut Engine<'_>,
    tokens: &[u32],
    seq_len: usize,
    k: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerImportance>> {
    let layers = engine.checkpoint().config().num_layers;
    let vocab = engine.checkpoint().config().vocab_size;
    if k == 0 || k > ops::MAX_TOP_K || k > vocab {
        return Err(crate::Error::InvalidArgument(format!(
            "--top-k {k}: must be within 1..={} and at most the vocabulary ({vocab})",
            ops::MAX_TOP_K
        )));
    }
    if seq_len == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(seq_len) {
        return Err(crate::Error::Shape(format!(
            "{} tokens are not whole sequences of {seq_len}",
            tokens.len()
        )));
    }
    let nseq = tokens.len() / seq_len;
    let mut sums = vec![0.0f64; layers];
    let mut positions = 0usize;
    let mut s0 = 0;
    while s0 < nseq {
        let s1 = (s0 + batch.max(1)).min(nseq);
        let toks = &tokens[s0 * seq_len..s1 * seq_len];
        let rows = toks.len();
        let mut prev: Option<Vec<u32>> = None;
        engine.hidden_states_observed(toks, seq_len, &mut |e, l, x| {
            let cur = top_k_of_stream(e, x, seq_len, k)?;
            if let Some(p) = &prev {
                sums[l - 1] += (0..rows)
                    .map(|r| jaccard(&p[r * k..(r + 1) * k], &cur[r * k..(r + 1) * k]))
                    .sum::<f64>();
            }
            prev = Some(cur);
            Ok(())
        })?;
        positions += rows;
        s0 = s1;
        progress(s1, nseq);
    }
    Ok(sums
        .into_iter()
        .enumerate()
        .map(|(layer, s)| {
            let j = s / positions as f64;
            LayerImportance {
                layer,
                jaccard: j,
                importance: 1.0 - j,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::jaccard;

    #[test]
    fn jaccard_of_sets() {
        assert_eq!(jaccard(&[1, 2, 3], &[1, 2, 3]), 1.0);
        assert_eq!(jaccard(&[1, 2, 3], &[4, 5, 6]), 0.0);
        assert_eq!(jaccard(&[1, 2, 3, 4], &[3, 4, 5, 6]), 2.0 / 6.0);
        assert_eq!(jaccard(&[], &[]), 1.0);
    }
}
