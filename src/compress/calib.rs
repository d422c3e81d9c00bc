//! Calibration data: token windows drawn deterministically from text files, or sequences
//! sampled from the model itself (self-calibration: no dataset needed).

use std::path::{Path, PathBuf};

use crate::base::rng::Rng;
use crate::error::{Error, Result};
use crate::infer::generate::sample;
use crate::infer::Engine;
use crate::model::compressed::CalibInfo;
use crate::model::Tokenizer;

/// How many sequences of how many tokens, drawn with which seed.
#[derive(Clone, Debug)]
pub struct CalibOptions {
    pub samples: usize,
    pub len: usize,
    pub seed: u64,
    /// How line endings of the calibration files are read.
    pub newlines: crate::text::Newlines,
    /// Where H = Σ XᵀX is accumulated (`--hessians-on`): `Auto` is the host's BLAS for a
    /// CPU adapter (lavapipe: the same cores behind an emulation layer, several times slower
    /// than faer at this product) and the GPU otherwise.
    pub hessians_on: crate::lowrank::fit::Placement,
}

/// The calibration length for `samples` sequences when none is asked for, sized to the model:
/// enough tokens for 64 per feature of the widest linear input (the largest Hessian to
/// estimate), as a power of two from 256 to 2048, capped at the model's context. The asset
/// model (widest input 512) gets 128 × 256; models with inputs of 4096 or more get GPTQ's
/// usual 128 × 2048.
pub fn sized_len(ck: &crate::model::Checkpoint, samples: usize) -> usize {
    let widest = ck
        .arch()
        .layers
        .iter()
        .flat_map(|l| &l.linears)
        .map(|l| l.in_features)
        .max()
        .unwrap_or(1);
    len_for(widest, samples, ck.config().max_position_embeddings)
}

/// [`sized_len`] for a widest linear input, a sequence count and a context.
fn len_for(widest: usize, samples: usize, context: usize) -> usize {
    (64 * widest)
        .div_ceil(samples.max(1))
        .next_power_of_two()
        .clamp(256, 2048)
        .min(context.max(2))
}

/// Calibration sequences: `samples` rows of `len` tokens.
#[derive(Clone, Debug)]
pub struct Calibration {
    pub tokens: Vec<u32>,
    pub info: CalibInfo,
}

/// Text files named directly, or every `.txt` file under a directory (sorted, recursive).
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|e| e == "txt") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(Error::InvalidArgument(format!(
                "--calib {}: no such file or directory",
                p.display()
            )));
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument("--calib names no text files".into()));
    }
    Ok(out)
}

/// Windows of `len` tokens at uniformly drawn positions of the tokenized files.
pub fn from_text(tok: &Tokenizer, paths: &[PathBuf], opts: &CalibOptions) -> Result<Calibration> {
    let files = expand_paths(paths)?;
    let mut docs = Vec::new();
    for f in &files {
        let text = crate::text::read_text(f, opts.newlines)?;
        docs.push(tok.encode(&text)?);
    }
    // Valid start positions per file, then draws over their union.
    let starts: Vec<usize> = docs
        .iter()
        .map(|d| (d.len() + 1).saturating_sub(opts.len))
        .collect();
    let total: usize = starts.iter().sum();
    if total == 0 {
        return Err(Error::InvalidArgument(format!(
            "the calibration text has no file of at least {} tokens (--calib-len)",
            opts.len
        )));
    }
    let mut rng = Rng::new(opts.seed);
    let mut tokens = Vec::with_capacity(opts.samples * opts.len);
    for _ in 0..opts.samples {
        let mut u = (rng.next_u64() % total as u64) as usize;
        let mut f = 0;
        while u >= starts[f] {
            u -= starts[f];
            f += 1;
        }
        tokens.extend_from_slice(&docs[f][u..u + opts.len]);
    }
    Ok(Calibration {
        info: CalibInfo {
            kind: "text".into(),
            files: files.iter().map(|f| f.display().to_string()).collect(),
            samples: opts.samples,
            len: opts.len,
            seed: opts.seed,
            tokens: tokens.len(),
        },
        tokens,
    })
}

/// Sample `samples` sequences of `len` tokens from the model (temperature 1, from BOS), many
/// sequences in lockstep through a batch KV cache.
pub fn self_generated(
    engine: &mut Engine<'_>,
    opts: &CalibOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Calibration> {
    let cfg = engine.checkpoint().config().clone();
    let bos = cfg.bos_token_id.ok_or_else(|| {
        Error::InvalidArgument(
            "self-calibration needs the model's bos_token_id; pass --calib FILE".into(),
        )
    })?;
    let gpu = engine.gpu();
    let kd = cfg.num_kv_heads * cfg.head_dim;
    // The cache of a batch must fit one binding.
    let per_seq = (opts.len * kd * 4) as u64;
    let max_batch = (gpu.caps().max_binding / per_seq.max(1)).max(1) as usize;
    let batch = opts.samples.min(max_batch).clamp(1, 128);
    let mut rng = Rng::new(opts.seed);
    let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(opts.samples);
    let total_steps = opts.samples.div_ceil(batch) * opts.len;
    let mut done = 0;
    while seqs.len() < opts.samples {
        let nb = batch.min(opts.samples - seqs.len());
        let mut cache = engine.new_batch_cache(nb, opts.len)?;
        let mut cur = vec![bos; nb];
        let mut out: Vec<Vec<u32>> = vec![vec![bos]; nb];
        for step in 1..opts.len {
            let h = engine.extend_batch(&mut cache, &cur)?;
            let z = engine.logits(&h, 0..nb)?.to_f32(gpu)?;
            let v = cfg.vocab_size;
            for b in 0..nb {
                cur[b] = sample(&z[b * v..(b + 1) * v], 1.0, 1.0, &mut rng) as u32;
                out[b].push(cur[b]);
            }
            done += 1;
            if step % 16 == 0 {
                progress(done, total_steps);
                crate::interrupt::check("stopped while sampling calibration sequences")?;
            }
        }
        done += 1;
        progress(done, total_steps);
        seqs.extend(out);
    }
    let tokens: Vec<u32> = seqs.concat();
    Ok(Calibration {
        info: CalibInfo {
            kind: "self".into(),
            files: Vec::new(),
            samples: opts.samples,
            len: opts.len,
            seed: opts.seed,
            tokens: tokens.len(),
        },
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::len_for;

    #[test]
    fn calibration_is_sized_to_the_widest_input() {
        // The asset model (192 wide, intermediate 512) at 128 sequences: 128 × 256 tokens.
        assert_eq!(len_for(512, 128, 1024), 256);
        // Fewer sequences, longer ones: the same token count.
        assert_eq!(len_for(512, 32, 1024), 1024);
        // Qwen2-0.5B (down_proj input 4864) and Llama-7B shapes: GPTQ's usual 2048.
        assert_eq!(len_for(4864, 128, 32768), 2048);
        assert_eq!(len_for(11008, 128, 4096), 2048);
        // Never past the model's context, never below 256 otherwise.
        assert_eq!(len_for(4864, 128, 512), 512);
        assert_eq!(len_for(64, 128, 4096), 256);
        assert_eq!(len_for(64, 128, 100), 100);
    }
}
