//! `pumice generate`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use pumice::gpu::GpuOptions;
use pumice::infer::generate::{generate, GenerateOptions};
use pumice::infer::{Engine, EngineOptions};
use pumice::model::{Checkpoint, Tokenizer};

use super::args::*;

#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    /// Model directory.
    pub(crate) model: PathBuf,
    /// Prompt text (empty: start from the BOS token). CRLF and lone CR become LF unless
    /// --raw-text is given.
    #[arg(long, default_value = "")]
    pub(crate) prompt: String,
    /// Keep CRLF and lone CR in the prompt as they are.
    #[arg(long)]
    pub(crate) raw_text: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_tokens: usize,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.8, value_parser = parse_temperature)]
    pub(crate) temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (0 < p ≤ 1).
    #[arg(long, default_value_t = 0.95, value_parser = parse_top_p)]
    pub(crate) top_p: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// See `eval --max-resident-mb`.
    #[arg(long, default_value_t = 2048)]
    pub(crate) max_resident_mb: u64,
    /// Predict from the vote of the model's head and its exits (see `eval --vote`).
    #[arg(long)]
    pub(crate) vote: bool,
    /// A PEFT LoRA adapter directory to apply to the model (see `eval --lora`).
    #[arg(long)]
    pub(crate) lora: Option<PathBuf>,
}

pub(crate) fn run(gpu_opts: &GpuOptions, a: GenerateArgs) -> anyhow::Result<()> {
    let ck = Checkpoint::open(&a.model)?;
    let tok = Tokenizer::from_model_dir(&a.model)?.ok_or_else(|| {
        pumice::Error::InvalidArgument(format!("{} has no tokenizer.json", a.model.display()))
    })?;
    let prompt_text = pumice::text::normalize(&a.prompt, newlines(a.raw_text)).into_owned();
    let prompt = tok.encode(&prompt_text)?;
    let limit = ck.config().max_position_embeddings.max(1);
    let positions = match prompt.len().max(1).checked_add(a.max_tokens) {
        Some(p) if p <= limit => p,
        _ => {
            return Err(pumice::Error::InvalidArgument(format!(
                "--max-tokens {}: the prompt's {} tokens plus that exceed the model's {limit} positions (max_position_embeddings); at most {} more fit",
                a.max_tokens,
                prompt.len(),
                limit.saturating_sub(prompt.len().max(1))
            ))
            .into())
        }
    };
    let adapter = super::args::read_adapter(a.lora.as_deref(), &ck)?;
    let exits = super::args::exits_for_vote(a.vote, &ck, adapter.as_ref(), a.lora.as_deref())?;
    let gpu = super::setup::open_gpu(gpu_opts)?;
    let mut engine = Engine::new(
        &gpu,
        &ck,
        &EngineOptions {
            resident_bytes: a.max_resident_mb << 20,
            max_positions: positions,
        },
    )?;
    if let Some(ad) = &adapter {
        engine.apply_lora(ad)?;
    }
    if let Some(x) = exits {
        engine.load_exits(x)?;
    }
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop_at_eos: !a.ignore_eos,
    };
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt_text}")?;
    out.flush()?;
    // Decode the whole continuation each time and print what is new, so multi-token characters
    // come out whole.
    let mut ids = Vec::new();
    let mut shown = String::new();
    generate(&mut engine, &prompt, &opts, &mut |id| {
        ids.push(id);
        let text = tok.decode(&ids)?;
        if let Some(new) = text.strip_prefix(shown.as_str()) {
            let _ = write!(out, "{new}");
            let _ = out.flush();
            shown = text;
        }
        Ok(())
    })?;
    writeln!(out)?;
    Ok(())
}
