//! The evaluation protocol: perplexity and, against a reference model, KL divergence and top-1
//! agreement.
//!
//! Protocol (the one behind the reference numbers in ../shared/reference): tokenize the whole
//! text without special tokens; cut consecutive non-overlapping windows of `ctx` tokens and
//! drop the tail; add no BOS; every window is scored on its positions 1..ctx−1 (each predicted
//! from the tokens before it in the same window); mean NLL over all scored positions;
//! perplexity = exp(mean NLL). With a reference, KL(ref ‖ model) is averaged over the same
//! positions and top-1 agreement is the fraction where both models' argmax agree.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gpu::ops;
use crate::gpu::Batch;

use super::engine::Engine;

#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Window length in tokens.
    pub ctx: usize,
    /// Evaluate at most this many windows (the first ones).
    pub max_windows: Option<usize>,
    /// Windows per forward batch.
    pub batch: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            ctx: 512,
            max_windows: None,
            batch: 4,
        }
    }
}

/// Progress of a running evaluation.
#[derive(Clone, Copy, Debug)]
pub struct EvalProgress {
    pub windows_done: usize,
    pub windows_total: usize,
    pub elapsed_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    /// Tokens in the whole text.
    pub tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    /// Positions scored: windows · (ctx − 1).
    pub predicted_tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_divergence: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_divergence_p99: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Highest GPU memory held in pumice's buffers during the run.
    pub peak_gpu_bytes: u64,
    /// Whether decoder layers stayed on the GPU (false: streamed from disk every batch).
    pub resident_layers: bool,
    /// With exits loaded: their depths; the scores are of the vote of the model's head and
    /// those exits (per token the element-wise max of their softmax, renormalized).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vote_exits: Vec<usize>,
}

/// A batch's normed hidden states: at the model's head, or at the head and every exit.
enum States {
    Plain(crate::gpu::GpuMatrix),
    Voting(super::engine::ExitStates),
}

/// Number of windows the protocol takes from `tokens`.
pub fn window_count(tokens: usize, ctx: usize, max_windows: Option<usize>) -> usize {
    let n = tokens.checked_div(ctx).unwrap_or(0);
    max_windows.map_or(n, |m| n.min(m))
}

/// Evaluate `engine` on `tokens` (and `reference` on the same windows, if given).
pub fn evaluate(
    engine: &mut Engine<'_>,
    mut reference: Option<&mut Engine<'_>>,
    tokens: &[u32],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(EvalProgress),
) -> Result<EvalReport> {
    let ctx = opts.ctx;
    if ctx < 2 {
        return Err(Error::InvalidArgument(format!(
            "--ctx {ctx}: windows need at least 2 tokens"
        )));
    }
    let vocab = engine.checkpoint().config().vocab_size;
    if let Some(r) = reference.as_ref() {
        let rv = r.checkpoint().config().vocab_size;
        if rv != vocab {
            return Err(Error::InvalidArgument(format!(
                "the reference {} has a vocabulary of {rv}, the model {vocab}",
                r.checkpoint().dir().display()
            )));
        }
    }
    let windows = window_count(tokens.len(), ctx, opts.max_windows);
    if windows == 0 {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    let gpu = engine.gpu();
    let exits = engine.exit_depths();
    let voting = !exits.is_empty();
    gpu.reset_peak_memory();
    let start = Instant::now();
    let batch = opts.batch.max(1);
    let mut nll_sum = 0.0f64;
    let mut kls: Vec<f32> = Vec::new();
    let mut agree = 0usize;
    let mut scored = 0usize;
    let mut w0 = 0;
    while w0 < windows {
        let nw = batch.min(windows - w0);
        let toks = &tokens[w0 * ctx..(w0 + nw) * ctx];
        let rows = toks.len();
        // An engine with exits loaded votes (Edge-LLM): the model's head and every exit.
        let hidden = if voting {
            States::Voting(engine.exit_hidden_states(toks, ctx)?)
        } else {
            States::Plain(engine.hidden_states(toks, ctx)?)
        };
        let ref_hidden = match reference.as_deref_mut() {
            Some(r) => Some(r.hidden_states(toks, ctx)?),
            None => None,
        };
        let targets: Vec<u32> = (0..rows)
            .map(|r| if r % ctx < ctx - 1 { toks[r + 1] } else { 0 })
            .collect();
        let tb = ops::upload_u32(gpu, &targets)?;
        let out = gpu.storage((rows * 16) as u64, true)?;
        let block = engine.logit_block_rows();
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + block).min(rows);
            let z = match &hidden {
                States::Plain(h) => engine.logits(h, r0..r1)?,
                States::Voting(states) => engine.voted_logits(states, r0..r1)?,
            };
            let zr = match (reference.as_deref(), ref_hidden.as_ref()) {
                (Some(r), Some(h)) => Some(r.logits(h, r0..r1)?),
                _ => None,
            };
            let mut b = Batch::new(gpu);
            ops::logit_stats(&mut b, &z, zr.as_ref(), &tb, &out, r0)?;
            b.submit()?;
            r0 = r1;
        }
        let stats: Vec<f32> =
            bytemuck::cast_slice(&gpu.read_bytes(&out, 0, (rows * 16) as u64)?).to_vec();
        for r in 0..rows {
            if r % ctx == ctx - 1 {
                continue;
            }
            let s = &stats[4 * r..4 * r + 4];
            if !s[0].is_finite() {
                return Err(Error::Gpu {
                    op: "evaluation".into(),
                    msg: format!(
                        "non-finite NLL at window {} position {}",
                        w0 + r / ctx,
                        r % ctx
                    ),
                });
            }
            nll_sum += s[0] as f64;
            scored += 1;
            if reference.is_some() {
                kls.push(s[1]);
                agree += (s[2] == s[3]) as usize;
            }
        }
        w0 += nw;
        progress(EvalProgress {
            windows_done: w0,
            windows_total: windows,
            elapsed_s: start.elapsed().as_secs_f64(),
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    let mean_nll = nll_sum / scored as f64;
    let (kl, p99, top1) = if reference.is_some() {
        let mean = kls.iter().map(|&k| k as f64).sum::<f64>() / kls.len() as f64;
        let mut sorted = kls.clone();
        sorted.sort_by(f32::total_cmp);
        let idx = ((sorted.len() as f64 * 0.99).ceil() as usize).clamp(1, sorted.len()) - 1;
        (
            Some(mean),
            Some(sorted[idx] as f64),
            Some(agree as f64 / scored as f64),
        )
    } else {
        (None, None, None)
    };
    Ok(EvalReport {
        perplexity: mean_nll.exp(),
        mean_nll,
        tokens: tokens.len(),
        windows,
        ctx,
        predicted_tokens: scored,
        seconds,
        tokens_per_second: (windows * ctx) as f64 / seconds.max(1e-9),
        kl_divergence: kl,
        kl_divergence_p99: p99,
        top1_agreement: top1,
        peak_gpu_bytes: gpu.memory().peak_bytes,
        resident_layers: engine.resident(),
        vote_exits: exits,
    })
}
