//! `pumice eval`: perplexity and KL on a text.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use pumice::gpu::GpuOptions;
use pumice::infer::eval::{evaluate, window_count, EvalOptions, EvalProgress};
use pumice::infer::{Engine, EngineOptions};
use pumice::model::{Checkpoint, Tokenizer};

use super::args::*;
use super::progress;

pub(crate) const EVAL_PROTOCOL: &str = "\
Protocol: the whole file is tokenized with the model's tokenizer.json, no special tokens; it is
cut into consecutive non-overlapping windows of --ctx tokens and the tail is dropped; no BOS is
added; each window is scored on its positions 1..ctx-1 (each predicted from the tokens before it
in the window); the mean NLL is taken over all scored positions and perplexity = exp(mean NLL).
With --ref, the reference model runs on the same windows: kl_divergence is the mean over scored
positions of KL(ref || model), kl_divergence_p99 its 99th percentile, top1_agreement the fraction
of positions where both models' most likely next token agree.";

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// Model directory.
    pub(crate) model: PathBuf,
    /// Text file to evaluate on (tokenized with the model's tokenizer.json).
    #[arg(
        long,
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    pub(crate) text: Option<PathBuf>,
    /// Whitespace-separated token ids instead of text (for models without a tokenizer).
    #[arg(long)]
    pub(crate) token_file: Option<PathBuf>,
    /// Tokenize text files byte for byte, keeping CRLF and lone CR (llama.cpp's way). By
    /// default text is read as Python's text mode reads it: CRLF and lone CR become LF.
    #[arg(long)]
    pub(crate) raw_text: bool,

    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub(crate) ctx: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    pub(crate) max_windows: Option<usize>,
    /// Windows per forward batch.
    #[arg(long, default_value_t = 4)]
    pub(crate) batch: usize,
    /// Reference model (e.g. the uncompressed original) for KL divergence and top-1 agreement.
    #[arg(long = "ref")]
    pub(crate) reference: Option<PathBuf>,
    /// Keep decoder layers on the GPU when they fit in this many MiB; larger models are
    /// streamed layer by layer for every batch.
    #[arg(long, default_value_t = 2048)]
    pub(crate) max_resident_mb: u64,
    /// Score the vote of the model's head and its exits (Edge-LLM; `exits.safetensors`, from
    /// `finetune --exit-every`): per token the element-wise maximum of their softmax,
    /// renormalized.
    #[arg(long, conflicts_with = "exit")]
    pub(crate) vote: bool,
    /// Score one exit alone: its norm and head on the stream after D layers, the model's own
    /// head left out (how good each exit is by itself).
    #[arg(long, value_name = "D")]
    pub(crate) exit: Option<usize>,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to apply
    /// to the model, e.g. one `finetune --lora-rank` wrote.
    #[arg(long)]
    pub(crate) lora: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(gpu_opts: &GpuOptions, a: EvalArgs) -> anyhow::Result<()> {
    let ck = Checkpoint::open(&a.model)?;
    let reference = a.reference.as_ref().map(Checkpoint::open).transpose()?;
    let (tokens, source) = match (&a.text, &a.token_file) {
        (_, Some(f)) => (read_token_file(f)?, f),
        (Some(t), None) => {
            let tok = Tokenizer::from_model_dir(&a.model)?.ok_or_else(|| {
                pumice::Error::InvalidArgument(format!(
                    "{} has no tokenizer.json; pass token ids with --token-file",
                    a.model.display()
                ))
            })?;
            let text = pumice::text::read_text(t, newlines(a.raw_text))?;
            (tok.encode(&text)?, t)
        }
        (None, None) => {
            return Err(pumice::Error::InvalidArgument(
                "eval needs --text FILE or --token-file FILE".into(),
            )
            .into())
        }
    };
    let windows = window_count(tokens.len(), a.ctx, a.max_windows);
    // Checked before anything is sized from --ctx (the RoPE table, the KV buffers).
    if a.ctx < 2 {
        return Err(pumice::Error::InvalidArgument(format!(
            "--ctx {}: windows need at least 2 tokens",
            a.ctx
        ))
        .into());
    }
    if windows == 0 {
        return Err(pumice::Error::input(
            source,
            format!(
                "{} tokens, fewer than one window of --ctx {}",
                tokens.len(),
                a.ctx
            ),
        )
        .into());
    }
    let adapter = super::args::read_adapter(a.lora.as_deref(), &ck)?;
    let exits = super::args::exits_for_vote(
        a.vote || a.exit.is_some(),
        &ck,
        adapter.as_ref(),
        a.lora.as_deref(),
    )?;
    if let (Some(d), Some(x)) = (a.exit, exits) {
        x.check_depth(d)?;
    }
    let gpu = super::setup::open_gpu(gpu_opts)?;
    tracing::info!("evaluating on {}", gpu.describe());
    let eopts = EngineOptions {
        resident_bytes: a.max_resident_mb << 20,
        max_positions: a.ctx,
    };
    let mut engine = Engine::new(&gpu, &ck, &eopts)?;
    if let Some(ad) = &adapter {
        engine.apply_lora(ad)?;
    }
    match (exits, a.exit) {
        (Some(x), Some(d)) => engine.load_exit_alone(x, d)?,
        (Some(x), None) => engine.load_exits(x)?,
        _ => {}
    }
    let mut ref_engine = match &reference {
        Some(r) => Some(Engine::new(&gpu, r, &eopts)?),
        None => None,
    };
    let opts = EvalOptions {
        ctx: a.ctx,
        max_windows: a.max_windows,
        batch: a.batch,
    };
    let mut bar = progress::Progress::new("eval", windows as u64, "windows");
    let report = evaluate(
        &mut engine,
        ref_engine.as_mut(),
        &tokens,
        &opts,
        &mut |p: EvalProgress| bar.set(p.windows_done as u64),
    )?;
    bar.finish();
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        let o = v.as_object_mut().expect("report is an object");
        o.insert("model".into(), a.model.display().to_string().into());
        if let Some(t) = a.text.as_ref().or(a.token_file.as_ref()) {
            o.insert("text".into(), t.display().to_string().into());
        }
        if let Some(r) = &a.reference {
            o.insert("reference".into(), r.display().to_string().into());
        }
        o.insert("adapter".into(), gpu.describe().into());
        if let Some(d) = a.exit {
            o.insert("exit".into(), d.into());
        }
        if let Some(d) = &a.lora {
            o.insert("lora".into(), d.display().to_string().into());
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "perplexity {:.4} (mean NLL {:.6}) over {} windows of {} tokens ({} scored)",
        report.perplexity, report.mean_nll, report.windows, report.ctx, report.predicted_tokens
    )?;
    if let (Some(kl), Some(p99), Some(top1)) = (
        report.kl_divergence,
        report.kl_divergence_p99,
        report.top1_agreement,
    ) {
        writeln!(
            out,
            "KL(ref || model) {kl:.6} (p99 {p99:.6}), top-1 agreement {top1:.4}"
        )?;
    }
    writeln!(
        out,
        "{:.1} s, {:.0} tokens/s, peak GPU memory {:.1} MiB ({}) on {}",
        report.seconds,
        report.tokens_per_second,
        report.peak_gpu_bytes as f64 / (1u64 << 20) as f64,
        if report.resident_layers {
            "layers resident"
        } else {
            "layers streamed"
        },
        gpu.describe()
    )?;
    Ok(())
}
