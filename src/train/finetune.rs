//! `pumice finetune` as one call: data (text windows or sequences sampled from the teacher),
//! the training loop (micro-batches, gradient accumulation, AdamW with warm-up and cosine
//! decay, clipping), held-out evaluation before and after, and the output: a native
//! checkpoint whose CALDERA factors are the tuned ones, quantized again on the stored factor
//! grid (or a finer one) and rotated back into the stored space.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::base::rng::Rng;
use crate::compress::calib::{self, CalibOptions};
use crate::error::{Error, Result};
use crate::gpu::xent::{Objective, IGNORE};
use crate::gpu::{Gpu, GpuMatrix};
use crate::infer::{Engine, EngineOptions};
use crate::model::{Checkpoint, Tokenizer};

use super::model::{AdapterPlan, TrainModel};
use super::params::{Trainable, Window};

/// Host memory the teacher's hidden states of the training data may take to be formed once.
pub const TEACHER_CACHE_BYTES: u64 = 1 << 30;

/// What the model is trained against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// KL(teacher ‖ model) per position, the teacher's logits formed per block.
    Distill,
    /// Next-token cross-entropy on the data.
    CrossEntropy,
}

/// Where the training sequences come from.
#[derive(Clone, Debug)]
pub enum Data {
    /// Windows of text files (as calibration draws them).
    Text(Vec<PathBuf>),
    /// Sequences sampled from the teacher (temperature 1, from BOS): no dataset needed.
    SelfGenerated,
}

#[derive(Clone, Debug)]
pub struct FinetuneOptions {
    pub plan: AdapterPlan,
    pub loss: Loss,
    pub data: Data,
    /// Training sequences and their length.
    pub samples: usize,
    pub len: usize,
    pub seed: u64,
    pub newlines: crate::text::Newlines,
    /// Optimizer steps; sequences per micro-batch; micro-batches per step.
    pub steps: usize,
    pub batch: usize,
    pub accum: usize,
    pub lr: f32,
    pub warmup: usize,
    pub weight_decay: f32,
    pub max_grad_norm: f32,
    /// Held-out token windows (eval_windows × len) scored before and after, when given.
    pub eval_tokens: Option<Vec<u32>>,
    /// Edge-LLM's adaptive layer tuning: exits after every `exit_every` layers (0: none), and
    /// each step trains the adapters of the `window` layers below one exit (the exits taken in
    /// turn, the model's own head last; 0: every layer below it).
    pub exit_every: usize,
    pub window: usize,
    /// Save the state here every `save_every` steps (and when stopped); `resume` continues
    /// from it.
    pub work_dir: Option<PathBuf>,
    pub resume: bool,
    pub save_every: usize,
    /// Keep the student's frozen layers on the GPU while they fit in this many bytes; the
    /// rest are read again (dequantized on the GPU) at each pass. Run control: the result is
    /// the same bytes whatever it is.
    pub resident_bytes: u64,
}

/// Progress of a fine-tune.
#[derive(Clone, Debug)]
pub enum Event {
    /// Sampling training sequences from the teacher.
    Sampling {
        done: usize,
        total: usize,
    },
    /// Evaluating the held-out windows ("before" or "after").
    Evaluating {
        phase: &'static str,
    },
    Step(StepReport),
    /// Writing the output, layer by layer.
    Writing {
        done: usize,
        total: usize,
    },
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f32,
    pub tokens_per_second: f64,
}

/// The held-out score of the model being trained.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct HeldOut {
    /// Mean KL(teacher ‖ model) over every position of the windows.
    pub kl: f64,
    /// exp of the mean next-token NLL (positions 0..len−2 of each window).
    pub perplexity: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct FinetuneReport {
    pub steps: usize,
    pub trainable_values: usize,
    pub tokens_per_step: usize,
    /// Mean loss of the first and the last ten steps.
    pub first_loss: f64,
    pub last_loss: f64,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    pub peak_gpu_bytes: u64,
    /// Decoder layers whose frozen weights stayed on the GPU (the rest were read again at
    /// each pass: `--max-resident-mb`).
    pub resident_layers: usize,
    pub before: Option<HeldOut>,
    /// With the tuned factors in f32 (before they are quantized for storage).
    pub after: Option<HeldOut>,
    pub output_bytes: u64,
    /// The stored factor grid's bits (CALDERA's factors).
    pub factor_bits: Option<u32>,
    /// GPU time per kernel (with --profile / PUMICE_PROFILE) and shader build times.
    pub kernels: crate::gpu::profile::ProfileReport,
}

