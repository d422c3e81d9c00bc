//! `pumice compress`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use pumice::gpu::profile::ProfileReport;
use pumice::gpu::GpuOptions;
use pumice::model::{Checkpoint, Tokenizer};

use super::args::*;
use super::progress;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MethodArg {
    /// Round to nearest (per-group min-max grid).
    Rtn,
    /// GPTQ/LDLQ: Hessian-weighted rounding with error feedback.
    Gptq,
    /// CALDERA: W ≈ Q + L·R, Q by GPTQ (--bits, --group-size; 2-bit midrise g64 by default),
    /// L and R low-rank and quantized (--lr-bits), rank from --target-bpw or --rank.
    Caldera,
}

#[derive(Args, Debug)]
pub(crate) struct CompressArgs {
    /// Model directory (Hugging Face layout).
    pub(crate) model: PathBuf,
    /// Output directory (written to a temporary name and renamed when complete). Not with a
    /// shard, whose output `pumice merge` writes.
    #[arg(short, long)]
    pub(crate) output: Option<PathBuf>,
    /// Keep every finished layer in this directory (atomic files), so an interrupted run
    /// continues with --resume; shards put their layers here for `pumice merge`.
    #[arg(long)]
    pub(crate) work_dir: Option<PathBuf>,
    /// Continue the job in --work-dir from its last finished layer. Refused when an argument
    /// or the source model changed. The result is byte-identical to an uninterrupted run.
    #[arg(long, requires = "work_dir")]
    pub(crate) resume: bool,
    /// Hessians saved by `pumice hessians` instead of a calibration pass: layers no longer
    /// depend on each other, so they can be split into shards.
    #[arg(long)]
    pub(crate) hessians: Option<PathBuf>,
    /// Compress only shard I of N (0-based; a contiguous range of layers) into --work-dir
    /// (needs --hessians); `pumice merge DIR -o OUT` writes the checkpoint. Without -o and
    /// without --shard, the index comes from SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN)
    /// or JOB_COMPLETION_INDEX, the count from --shards or SLURM_ARRAY_TASK_COUNT.
    #[arg(long, value_parser = parse_shard, conflicts_with = "output")]
    pub(crate) shard: Option<(usize, usize)>,
    /// Number of shards when the index comes from the scheduler's environment.
    #[arg(long, conflicts_with = "shard")]
    pub(crate) shards: Option<usize>,
    /// Several adapters at once: `all` (every GPU once; CPU adapters only where there is no
    /// GPU) or adapters by index or name as `pumice devices` lists them, e.g. `0,1`. With
    /// --hessians (independent layers) each adapter takes the next layer when it is free;
    /// without, the first adapter calibrates and propagates and the matrices of each input
    /// group (q/k/v, gate/up) are quantized on the adapters at once. The output records which
    /// adapter computed each layer and matrix. Overrides --adapter.
    #[arg(long, value_parser = parse_devices)]
    pub(crate) devices: Option<pumice::gpu::DeviceSet>,
    /// Quantization method.
    #[arg(long, value_enum, default_value_t = MethodArg::Caldera)]
    pub(crate) method: MethodArg,
    /// Bits per weight code of the quantized weight (CALDERA: of Q): 2 to 8. Default: 2
    /// for caldera, 4 for gptq and rtn.
    #[arg(long)]
    pub(crate) bits: Option<u32>,
    /// Columns per scale/zero group: 32, 64, 128, 256, or 0 for one per row. Default: 64 for
    /// caldera, 128 for gptq and rtn.
    #[arg(long)]
    pub(crate) group_size: Option<usize>,
    /// Quantization grid: `asymmetric` (f16 scale and integer zero point per group; the
    /// default for gptq and rtn), `midrise` (levels ±s/2, ±3s/2, …, only the scale stored; the
    /// default for caldera's Q), `symmetric` (integer zero 2^(bits−1), signed f16 scale: ggml's
    /// Q4_0, Q5_0 and Q8_0 at 4, 5 and 8 bits in groups of 32, compressed-tensors' and GPTQ's
    /// symmetric grids), `iq4nl` (ggml's 4-bit IQ4_NL codebook, signed f16 scale: IQ4_NL in
    /// groups of 32), `k` (ggml's k-quant super-blocks of 256: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K at
    /// 2, 3, 4, 5, 6 bits; weights whose input width is not a multiple of 256 fall back to
    /// iq4nl, or to Q5_0's grid for Q5_K and Q8_0's for Q6_K), `affine` (f16 step and f16
    /// minimum per group, value d·q + m: ggml's Q4_1 and Q5_1 at 4 and 5 bits in groups of 32).
    #[arg(long, value_parser = super::args::parse_grid)]
    pub(crate) grid: Option<pumice::quant::GridKind>,
    /// Pick each group's range by min–max only, without the least-squares clip search.
    #[arg(long)]
    pub(crate) no_clip: bool,
    /// GPTQ: process columns by descending Hessian diagonal.
    #[arg(long)]
    pub(crate) act_order: bool,
    /// GPTQ: prune with SparseGPT's Hessian-aware masks, `2:4` or a fraction of every row
    /// (e.g. 0.5); survivors are quantized; only their codes and a kept-weight bitmask are
    /// stored.
    #[arg(long, value_parser = parse_sparsity)]
    pub(crate) sparsity: Option<pumice::quant::sparsity::Sparsity>,
    /// GPTQ: damping as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub(crate) damp: f64,
    /// Incoherence processing (gptq, caldera): quantize randomized-Hadamard-rotated weights
    /// against the rotated Hessian; seeds are stored and the rotation undone at load. On by
    /// default for caldera.
    #[arg(long, conflicts_with = "no_rht")]
    pub(crate) rht: bool,
    /// Turn incoherence processing off (for caldera, where it is on by default).
    #[arg(long)]
    pub(crate) no_rht: bool,
    /// CALDERA: bits per weight each matrix may use (everything stored counted); sets the rank.
    #[arg(long, default_value_t = 2.5, value_parser = parse_target_bpw)]
    pub(crate) target_bpw: f64,
    /// CALDERA: a fixed rank instead of --target-bpw.
    #[arg(long)]
    pub(crate) rank: Option<usize>,
    /// CALDERA: bits of the L and R codes.
    #[arg(long, default_value_t = 4)]
    pub(crate) lr_bits: u32,
    /// CALDERA: group size of the L and R grids (along their long dimension).
    #[arg(long, default_value_t = 64)]
    pub(crate) lr_group_size: usize,
    /// CALDERA: outer iterations (low-rank fit, then Q by LDLQ).
    #[arg(long, default_value_t = 15)]
    pub(crate) outer_iters: usize,
    /// CALDERA: L/R refinement rounds per outer iteration.
    #[arg(long, default_value_t = 10)]
    pub(crate) inner_iters: usize,
    /// CALDERA: where the low-rank step's products run: `auto` (the host for a CPU adapter such
    /// as lavapipe, or for small matrices, where a GPU round trip costs more than the
    /// arithmetic; else the GPU), `gpu` or `host`.
    #[arg(long, default_value = "auto", value_parser = parse_placement)]
    pub(crate) lowrank_on: pumice::lowrank::fit::Placement,
    /// CALDERA: stop a matrix's outer iterations after this many in a row that lower its best
    /// weighted error by less than 0.1 % (the best iterate is kept); 0 runs all --outer-iters.
    #[arg(long, default_value_t = 0)]
    pub(crate) patience: usize,
    #[command(flatten)]
    pub(crate) cal: CalibArgs,
    /// Replace the output directory if it exists (never the input).
    #[arg(long)]
    pub(crate) force: bool,
    /// Output format: pumice (default), dense, compressed-tensors, gptq, gptq-v1, peft, gguf
    /// (see `pumice export`). What the format cannot hold exactly is refused before any work. pumice evaluates
    /// pumice and dense outputs afterwards; the others are not read back.
    #[arg(long, value_parser = super::args::parse_format, default_value = "pumice")]
    pub(crate) format: pumice::format::FormatKind,
    /// Dtype of a dense output (f32, f16, bf16; default: the model's), or of a GGUF LoRA
    /// adapter's factors (default f32, exact; f16 halves the adapter and q8_0 stores 8.5 bits
    /// per factor weight, both rounding the factors; a q8_0 lora_b whose rank is not a multiple
    /// of 32 is f16).
    #[arg(long, value_parser = super::args::parse_store_type)]
    pub(crate) dtype: Option<pumice::format::StoreType>,
    /// Evaluate before and after on this text (perplexity, KL against the original).
    #[arg(long)]
    pub(crate) eval_text: Option<PathBuf>,
    /// KL divergence of the result against the original on this many fresh sequences the
    /// original model samples itself (256 tokens each; no dataset needed). 0 skips it.
    #[arg(long, default_value_t = 16)]
    pub(crate) eval_samples: usize,
    /// Window length for --eval-text.
    #[arg(long, default_value_t = 256)]
    pub(crate) eval_ctx: usize,
    /// Windows for --eval-text (all when absent).
    #[arg(long)]
    pub(crate) eval_windows: Option<usize>,
    /// Per-layer options from a measurement file (`pumice importance MODEL -o FILE`): each
    /// layer gets one of the measured options, chosen by --allocate within the budget
    /// (--target-bpw for the linear layers, or --max-size, or --memory-budget).
    #[arg(long)]
    pub(crate) measurement: Option<PathBuf>,
    /// How options are allocated to layers: uniform, lsaq (importance), luc (sensitivity
    /// above the mean gets the higher option), optimal (least summed measured KL, exact).
    /// Default: optimal with --measurement.
    #[arg(long, value_enum, requires = "measurement")]
    pub(crate) allocate: Option<AllocateArg>,
    /// With --measurement: the weights file (model.safetensors) must fit in this many bytes
    /// (suffixes K, M, G: powers of 1024).
    #[arg(long, value_parser = parse_bytes, requires = "measurement", conflicts_with = "memory_budget")]
    pub(crate) max_size: Option<u64>,
    /// With --measurement: weights plus the KV cache for --context tokens at batch 1 must fit
    /// in this many bytes (suffixes K, M, G).
    #[arg(long, value_parser = parse_bytes, requires = "measurement")]
    pub(crate) memory_budget: Option<u64>,
    /// Tokens of KV cache --memory-budget must leave room for.
    #[arg(long, default_value_t = 2048)]
    pub(crate) context: usize,
    /// JSON lines on stdout: one object per event (progress with fraction, elapsed and ETA;
    /// finished layers; notes), then the summary (or an error). Implied when stdout is not a
    /// terminal.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn parse_devices(s: &str) -> Result<pumice::gpu::DeviceSet, String> {
    s.parse().map_err(|e: pumice::Error| e.to_string())
}

