//! Text generation with a KV cache on the GPU: greedy at temperature 0 (argmax computed on the
//! GPU, 16 bytes read back per token), otherwise temperature + nucleus (top-p) sampling on the
//! last position's logits with a seeded generator, so runs are reproducible.

use crate::base::rng::Rng;
use crate::error::{Error, Result};
use crate::gpu::ops;
use crate::gpu::Batch;

use super::engine::Engine;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    /// Nucleus sampling mass (1: no truncation).
    pub top_p: f32,
    pub seed: u64,
    /// Stop at the model's end-of-sequence token(s).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_at_eos: true,
        }
    }
}

/// Sample an index from `logits` with temperature and top-p.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut Rng) -> usize {
    let t = temperature.max(1e-6) as f64;
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i, ((z as f64 - m) / t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let keep_mass = (top_p.clamp(0.0, 1.0) as f64) * total;
    let mut acc = 0.0;
    let mut keep = 0;
    for (k, p) in probs.iter().enumerate() {
        acc += p.1;
        keep = k + 1;
        if acc >= keep_mass {
            break;
        }
    }
    let kept = &probs[..keep.max(1)];
    let mass: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.uniform() * mass;
    for &(i, p) in kept {
        if u < p {
            return i;
        }
        u -= p;
    }
    kept[kept.len() - 1].0
}

/// Continue `prompt` for up to `opts.max_tokens` tokens, calling `on_token` with each new id
/// as soon as it is chosen. Returns the new ids.
pub fn generate(
    engine: &mut Engine<'_>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let cfg = engine.checkpoint().config().clone();
    let prompt: Vec<u32> = if prompt.is_empty() {
        match cfg.bos_token_id {
            Some(b) => vec![b],
            None => {
                return Err(Error::InvalidArgument(
                    "empty prompt and the model has no bos_token_id".into(),
                ))
            }
        }
    } else {
        prompt.to_vec()
    };
    let capacity = prompt.len().saturating_add(opts.max_tokens);
    if capacity > engine.max_positions() {
        return Err(Error::InvalidArgument(format!(
            "prompt ({}) plus --max-tokens ({}) exceeds the {} positions available",
            prompt.len(),
            opts.max_tokens,
            engine.max_positions()
        )));
    }
    let gpu = engine.gpu();
    let mut cache = engine.new_cache(capacity)?;
    let voting = !engine.exit_depths().is_empty();
    let mut rng = Rng::new(opts.seed);
    let zero = ops::upload_u32(gpu, &[0])?;
    let stats = gpu.storage(16, true)?;
    let mut out = Vec::new();
    let mut next_input = prompt;
    for _ in 0..opts.max_tokens {
        // An engine with exits loaded votes (Edge-LLM): the model's head and every exit.
        let z = if voting {
            let states = engine.extend_exits(&mut cache, &next_input)?;
            let last = states.last.rows() - 1;
            engine.voted_logits(&states, last..last + 1)?
        } else {
            let hidden = engine.extend(&mut cache, &next_input)?;
            let last = hidden.rows() - 1;
            engine.logits(&hidden, last..last + 1)?
        };
        let id = if opts.temperature <= 0.0 {
            let mut b = Batch::new(gpu);
            ops::logit_stats(&mut b, &z, None, &zero, &stats, 0)?;
            b.submit()?;
            let s: Vec<f32> = bytemuck::cast_slice(&gpu.read_bytes(&stats, 0, 16)?).to_vec();
            s[2] as u32
        } else {
            let logits = z.to_f32(gpu)?;
            sample(&logits, opts.temperature, opts.top_p, &mut rng) as u32
        };
        out.push(id);
        on_token(id)?;
        if opts.stop_at_eos && cfg.eos_token_ids.contains(&id) {
            break;
        }
        next_input = vec![id];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_seeded_and_respects_top_p() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..50)
                .map(|_| sample(&logits, 1.0, 0.5, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        // top-p 0.5 keeps only the single most likely token here.
        assert!(draw(7).iter().all(|&i| i == 1));
        let mut r = Rng::new(1);
        let all: Vec<usize> = (0..2000)
            .map(|_| sample(&logits, 1.0, 1.0, &mut r))
            .collect();
        assert!(all.contains(&2) && all.contains(&1));
    }
}