/// Check what can be checked before any GPU work: the output target, the student's factors,
/// the teacher's vocabulary, the text files.
fn validate(
    student: &Checkpoint,
    teacher: &Checkpoint,
    out: &Path,
    force: bool,
    opts: &FinetuneOptions,
) -> Result<()> {
    crate::base::outdir::check_output(student.dir(), out, force)?;
    if teacher.dir() == out {
        return Err(Error::InvalidArgument(format!(
            "{}: the output would replace the teacher",
            out.display()
        )));
    }
    if let AdapterPlan::Factors { .. } = opts.plan {
        let manifest = student.manifest().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} is not a pumice-compressed checkpoint (no pumice.json): tuning CALDERA's \
                 factors needs one (or train LoRA adapters)",
                student.dir().display()
            ))
        })?;
        if !manifest.tensors.values().any(|e| e.rank > 0) {
            return Err(Error::InvalidArgument(format!(
                "{}: no weight has low-rank factors (compress with --method caldera, or train \
                 LoRA adapters)",
                student.dir().display()
            )));
        }
    }
    if let AdapterPlan::Lora { rank, targets, .. } = &opts.plan {
        if *rank == 0 || targets.is_empty() {
            return Err(Error::InvalidArgument(
                "LoRA needs a rank of at least 1 and at least one target".into(),
            ));
        }
    }
    let (sv, tv) = (student.config().vocab_size, teacher.config().vocab_size);
    if sv != tv {
        return Err(Error::InvalidArgument(format!(
            "the teacher {} has a vocabulary of {tv}, the model {sv}",
            teacher.dir().display()
        )));
    }
    if let AdapterPlan::Factors {
        factor_bits: Some(bits),
        ..
    } = opts.plan
    {
        crate::quant::Grid::new(bits, 0, crate::quant::GridKind::Asymmetric)
            .map_err(|e| Error::InvalidArgument(format!("--factor-bits {bits}: {e}")))?;
    }
    let bad = |what: &str| Err(Error::InvalidArgument(what.to_string()));
    if opts.steps == 0 || opts.batch == 0 || opts.accum == 0 {
        return bad("--steps, --batch and --accum must be at least 1");
    }
    if opts.len < 2 || opts.samples == 0 {
        return bad("--len must be at least 2 and --samples at least 1");
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return bad("--lr must be a positive number");
    }
    if let Some(d) = &opts.work_dir {
        if !opts.resume && super::workdir::path(d).exists() {
            return Err(Error::work_dir(
                d,
                "holds a fine-tune in progress: pass --resume to continue it, or remove it",
            ));
        }
    }
    if let Data::Text(paths) = &opts.data {
        for p in calib::expand_paths(paths)? {
            std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// What makes a work directory's state this job's: the inputs and every option that changes
/// what is trained (not the held-out text, the work directory or how often it is saved).
/// Training sequences whose activations weigh the refit of the written factors.
const HESSIAN_SEQUENCES: usize = 16;

fn fingerprint(student: &Checkpoint, teacher: &Checkpoint, opts: &FinetuneOptions) -> String {
    let dir = |c: &Checkpoint| {
        std::fs::canonicalize(c.dir())
            .unwrap_or_else(|_| c.dir().to_path_buf())
            .display()
            .to_string()
    };
    let inputs: std::collections::BTreeMap<String, String> = [
        ("student", dir(student)),
        ("teacher", dir(teacher)),
        (
            "options",
            format!(
                "{:?} {:?} {:?} {} {} {} {:?} {} {} {} {} {} {} {} {} {}",
                opts.plan,
                opts.loss,
                opts.data,
                opts.samples,
                opts.len,
                opts.seed,
                opts.newlines,
                opts.steps,
                opts.batch,
                opts.accum,
                opts.lr,
                opts.warmup,
                opts.weight_decay,
                opts.max_grad_norm,
                opts.exit_every,
                opts.window
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    crate::compress::workdir::fingerprint(&inputs)
}

/// The learning rate at step `s` (1-based): linear warm-up over `warmup` steps, then cosine
/// decay to a tenth of `lr` at the last step.
pub fn schedule(lr: f32, s: usize, warmup: usize, steps: usize) -> f32 {
    if s <= warmup {
        return lr * s as f32 / warmup.max(1) as f32;
    }
    let span = steps.saturating_sub(warmup).max(1) as f64;
    let p = ((s - warmup) as f64 / span).min(1.0);
    (lr as f64 * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))) as f32
}

/// Next-token targets of whole sequences of `t` (the last position of each ignored).
pub fn next_tokens(tokens: &[u32], t: usize) -> Vec<u32> {
    (0..tokens.len())
        .map(|r| {
            if r % t == t - 1 {
                IGNORE
            } else {
                tokens[r + 1]
            }
        })
        .collect()
}

/// Fine-tune `student`'s CALDERA factors against `teacher` and write the result to `out`.
pub fn finetune(
    gpu: &Gpu,
    student: &Checkpoint,
    teacher: &Checkpoint,
    out: &Path,
    force: bool,
    opts: &FinetuneOptions,
    on: &mut dyn FnMut(&Event),
) -> Result<FinetuneReport> {
    let fp = fingerprint(student, teacher, opts);
    // A resumed job may find its own output, committed just before a kill ended the process:
    // replacing it with the identical one loses nothing.
    let force = force
        || (opts.resume
            && opts
                .work_dir
                .as_deref()
                .is_some_and(|d| crate::base::outdir::written_by(d, &fp, out)));
    validate(student, teacher, out, force, opts)?;
    let len = opts.len;
    let positions = len.max(1);
    // The teacher follows the same budget (resident whole, or streamed layer by layer).
    let eopts = EngineOptions {
        max_positions: positions,
        resident_bytes: opts.resident_bytes,
    };
    let mut teacher_engine = Engine::new(gpu, teacher, &eopts)?;
    let copts = CalibOptions {
        samples: opts.samples,
        len,
        seed: opts.seed,
        hessians_on: crate::lowrank::fit::Placement::Auto,
        newlines: opts.newlines,
    };
    let saved = match &opts.work_dir {
        Some(d) if opts.resume => super::workdir::State::read(d, &fp)?,
        _ => None,
    };
    let tokens = match &saved {
        Some(s) => s.tokens.clone(),
        None => {
            match &opts.data {
                Data::Text(paths) => {
                    let tok = Tokenizer::from_model_dir(student.dir())?.ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "{} has no tokenizer.json to read --data with",
                            student.dir().display()
                        ))
                    })?;
                    calib::from_text(&tok, &calib::expand_paths(paths)?, &copts)?
                }
                Data::SelfGenerated => {
                    calib::self_generated(&mut teacher_engine, &copts, &mut |d, t| {
                        on(&Event::Sampling { done: d, total: t })
                    })?
                }
            }
            .tokens
        }
    };
    let student_engine = Engine::new(gpu, student, &eopts)?;
    let trainable = Trainable {
        adapters: Vec::new(),
        exits: Vec::new(),
        opt: crate::gpu::grad::AdamW {
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
        max_grad_norm: opts.max_grad_norm,
        step: 0,
        qat: false,
    };
    let mut model = TrainModel::new(student_engine, &opts.plan, trainable, opts.resident_bytes)?;
    if opts.exit_every > 0 {
        model.add_exits(opts.exit_every)?;
    }
    let n_layers = student.config().num_layers;
    // Step s trains below route (s − 1) mod (exits + 1): the exits in turn, then the model's
    // head.
    let route = |step: usize, model: &TrainModel<'_>| -> Option<Window> {
        if opts.exit_every == 0 && opts.window == 0 {
            return None;
        }
        let n_exits = model.trainable.exits.len();
        let r = (step - 1) % (n_exits + 1);
        let (exit, depth) = if r < n_exits {
            (Some(r), model.trainable.exits[r].depth)
        } else {
            (None, n_layers)
        };
        let lo = if opts.window == 0 {
            0
        } else {
            depth.saturating_sub(opts.window)
        };
        Some(Window {
            layers: lo..depth,
            exit,
        })
    };
    let mut losses = Vec::with_capacity(opts.steps);
    if let Some(s) = &saved {
        let n = model.trainable.params().count();
        if s.params.len() != n || s.step > opts.steps {
            return Err(Error::work_dir(
                super::workdir::path(opts.work_dir.as_deref().expect("read from it")),
                format!(
                    "holds {} parameters at step {}; this job has {n} and {} steps",
                    s.params.len(),
                    s.step,
                    opts.steps
                ),
            ));
        }
        for ((p, state), &t) in model
            .trainable
            .params_mut()
            .zip(&s.params)
            .zip(&s.param_steps)
        {
            p.restore(gpu, state)?;
            p.t = t;
        }
        model.trainable.step = s.step as u32;
        if s.step > 0 {
            model.trainable.round(gpu)?;
        }
        losses = s.losses.clone();
    }
    let held_out = |model: &TrainModel<'_>, teacher: &mut Engine<'_>| -> Result<HeldOut> {
        let tokens = opts.eval_tokens.as_deref().unwrap_or_default();
        let mut kl = 0.0;
        let mut nll = 0.0;
        let per = opts.batch * len;
        let batches = tokens.len() / per.max(1) + usize::from(!tokens.len().is_multiple_of(per));
        let mut counted = (0.0, 0.0);
        for i in 0..batches {
            let b = &tokens[i * per..((i + 1) * per).min(tokens.len())];
            let th = teacher.hidden_states(b, len)?;
            let obj = Objective::Teacher {
                hidden: &th,
                head: teacher.head(),
            };
            let rows = b.len() as f64;
            kl += model.loss(b, len, &obj)? * rows;
            let targets = next_tokens(b, len);
            let scored = (b.len() / len * (len - 1)) as f64;
            nll += model.loss(b, len, &Objective::Targets(&targets))? * scored;
            counted.0 += rows;
            counted.1 += scored;
        }
        Ok(HeldOut {
            kl: kl / counted.0,
            perplexity: (nll / counted.1).exp(),
        })
    };
    let evaluate = opts.eval_tokens.as_ref().is_some_and(|t| t.len() >= len);
    let before = match &saved {
        Some(s) => s.before,
        None if evaluate => {
            on(&Event::Evaluating { phase: "before" });
            Some(held_out(&model, &mut teacher_engine)?)
        }
        None => None,
    };
    let save = |model: &TrainModel<'_>, losses: &[f64]| -> Result<()> {
        let Some(d) = &opts.work_dir else {
            return Ok(());
        };
        super::workdir::State {
            fingerprint: fp.clone(),
            step: losses.len(),
            losses: losses.to_vec(),
            before,
            tokens: tokens.clone(),
            params: model
                .trainable
                .params()
                .map(|p| p.state(gpu))
                .collect::<Result<_>>()?,
            param_steps: model.trainable.params().map(|p| p.t).collect(),
        }
        .write(d)
    };
    if saved.is_none() {
        save(&model, &losses)?;
    }

    // Training: sequences in a seeded random order, reshuffled every pass over the data.
    let nseq = tokens.len() / len;
    let mut rng = Rng::new(opts.seed ^ 0x5EED_F17E);
    let mut order: Vec<usize> = Vec::new();
    let mut next = || -> usize {
        if order.is_empty() {
            order = (0..nseq).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
        }
        order.pop().expect("refilled above")
    };
    let per_micro = opts.batch.min(nseq).max(1);
    let tokens_per_step = per_micro * opts.accum * len;
    let done = losses.len();
    // The sequences the steps already done took, so the order continues where it stopped.
    for _ in 0..done * opts.accum * per_micro {
        next();
    }
    // The teacher's final hidden states of every training sequence, formed once when they
    // fit TEACHER_CACHE_BYTES of host memory (each sequence is revisited every pass over the
    // data); otherwise formed again for every micro-batch.
    let d = teacher.config().hidden_size;
    let cache =
        if opts.loss == Loss::Distill && (tokens.len() * d * 4) as u64 <= TEACHER_CACHE_BYTES {
            let mut c = Vec::with_capacity(tokens.len() * d);
            for part in tokens.chunks(per_micro * len) {
                c.extend(teacher_engine.hidden_states(part, len)?.to_f32(gpu)?);
            }
            Some(c)
        } else {
            None
        };
    let started = Instant::now();
    for step in done + 1..=opts.steps {
        let t0 = Instant::now();
        model.trainable.zero_grad(gpu);
        let window = route(step, &model);
        let mut loss = 0.0;
        for _ in 0..opts.accum {
            let seqs: Vec<usize> = (0..per_micro).map(|_| next()).collect();
            let tokens: Vec<u32> = seqs
                .iter()
                .flat_map(|&s| tokens[s * len..(s + 1) * len].to_vec())
                .collect();
            let (th, targets);
            let obj = match opts.loss {
                Loss::Distill => {
                    th = match &cache {
                        Some(c) => {
                            let vals: Vec<f32> = seqs
                                .iter()
                                .flat_map(|&s| c[s * len * d..(s + 1) * len * d].to_vec())
                                .collect();
                            GpuMatrix::from_f32_grouped(gpu, tokens.len(), d, len, &vals)?
                        }
                        None => teacher_engine.hidden_states(&tokens, len)?,
                    };
                    Objective::Teacher {
                        hidden: &th,
                        head: teacher_engine.head(),
                    }
                }
                Loss::CrossEntropy => {
                    targets = next_tokens(&tokens, len);
                    Objective::Targets(&targets)
                }
            };
            loss += match &window {
                Some(w) => model.loss_and_backward_window(&tokens, len, &obj, w)?.loss,
                None => model.loss_and_backward(&tokens, len, &obj)?.loss,
            };
        }
        let lr = schedule(opts.lr, step, opts.warmup, opts.steps);
        model.trainable.opt.lr = lr;
        let info = model
            .trainable
            .step_window(gpu, opts.accum, window.as_ref())?;
        let loss = loss / opts.accum as f64;
        losses.push(loss);
        on(&Event::Step(StepReport {
            step,
            steps: opts.steps,
            loss,
            grad_norm: info.grad_norm,
            lr,
            tokens_per_second: tokens_per_step as f64 / t0.elapsed().as_secs_f64(),
        }));
        if crate::interrupt::requested() || (opts.save_every > 0 && step % opts.save_every == 0) {
            save(&model, &losses)?;
        }
        crate::interrupt::check(&match &opts.work_dir {
            Some(d) => format!(
                "stopped after step {step} of {}; continue with --work-dir {} --resume",
                opts.steps,
                d.display()
            ),
            None => format!(
                "stopped after step {step} of {}; nothing was written",
                opts.steps
            ),
        })?;
    }
    if losses.len() > done {
        save(&model, &losses)?;
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let steps_here = losses.len() - done;
    let after = if evaluate {
        on(&Event::Evaluating { phase: "after" });
        Some(held_out(&model, &mut teacher_engine)?)
    } else {
        None
    };
    let peak_gpu_bytes = gpu.memory().peak_bytes;
    let mut record = |tmp: &Path| match &opts.work_dir {
        Some(d) => crate::base::outdir::record_output(d, &fp, tmp),
        None => Ok(()),
    };
    let (output_bytes, factor_bits) = match &opts.plan {
        AdapterPlan::Factors { .. } => {
            let (b, bits) = super::output::write(
                &model,
                student,
                out,
                force,
                opts,
                on,
                &mut record,
                Some((&tokens[..tokens.len().min(HESSIAN_SEQUENCES * len)], len)),
            )?;
            (b, Some(bits))
        }
        AdapterPlan::Lora { rank, alpha, .. } => (
            super::output::write_lora(&model, student, out, force, *rank, *alpha, &mut record)?,
            None,
        ),
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let k = losses.len().min(10);
    Ok(FinetuneReport {
        steps: opts.steps,
        trainable_values: model.trainable.count(),
        tokens_per_step,
        first_loss: mean(&losses[..k]),
        last_loss: mean(&losses[losses.len() - k..]),
        train_seconds,
        tokens_per_second: (tokens_per_step * steps_here) as f64 / train_seconds.max(1e-9),
        peak_gpu_bytes,
        resident_layers: model.resident_layers(),
        before,
        after,
        output_bytes,
        factor_bits,
        kernels: gpu.profile(),
    })
}
