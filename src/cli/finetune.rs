//! `pumice finetune`: tune a CALDERA checkpoint's low-rank factors on the GPU against the
//! original model (distillation) or on text (cross-entropy), and write the tuned checkpoint.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use pumice::gpu::GpuOptions;
use pumice::model::{Checkpoint, LinearKind, Tokenizer};
use pumice::train::{finetune, AdapterPlan, Data, Event, FinetuneOptions, Loss};

use super::args::newlines;
use super::progress::{Progress, Reporter};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LossArg {
    /// KL(teacher ‖ model) per position against the teacher's logits.
    Distill,
    /// Next-token cross-entropy on --data.
    Ce,
}

#[derive(Args, Debug)]
pub(crate) struct FinetuneArgs {
    /// A CALDERA checkpoint written by `pumice compress --method caldera`; with --lora-rank any
    /// checkpoint (a GPTQ/RTN one, or an HF model).
    pub(crate) model: PathBuf,
    /// Output directory (a checkpoint of the same layout with the tuned factors).
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    pub(crate) force: bool,
    /// The original model (default: the source recorded in the checkpoint's pumice.json).
    #[arg(long)]
    pub(crate) teacher: Option<PathBuf>,
    /// Objective.
    #[arg(long, value_enum, default_value_t = LossArg::Distill)]
    pub(crate) loss: LossArg,
    /// Training text files or directories of .txt files (default: sequences sampled from the
    /// teacher, so no dataset is needed; cross-entropy needs --data).
    #[arg(long, num_args = 1..)]
    pub(crate) data: Vec<PathBuf>,
    /// Read --data byte for byte, keeping CRLF and lone CR.
    #[arg(long)]
    pub(crate) raw_text: bool,
    /// Training sequences and their length in tokens.
    #[arg(long, default_value_t = 64)]
    pub(crate) samples: usize,
    #[arg(long, default_value_t = 256)]
    pub(crate) len: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub(crate) steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub(crate) batch: usize,
    /// Micro-batches whose gradients are accumulated per step.
    #[arg(long, default_value_t = 1)]
    pub(crate) accum: usize,
    /// Peak learning rate (AdamW; linear warm-up, cosine decay to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    pub(crate) lr: f32,
    /// Warm-up steps (default: a tenth of --steps).
    #[arg(long)]
    pub(crate) warmup: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) weight_decay: f32,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) max_grad_norm: f32,
    /// Held-out text scored (KL against the teacher, perplexity) before and after tuning, in
    /// windows of --len tokens.
    #[arg(long)]
    pub(crate) eval_text: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub(crate) eval_windows: usize,
    /// Bits of the stored factor grid (default: the checkpoint's; more bits store the tuned
    /// factors more finely, counted in the output's size).
    #[arg(long)]
    pub(crate) factor_bits: Option<u32>,
    /// Train the factors in f32 without rounding them to the stored grid in the passes (by
    /// default training is quantization-aware: the passes see the factors as they will be
    /// stored, and the f32 masters take the gradients).
    #[arg(long)]
    pub(crate) no_qat: bool,
    /// Train LoRA adapters of this rank instead of CALDERA's factors (any checkpoint: a
    /// GPTQ/RTN one, or an HF model); written as a PEFT adapter directory.
    #[arg(long)]
    pub(crate) lora_rank: Option<usize>,
    /// LoRA's α (scale α/r; default 2·rank, Edge-LLM's r = 8, α = 16).
    #[arg(long)]
    pub(crate) lora_alpha: Option<f32>,
    /// Linears that get LoRA adapters.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub(crate) lora_targets: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Keep the model's frozen layers (dequantized) on the GPU while they fit in this many
    /// MiB; the layers past it are read and dequantized again at every forward and backward
    /// pass (slower, bounded memory; the result is the same bytes).
    #[arg(long, default_value_t = 2048)]
    pub(crate) max_resident_mb: u64,
    /// Edge-LLM's adaptive layer tuning: an exit (its own final norm and LM head, starting
    /// from the model's) after every E decoder layers; steps take the exits in turn, the
    /// model's head last. The trained exits are written beside the output (exits.safetensors,
    /// counted in its size) for `eval`/`generate --vote`.
    #[arg(long, default_value_t = 0)]
    pub(crate) exit_every: usize,
    /// Train only the adapters of the K layers below the step's exit (backpropagation depth
    /// and saved activations bounded by K; 0: every layer below it).
    #[arg(long, default_value_t = 0)]
    pub(crate) window: usize,
    /// Save the training state here (every --save-every steps and when stopped by SIGINT or
    /// SIGTERM) so that --resume continues where it stopped, also after SIGKILL; the result
    /// equals an uninterrupted run's byte for byte.
    #[arg(long)]
    pub(crate) work_dir: Option<PathBuf>,
    #[arg(long, requires = "work_dir")]
    pub(crate) resume: bool,
    #[arg(long, default_value_t = 10)]
    pub(crate) save_every: usize,
    /// JSON lines on stdout (implied when stdout is not a terminal).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(gpu_opts: &GpuOptions, a: FinetuneArgs) -> anyhow::Result<()> {
    let student = Checkpoint::open(&a.model)?;
    if a.lora_rank.is_none() && student.manifest().is_none() {
        return Err(pumice::Error::InvalidArgument(format!(
            "{} is not a pumice-compressed checkpoint (no pumice.json): tuning CALDERA's factors \
             needs one (or train LoRA adapters with --lora-rank R)",
            a.model.display()
        ))
        .into());
    }
    // The teacher: named, or the source a compressed checkpoint records, or (cross-entropy on
    // a plain model: the KL reported is then against the model before tuning) the model itself.
    let teacher_dir = match (&a.teacher, student.manifest(), a.loss) {
        (Some(t), _, _) => t.clone(),
        (None, Some(m), _) => PathBuf::from(&m.source.path),
        (None, None, LossArg::Ce) => a.model.clone(),
        (None, None, LossArg::Distill) => {
            return Err(pumice::Error::InvalidArgument(format!(
                "{} records no source model (no pumice.json): name the teacher with --teacher",
                a.model.display()
            ))
            .into())
        }
    };
    let loss = match a.loss {
        LossArg::Distill => Loss::Distill,
        LossArg::Ce => Loss::CrossEntropy,
    };
    if loss == Loss::CrossEntropy && a.data.is_empty() {
        return Err(pumice::Error::InvalidArgument(
            "--loss ce needs --data FILE (distillation can sample its own)".into(),
        )
        .into());
    }
    let teacher = Checkpoint::open(&teacher_dir)?;
    let nl = newlines(a.raw_text);
    let eval_tokens = match &a.eval_text {
        Some(p) => {
            let tok = Tokenizer::from_model_dir(&a.model)?.ok_or_else(|| {
                pumice::Error::InvalidArgument(format!(
                    "{} has no tokenizer.json to read --eval-text with",
                    a.model.display()
                ))
            })?;
            let ids = tok.encode(&pumice::text::read_text(p, nl)?)?;
            let n = (ids.len() / a.len.max(1)).min(a.eval_windows);
            if n == 0 {
                return Err(pumice::Error::input(
                    p,
                    format!(
                        "{} tokens, fewer than one window of --len {}",
                        ids.len(),
                        a.len
                    ),
                )
                .into());
            }
            Some(ids[..n * a.len].to_vec())
        }
        None => None,
    };
    let opts = FinetuneOptions {
        plan: match a.lora_rank {
            None => AdapterPlan::Factors {
                factor_bits: a.factor_bits,
                qat: !a.no_qat,
            },
            Some(rank) => AdapterPlan::Lora {
                rank,
                alpha: a.lora_alpha.unwrap_or(2.0 * rank as f32),
                targets: a
                    .lora_targets
                    .iter()
                    .map(|t| {
                        LinearKind::ALL
                            .into_iter()
                            .find(|k| k.module().rsplit('.').next() == Some(t.as_str()))
                            .ok_or_else(|| {
                                pumice::Error::InvalidArgument(format!(
                                    "--lora-targets: unknown linear `{t}` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                seed: a.seed,
            },
        },
        loss,
        data: if a.data.is_empty() {
            Data::SelfGenerated
        } else {
            Data::Text(a.data.clone())
        },
        samples: a.samples,
        len: a.len,
        seed: a.seed,
        newlines: nl,
        steps: a.steps,
        batch: a.batch,
        accum: a.accum,
        lr: a.lr,
        warmup: a.warmup.unwrap_or(a.steps / 10),
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        resident_bytes: a.max_resident_mb << 20,
        eval_tokens,
        exit_every: a.exit_every,
        window: a.window,
        work_dir: a.work_dir.clone(),
        resume: a.resume,
        save_every: a.save_every,
    };
    let mut rep = Reporter::new(a.json);
    let gpu = super::setup::open_gpu(gpu_opts)?;
    tracing::info!("fine-tuning on {}", gpu.describe());
    let json = rep.json();
    let mut bar: Option<Progress> = None;
    let report = finetune(
        &gpu,
        &student,
        &teacher,
        &a.output,
        a.force,
        &opts,
        &mut |e: &Event| match e {
            Event::Sampling { done, total } => {
                let b = bar.get_or_insert_with(|| Progress::new("sample", *total as u64, "steps"));
                b.set(*done as u64);
                if done == total {
                    b.finish();
                    bar = None;
                }
            }
            Event::Evaluating { phase } => {
                rep.emit("evaluating", serde_json::json!({ "phase": phase }));
            }
            Event::Step(s) => {
                rep.emit("step", serde_json::to_value(s).unwrap_or_default());
                if !json {
                    let b =
                        bar.get_or_insert_with(|| Progress::new("tune", s.steps as u64, "steps"));
                    b.set(s.step as u64);
                    if s.step == s.steps {
                        b.finish();
                        bar = None;
                    }
                    if s.step == 1 || s.step % 10 == 0 || s.step == s.steps {
                        eprintln!(
                            "step {}/{}: loss {:.5}, |g| {:.3}, lr {:.2e}, {:.0} tokens/s",
                            s.step, s.steps, s.loss, s.grad_norm, s.lr, s.tokens_per_second
                        );
                    }
                }
            }
            Event::Writing { done, total } => {
                rep.emit(
                    "writing",
                    serde_json::json!({ "layer": done, "layers": total }),
                );
            }
        },
    )?;
    let mut summary = serde_json::to_value(&report)?;
    if let Some(o) = summary.as_object_mut() {
        o.insert("output".into(), a.output.display().to_string().into());
        o.insert("teacher".into(), teacher_dir.display().to_string().into());
        o.insert("adapter".into(), gpu.describe().into());
    }
    rep.conclude(summary, || {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "tuned {} values over {} steps ({} tokens each): loss {:.5} → {:.5}, {:.0} tokens/s, peak GPU memory {:.1} MiB",
            report.trainable_values,
            report.steps,
            report.tokens_per_step,
            report.first_loss,
            report.last_loss,
            report.tokens_per_second,
            report.peak_gpu_bytes as f64 / (1u64 << 20) as f64
        )?;
        if let (Some(b), Some(f)) = (report.before, report.after) {
            writeln!(
                out,
                "held-out KL(teacher ‖ model) {:.6} → {:.6} (f32 factors), perplexity {:.3} → {:.3}",
                b.kl, f.kl, b.perplexity, f.perplexity
            )?;
        }
        match report.factor_bits {
            Some(bits) => writeln!(
                out,
                "wrote {} ({:.2} MiB, factors on a {bits}-bit grid)",
                a.output.display(),
                report.output_bytes as f64 / (1u64 << 20) as f64,
            ),
            None => writeln!(
                out,
                "wrote the PEFT adapter {} ({:.2} MiB)",
                a.output.display(),
                report.output_bytes as f64 / (1u64 << 20) as f64,
            ),
        }
    })?;
    Ok(())
}