pub(crate) fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}`: expected I/N, e.g. 0/4"))?;
    let i: usize = i
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: I is not a number"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: N is not a number"))?;
    if n == 0 || i >= n {
        return Err(format!(
            "`{s}`: need 0 <= I < N (shards are numbered from 0)"
        ));
    }
    Ok((i, n))
}

/// The shard a scheduler assigned this process: Slurm array tasks or Kubernetes Indexed Jobs.
pub(crate) fn shard_from_env(count: Option<usize>) -> Result<(usize, usize), pumice::Error> {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    let index = match (var("SLURM_ARRAY_TASK_ID"), var("JOB_COMPLETION_INDEX")) {
        (Some(id), _) => id.saturating_sub(var("SLURM_ARRAY_TASK_MIN").unwrap_or(0)),
        (None, Some(i)) => i,
        (None, None) => {
            return Err(pumice::Error::InvalidArgument(
                "no output: give -o OUT, or --shard I/N (or run as a Slurm array task or a \
                 Kubernetes Indexed Job, which set the shard index)"
                    .into(),
            ))
        }
    };
    let n = count
        .or_else(|| var("SLURM_ARRAY_TASK_COUNT"))
        .ok_or_else(|| {
            pumice::Error::InvalidArgument(
            "the shard index comes from the environment but the count does not: pass --shards N"
                .into(),
        )
        })?;
    if index >= n {
        return Err(pumice::Error::InvalidArgument(format!(
            "shard index {index} from the environment is not below the shard count {n}"
        )));
    }
    Ok((index, n))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AllocateArg {
    Uniform,
    Lsaq,
    Luc,
    Optimal,
}

/// The one place compress arguments become validated library options for the opened model
/// (shard resolution from Slurm/Kubernetes included; the calibration length sized to the
/// model unless given). Allocation from a measurement file and `--eval-text` read files and
/// happen in `run`, still before any GPU work.
fn compress_options(
    a: &CompressArgs,
    ck: &Checkpoint,
) -> Result<pumice::compress::pipeline::CompressOptions, pumice::Error> {
    use pumice::compress::pipeline::{CalderaSettings, CompressOptions, Method};
    use pumice::quant::{GptqOptions, Grid, GridKind};
    let shard = match (&a.output, a.shard) {
        (Some(_), _) => None,
        (None, Some(s)) => Some(s),
        (None, None) => Some(shard_from_env(a.shards)?),
    };
    if shard.is_some() && (a.hessians.is_none() || a.work_dir.is_none()) {
        return Err(pumice::Error::InvalidArgument(
            "a shard needs --hessians HDIR (from `pumice hessians`) and --work-dir DIR".into(),
        ));
    }
    let bits = a
        .bits
        .unwrap_or(if a.method == MethodArg::Caldera { 2 } else { 4 });
    let caldera = a.method == MethodArg::Caldera;
    let kind = a.grid.unwrap_or(if caldera {
        GridKind::Midrise
    } else {
        GridKind::Asymmetric
    });
    // A k grid's groups are its sub-blocks.
    let k_sub = (kind == GridKind::K)
        .then(|| pumice::quant::kquant::KType::of_bits(bits).map(|k| k.sub))
        .flatten();
    let group_size = a
        .group_size
        .unwrap_or(k_sub.unwrap_or(if caldera { 64 } else { 128 }));
    let grid = Grid::new(bits, group_size, kind)?.with_clip(!a.no_clip);
    Ok(CompressOptions {
        layers: Vec::new(),
        allocation: None,
        sparsity: a.sparsity.unwrap_or_default(),
        method: match a.method {
            MethodArg::Rtn => Method::Rtn,
            MethodArg::Gptq => Method::Gptq,
            MethodArg::Caldera => Method::Caldera,
        },
        grid,
        gptq: GptqOptions {
            damp: a.damp,
            act_order: a.act_order,
            block: 128,
        },
        calib_source: a.cal.source(),
        calib: a.cal.options(ck)?,
        caldera: CalderaSettings {
            target_bpw: a.target_bpw,
            rank: a.rank,
            lr_bits: a.lr_bits,
            lr_group_size: a.lr_group_size,
            outer_iters: a.outer_iters.max(1),
            inner_iters: a.inner_iters.max(1),
            patience: a.patience,
            clip: !a.no_clip,
            placement: a.lowrank_on,
        },
        output: a.output.clone().unwrap_or_default(),
        force: a.force,
        rht: a.rht || (a.method == MethodArg::Caldera && !a.no_rht),
        hessians: a.hessians.clone(),
        work_dir: a.work_dir.clone(),
        resume: a.resume,
        shard,
        format: a.format,
        dtype: a.dtype,
    })
}

pub(crate) fn run(gpu_opts: &GpuOptions, a: CompressArgs) -> anyhow::Result<()> {
    use pumice::compress::pipeline::{compress_on, Event};

    let mut rep = progress::Reporter::new(a.json);
    let ck = Checkpoint::open(&a.model)?;
    let mut opts = compress_options(&a, &ck)?;
    let shard = opts.shard;
    // --eval-text is read and tokenized before any GPU work: a bad file fails at once.
    let eval_tokens = match &a.eval_text {
        Some(text_path) => {
            let tok = Tokenizer::from_model_dir(&a.model)?.ok_or_else(|| {
                pumice::Error::InvalidArgument(format!(
                    "{} has no tokenizer.json for --eval-text",
                    a.model.display()
                ))
            })?;
            let text = pumice::text::read_text(text_path, newlines(a.cal.raw_text))?;
            let tokens = tok.encode(&text)?;
            if tokens.len() < a.eval_ctx.max(2) {
                return Err(pumice::Error::input(
                    text_path,
                    format!(
                        "{} tokens, fewer than one --eval-ctx window of {}",
                        tokens.len(),
                        a.eval_ctx
                    ),
                )
                .into());
            }
            Some(tokens)
        }
        None => None,
    };
    if let Some(path) = &a.measurement {
        let request = pumice::budget::plan::AllocationRequest {
            measurement: path.clone(),
            rule: match a.allocate.unwrap_or(AllocateArg::Optimal) {
                AllocateArg::Uniform => pumice::budget::allocate::Rule::Uniform,
                AllocateArg::Lsaq => pumice::budget::allocate::Rule::Lsaq,
                AllocateArg::Luc => pumice::budget::allocate::Rule::Luc,
                AllocateArg::Optimal => pumice::budget::allocate::Rule::Optimal,
            },
            budget: match (a.max_size, a.memory_budget) {
                (Some(b), _) => pumice::budget::allocate::Budget::MaxSize(b),
                (None, Some(b)) => pumice::budget::allocate::Budget::Memory {
                    bytes: b,
                    context: a.context,
                },
                (None, None) => pumice::budget::allocate::Budget::Bpw(a.target_bpw),
            },
            sparsity: a.sparsity,
        };
        let line = pumice::budget::plan::allocate_layers(&ck, &request, &mut opts)?;
        eprintln!("{line}");
    }
    let gpus = super::setup::open_gpus(gpu_opts, a.devices.as_ref())?;
    let gpu = &gpus[0];
    let names: Vec<String> = gpus.iter().map(|g| g.describe()).collect();
    eprintln!(
        "compressing {} with {:?} on {}",
        a.model.display(),
        a.method,
        names.join(" + ")
    );
    rep.emit(
        "start",
        serde_json::json!({
            "command": "compress", "model": a.model.display().to_string(),
            "method": opts.method.name(), "adapter": gpu.describe(), "adapters": names,
            "shard": shard.map(|(i, n)| format!("{i}/{n}")),
        }),
    );
    let gpu_refs: Vec<&pumice::gpu::Gpu> = gpus.iter().collect();
    let summary = compress_on(&gpu_refs, &ck, &opts, &mut |e: &Event| rep.on(e))?;
    rep.finish();
    if let Some((i, n)) = shard {
        let layers: Vec<String> = summary.layers.iter().map(|l| l.layer.to_string()).collect();
        rep.conclude(serde_json::to_value(&summary)?, || {
            writeln!(
                std::io::stdout(),
                "shard {i}/{n}: layers {} done in {}; when every shard has finished: pumice merge {} -o OUT",
                layers.join(", "),
                summary.output,
                summary.output
            )
        })?;
        return Ok(());
    }
    let output = opts.output.clone();
    use pumice::format::FormatKind;
    let review = if matches!(opts.format, FormatKind::Native | FormatKind::Dense) {
        pumice::compress::review::review(
            gpu,
            &ck,
            &output,
            &pumice::compress::review::ReviewOptions {
                eval_tokens,
                eval_ctx: a.eval_ctx,
                eval_windows: a.eval_windows,
                self_samples: a.eval_samples,
                seed: a.cal.seed,
                newlines: newlines(a.cal.raw_text),
            },
        )?
    } else {
        if eval_tokens.is_some() || a.eval_samples > 0 {
            rep.on(&Event::Note(format!(
                "not evaluated: pumice does not read {} outputs (evaluate with the tool that \
                 loads them, or compress to the pumice format and `pumice export`)",
                opts.format.name()
            )));
        }
        Default::default()
    };
    let (before_after, self_eval) = (review.before_after, review.self_generated);
    // The allocation report: report.svg in the output directory (read back from the pumice
    // manifest, the one format that records the allocation).
    let native = opts.format == pumice::format::FormatKind::Native;
    if opts.allocation.is_some() && !native {
        rep.on(&Event::Note(format!(
            "no report.svg: the allocation is recorded in pumice's own format only (the {} \
             output's per-tensor types show it; `pumice inspect`)",
            opts.format.name()
        )));
    }
    let report_rows = if opts.allocation.is_some() && native {
        let (path, rows) = pumice::budget::report::write_allocation_report(
            &a.model,
            &output,
            summary.linear_bits_per_parameter,
        )?;
        eprintln!("wrote {}", path.display());
        rows
    } else {
        Vec::new()
    };
    if rep.json() {
        let mut v = serde_json::to_value(&summary)?;
        let o = v.as_object_mut().expect("summary is an object");
        if let Some((b, af)) = &before_after {
            o.insert("eval_before".into(), serde_json::to_value(b)?);
            o.insert("eval_after".into(), serde_json::to_value(af)?);
        }
        if let Some(e) = &self_eval {
            o.insert("eval_self_generated".into(), serde_json::to_value(e)?);
        }
        rep.summary(v);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    writeln!(out, "wrote {}", summary.output)?;
    writeln!(
        out,
        "size {:.2} MiB -> {:.2} MiB ({:.2}x smaller); {:.3} bits/parameter overall, {:.3} in the linear layers",
        mib(summary.source_bytes),
        mib(summary.output_bytes),
        summary.source_bytes as f64 / summary.output_bytes.max(1) as f64,
        summary.bits_per_parameter,
        summary.linear_bits_per_parameter
    )?;
    writeln!(
        out,
        "calibration: {} ({} sequences of {} tokens, seed {}); {:.1} s",
        if summary.calibration.kind == "self" {
            "self-generated"
        } else {
            "text"
        },
        summary.calibration.samples,
        summary.calibration.len,
        summary.calibration.seed,
        summary.seconds
    )?;
    let st = &summary.stages;
    writeln!(
        out,
        "time by stage: calibration {:.1} s, Hessians {:.1} s{}, quantization {:.1} s, propagation {:.1} s, writing {:.1} s",
        st.calibration,
        st.hessians,
        st.hessians_on.map(|o| format!(" (on the {o})")).unwrap_or_default(),
        st.quantization,
        st.propagation,
        st.writing
    )?;
    if summary.devices.len() > 1 {
        for d in &summary.devices {
            let ls: Vec<String> = d.layers.iter().map(|l| l.to_string()).collect();
            let what = match (ls.is_empty(), d.matrices) {
                (false, 0) => format!("layers {}", ls.join(", ")),
                (false, n) => format!("layers {} ({n} matrices)", ls.join(", ")),
                (true, n) => format!("{n} matrices"),
            };
            writeln!(
                out,
                "adapter {}: {what} ({:.1} s busy)",
                d.adapter, d.seconds
            )?;
        }
    }
    let k = &summary.kernels;
    let built: f64 = k.builds.iter().map(|b| b.seconds).sum();
    let n: u64 = k.builds.iter().map(|b| b.count).sum();
    writeln!(
        out,
        "shader builds: {built:.1} s for {n} pipelines ({})",
        ProfileReport::line(&k.builds, 4)
    )?;
    if !k.gpu.is_empty() {
        writeln!(
            out,
            "GPU time by kernel (--profile): {}",
            ProfileReport::line(&k.gpu, 8)
        )?;
    }
    writeln!(
        out,
        "relative weighted error tr(dW H dW^T)/tr(W H W^T) per layer:"
    )?;
    for l in &summary.layers {
        let errs: Vec<String> = l
            .matrices
            .iter()
            .map(|m| {
                let short = m.name.rsplit('.').nth(1).unwrap_or(&m.name).to_string();
                format!(
                    "{short} {}",
                    m.relative_error
                        .map(|e| format!("{e:.2e}"))
                        .unwrap_or_else(|| "-".into())
                )
            })
            .collect();
        writeln!(
            out,
            "  layer {:>3} ({:.1} s): {}",
            l.layer,
            l.seconds.unwrap_or(0.0),
            errs.join(", ")
        )?;
    }
    if let Some(e) = &self_eval {
        writeln!(
            out,
            "KL(original || compressed) {:.5} (p99 {:.5}), top-1 agreement {:.4} on {} self-generated sequences of {} tokens",
            e.kl_divergence.unwrap_or(f64::NAN),
            e.kl_divergence_p99.unwrap_or(f64::NAN),
            e.top1_agreement.unwrap_or(f64::NAN),
            e.windows,
            e.ctx
        )?;
    }
    if let Some((b, af)) = &before_after {
        writeln!(
            out,
            "eval: perplexity {:.4} -> {:.4}; KL(original || compressed) {:.5}, top-1 agreement {:.4}",
            b.perplexity,
            af.perplexity,
            af.kl_divergence.unwrap_or(f64::NAN),
            af.top1_agreement.unwrap_or(f64::NAN)
        )?;
    }
    if !report_rows.is_empty() {
        let names: Vec<String> = report_rows[0]
            .sensitivity
            .iter()
            .map(|(o, _)| o.clone())
            .collect();
        write!(
            out,
            "layer  importance  {:>14}  bits/param  rank  sparsity  rel. error  ",
            "option"
        )?;
        for n in &names {
            write!(out, "{n:>14}")?;
        }
        writeln!(out)?;
        for r in &report_rows {
            write!(
                out,
                "{:>5}  {:>10.4}  {:>14}  {:>10.3}  {:>4}  {:>8.3}  {:>10.3e}  ",
                r.layer,
                r.importance,
                r.option,
                r.bits_per_parameter,
                r.rank,
                r.sparsity,
                r.relative_error
            )?;
            for (_, kl) in &r.sensitivity {
                write!(out, "{kl:>14.5}")?;
            }
            writeln!(out)?;
        }
        if let Some(a) = &opts.allocation {
            writeln!(
                out,
                "predicted KL (sum of the chosen options' measured per-layer KL): {:.5}",
                a["predicted_kl"].as_f64().unwrap_or(f64::NAN)
            )?;
        }
    }
    Ok(())
}
