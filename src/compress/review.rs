//! After a compression: how the compressed model compares with the original (perplexity
//! before and after on a text, KL and top-1 agreement on sequences the original samples
//! itself). (The allocation report beside a budgeted checkpoint: `budget::report`.)

use std::path::Path;

use crate::compress::calib::{self, CalibOptions};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::infer::eval::{evaluate, EvalOptions, EvalReport};
use crate::infer::{Engine, EngineOptions};
use crate::model::Checkpoint;
use crate::text::Newlines;

/// What to measure after compressing.
#[derive(Clone, Debug, Default)]
pub struct ReviewOptions {
    /// Token ids of an evaluation text (read and tokenized before the compression).
    pub eval_tokens: Option<Vec<u32>>,
    /// Window length and how many windows for `eval_tokens`.
    pub eval_ctx: usize,
    pub eval_windows: Option<usize>,
    /// Sequences the original model samples itself (seed + 1: not the calibration's).
    pub self_samples: usize,
    pub seed: u64,
    pub newlines: Newlines,
}

/// The measurements.
#[derive(Clone, Debug, Default)]
pub struct Review {
    /// Perplexity of the original and of the compressed model (with KL vs the original).
    pub before_after: Option<(EvalReport, EvalReport)>,
    /// KL(original ‖ compressed) and top-1 agreement on self-generated sequences.
    pub self_generated: Option<EvalReport>,
}

/// Compare the compressed checkpoint in `output` with its source `ck`.
pub fn review(gpu: &Gpu, ck: &Checkpoint, output: &Path, opts: &ReviewOptions) -> Result<Review> {
    let mut r = Review::default();
    if let Some(tokens) = &opts.eval_tokens {
        let out_ck = Checkpoint::open(output)?;
        let eopts = EngineOptions {
            resident_bytes: 2 << 30,
            max_positions: opts.eval_ctx,
        };
        let eval_opts = EvalOptions {
            ctx: opts.eval_ctx,
            max_windows: opts.eval_windows,
            batch: 4,
        };
        let mut orig = Engine::new(gpu, ck, &eopts)?;
        let before = evaluate(&mut orig, None, tokens, &eval_opts, &mut |_| {})?;
        let mut comp = Engine::new(gpu, &out_ck, &eopts)?;
        let after = evaluate(&mut comp, Some(&mut orig), tokens, &eval_opts, &mut |_| {})?;
        r.before_after = Some((before, after));
    }
    if opts.self_samples > 0 {
        let len = 256.min(ck.config().max_position_embeddings).max(2);
        let eopts = EngineOptions {
            resident_bytes: 2 << 30,
            max_positions: len,
        };
        let mut orig = Engine::new(gpu, ck, &eopts)?;
        let copts = CalibOptions {
            samples: opts.self_samples,
            len,
            seed: opts.seed.wrapping_add(1),
            newlines: opts.newlines,
            hessians_on: crate::lowrank::fit::Placement::Auto,
        };
        let seqs = calib::self_generated(&mut orig, &copts, &mut |_, _| {})?;
        let out_ck = Checkpoint::open(output)?;
        let mut comp = Engine::new(gpu, &out_ck, &eopts)?;
        let eval_opts = EvalOptions {
            ctx: len,
            max_windows: None,
            batch: 4,
        };
        r.self_generated = Some(evaluate(
            &mut comp,
            Some(&mut orig),
            &seqs.tokens,
            &eval_opts,
            &mut |_| {},
        )?);
    }
    Ok(r)
}
