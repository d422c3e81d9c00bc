//! The `pumice` command line. The only place that uses anyhow: library errors arrive as
//! `pumice::Error`, are printed as one line, and map to the documented exit codes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pumice::gpu::{list_adapters, AdapterReport, AdapterSelector, BackendChoice, Gpu, GpuOptions};
use pumice::infer::eval::{evaluate, window_count, EvalOptions, EvalProgress};
use pumice::infer::generate::{generate, GenerateOptions};
use pumice::infer::{Engine, EngineOptions};
use pumice::model::{Checkpoint, ModelSummary, Tokenizer};

mod progress;

const EXIT_CODES: &str = "\
Exit codes:
    0  success
    1  the machine failed: GPU or device error, I/O error, out of memory
    2  bad input: unreadable or inconsistent model files, bad arguments, a work directory
       of another job
  130  interrupted (SIGINT/SIGTERM) at a consistent point; with --work-dir, rerun the same
       command with --resume to continue

Output: on a terminal, progress on stderr and a readable summary on stdout. When stdout is
not a terminal (or with --json), compress, hessians, merge and bench write JSON lines on
stdout: one object per event (\"event\": start, progress, layer, note, stage), then the
summary (\"event\": \"summary\") or the error (\"event\": \"error\"); logs stay on stderr.";

#[derive(Parser, Debug)]
#[command(
    name = "pumice",
    version,
    about = "Compress large language models on whatever GPU the machine has (wgpu: Vulkan, Metal, DX12, GL)",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    gpu: GpuArgs,

    /// More log output on stderr (-v debug, -vv trace); PUMICE_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct GpuArgs {
    /// Graphics API to use: vulkan, metal, dx12, gl or all.
    #[arg(long, global = true, env = "PUMICE_BACKEND", value_parser = parse_backend)]
    backend: Option<BackendChoice>,

    /// Adapter by index (as listed by `pumice devices`) or by a substring of its name.
    /// Default: the best discrete GPU, else integrated, else a CPU adapter (lavapipe).
    #[arg(long, global = true, env = "PUMICE_ADAPTER", value_parser = parse_adapter)]
    adapter: Option<AdapterSelector>,
}

impl GpuArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            backend: self.backend,
            adapter: self.adapter.clone(),
            max_binding_bytes: None,
            max_loop_iterations: None,
        }
    }
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    s.parse().map_err(|e: pumice::Error| e.to_string())
}

fn parse_adapter(s: &str) -> Result<AdapterSelector, String> {
    s.parse().map_err(|e: pumice::Error| e.to_string())
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every GPU adapter on every backend, with type, driver, limits and features.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Describe a Hugging Face model directory: architecture, size, dtype, layers.
    Inspect {
        /// Model directory (config.json + model.safetensors or a sharded index).
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also read every weight and fail on NaN or infinite values.
        #[arg(long)]
        check_weights: bool,
    },
    /// Perplexity of a model on a text (and KL divergence against a reference model).
    #[command(after_help = EVAL_PROTOCOL)]
    Eval(EvalArgs),
    /// Continue a prompt; tokens stream to stdout as they are generated.
    Generate(GenerateArgs),
    /// Compress a model: calibrate, quantize every decoder linear layer, write a compressed
    /// checkpoint that eval, generate and inspect read.
    Compress(Box<CompressArgs>),
    /// The calibration pass alone: save every layer's Hessians (from the original model) so
    /// `compress --hessians HDIR --shard I/N` can split the layers across machines.
    Hessians(HessiansArgs),
    /// Benchmark every adapter on every backend (or those --backend/--adapter pick) beside the
    /// CPU (faer): GEMM, Hessian accumulation, GPTQ and CALDERA of Llama-7B-shaped matrices,
    /// the forward pass and end-to-end compression of the asset model. Medians of several runs
    /// after warm-up; a table, or JSON lines with each adapter's identity.
    Bench(BenchArgs),
    /// Assemble the checkpoint from a work directory whose layers are all finished (by shards
    /// on several machines, or one interrupted run).
    Merge(MergeArgs),
    /// Measure each decoder layer: LSAQ importance (1 − mean Jaccard similarity of the top-k
    /// tokens predicted from the layer's input and output, both read through the final norm and
    /// the LM head) and, per option, the measured sensitivity (KL vs the original when only that
    /// layer is compressed with it) and stored size. `compress --measurement` reuses the file.
    Importance(ImportanceArgs),
}

/// Where calibration sequences come from (compress, hessians).
#[derive(Args, Debug)]
struct CalibArgs {
    /// Calibration text: files, or directories of .txt files. Without it, the model samples
    /// its own calibration sequences (self-calibration).
    #[arg(long, num_args = 1..)]
    calib: Vec<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    calib_samples: usize,
    /// Tokens per calibration sequence (capped at the model's context).
    #[arg(long, default_value_t = 2048)]
    calib_len: usize,
    /// Seed for drawing or sampling calibration sequences.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokenize text files byte for byte, keeping CRLF and lone CR (llama.cpp's way). By
    /// default text is read as Python's text mode reads it: CRLF and lone CR become LF.
    #[arg(long)]
    raw_text: bool,
}

impl CalibArgs {
    fn source(&self) -> pumice::compress::pipeline::CalibSource {
        use pumice::compress::pipeline::CalibSource;
        if self.calib.is_empty() {
            CalibSource::SelfGenerated
        } else {
            CalibSource::Text(self.calib.clone())
        }
    }

    fn options(&self) -> Result<pumice::compress::calib::CalibOptions, pumice::Error> {
        if self.calib_samples == 0 {
            return Err(pumice::Error::InvalidArgument(
                "--calib-samples must be at least 1".into(),
            ));
        }
        Ok(pumice::compress::calib::CalibOptions {
            samples: self.calib_samples,
            len: self.calib_len,
            seed: self.seed,
            newlines: newlines(self.raw_text),
        })
    }
}

#[derive(Args, Debug)]
struct HessiansArgs {
    /// Model directory (Hugging Face layout).
    model: PathBuf,
    /// Output directory (written to a temporary name and renamed when complete).
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    cal: CalibArgs,
    /// Replace the output directory if it exists (never the input).
    #[arg(long)]
    force: bool,
    /// JSON lines on stdout (implied when stdout is not a terminal).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Small shapes (1024² stand-ins for the 7B matrices) and few runs: minutes per backend
    /// even on a CPU adapter.
    #[arg(long)]
    quick: bool,
    /// Timed runs per operation (default 3 with --quick, else 5); the median is reported.
    #[arg(long)]
    runs: Option<usize>,
    /// Untimed warm-up runs before them.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Outer iterations of each timed CALDERA run (a compression uses 15; time is about
    /// proportional).
    #[arg(long, default_value_t = 1)]
    caldera_outer: usize,
    /// Only operations whose name contains one of these: gemm, hessian, gptq, caldera,
    /// forward, compress.
    #[arg(long, num_args = 1..)]
    only: Vec<String>,
    /// Skip the CPU (faer) baseline rows.
    #[arg(long)]
    no_cpu: bool,
    /// Model for the forward and end-to-end rows.
    #[arg(long, default_value = "assets/models/gutenberg-llama")]
    model: PathBuf,
    /// JSON lines on stdout: one per result, then a summary with every result and the
    /// machine's identity (implied when stdout is not a terminal).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// Work directory the shards wrote (`compress --work-dir`).
    work_dir: PathBuf,
    /// Output directory (written to a temporary name and renamed when complete).
    #[arg(short, long)]
    output: PathBuf,
    /// The source model, when it is not where the job recorded it (checked by SHA-256).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// JSON lines on stdout (implied when stdout is not a terminal).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ImportanceArgs {
    /// Model directory (Hugging Face layout).
    model: PathBuf,
    /// Calibration text: files, or directories of .txt files. Without it, the model samples
    /// its own sequences.
    #[arg(long, num_args = 1..)]
    calib: Vec<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 32)]
    calib_samples: usize,
    /// Tokens per calibration sequence (capped at the model's context).
    #[arg(long, default_value_t = 256)]
    calib_len: usize,
    /// Seed for drawing or sampling calibration sequences.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokenize text files byte for byte, keeping CRLF and lone CR (llama.cpp's way). By
    /// default text is read as Python's text mode reads it: CRLF and lone CR become LF.
    #[arg(long)]
    raw_text: bool,
    /// Size k of the top-k token sets (1–64).
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Options whose sensitivity is measured, comma-separated: caldera-BPW (Q 2-bit midrise
    /// g64, rank from the budget), gptq-BITS-gGROUP, rtn-BITS-gGROUP.
    #[arg(long, default_value = pumice::budget::candidates::DEFAULT_CANDIDATES)]
    options: String,
    /// Importance only; skip the (slower) sensitivity sweep.
    #[arg(long)]
    no_sensitivity: bool,
    /// Turn incoherence processing off for the measured options.
    #[arg(long)]
    no_rht: bool,
    /// CALDERA options: outer iterations.
    #[arg(long, default_value_t = 15)]
    outer_iters: usize,
    /// CALDERA options: L/R refinement rounds per outer iteration.
    #[arg(long, default_value_t = 10)]
    inner_iters: usize,
    /// Write the measurement file here (JSON; written to a temporary name, then renamed).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum MethodArg {
    /// Round to nearest (per-group min-max grid).
    Rtn,
    /// GPTQ/LDLQ: Hessian-weighted rounding with error feedback.
    Gptq,
    /// CALDERA: W ≈ Q + L·R, Q by GPTQ (--bits, --group-size; 2-bit midrise g64 by default),
    /// L and R low-rank and quantized (--lr-bits), rank from --target-bpw or --rank.
    Caldera,
}

#[derive(Args, Debug)]
struct CompressArgs {
    /// Model directory (Hugging Face layout).
    model: PathBuf,
    /// Output directory (written to a temporary name and renamed when complete). Not with a
    /// shard, whose output `pumice merge` writes.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Keep every finished layer in this directory (atomic files), so an interrupted run
    /// continues with --resume; shards put their layers here for `pumice merge`.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Continue the job in --work-dir from its last finished layer. Refused when an argument
    /// or the source model changed. The result is byte-identical to an uninterrupted run.
    #[arg(long, requires = "work_dir")]
    resume: bool,
    /// Hessians saved by `pumice hessians` instead of a calibration pass: layers no longer
    /// depend on each other, so they can be split into shards.
    #[arg(long)]
    hessians: Option<PathBuf>,
    /// Compress only shard I of N (0-based; a contiguous range of layers) into --work-dir
    /// (needs --hessians); `pumice merge DIR -o OUT` writes the checkpoint. Without -o and
    /// without --shard, the index comes from SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN)
    /// or JOB_COMPLETION_INDEX, the count from --shards or SLURM_ARRAY_TASK_COUNT.
    #[arg(long, value_parser = parse_shard, conflicts_with = "output")]
    shard: Option<(usize, usize)>,
    /// Number of shards when the index comes from the scheduler's environment.
    #[arg(long, conflicts_with = "shard")]
    shards: Option<usize>,
    /// Quantization method.
    #[arg(long, value_enum, default_value_t = MethodArg::Caldera)]
    method: MethodArg,
    /// Bits per weight code of the quantized weight (CALDERA: of Q): 2, 3, 4 or 8. Default: 2
    /// for caldera, 4 for gptq and rtn.
    #[arg(long)]
    bits: Option<u32>,
    /// Columns per scale/zero group: 32, 64, 128, 256, or 0 for one per row. Default: 64 for
    /// caldera, 128 for gptq and rtn.
    #[arg(long)]
    group_size: Option<usize>,
    /// Symmetric midrise grid (levels ±s/2, ±3s/2, …; only the scale is stored). The default
    /// for caldera's Q.
    #[arg(long, conflicts_with = "asymmetric")]
    symmetric: bool,
    /// Asymmetric grid (f16 scale and integer zero point per group). The default for gptq and
    /// rtn.
    #[arg(long)]
    asymmetric: bool,
    /// Pick each group's range by min–max only, without the least-squares clip search.
    #[arg(long)]
    no_clip: bool,
    /// GPTQ: process columns by descending Hessian diagonal.
    #[arg(long)]
    act_order: bool,
    /// GPTQ: prune with SparseGPT's Hessian-aware masks, `2:4` or a fraction of every row
    /// (e.g. 0.5); survivors are quantized; only their codes and a kept-weight bitmask are
    /// stored.
    #[arg(long, value_parser = parse_sparsity)]
    sparsity: Option<pumice::quant::sparsity::Sparsity>,
    /// GPTQ: damping as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Incoherence processing (gptq, caldera): quantize randomized-Hadamard-rotated weights
    /// against the rotated Hessian; seeds are stored and the rotation undone at load. On by
    /// default for caldera.
    #[arg(long, conflicts_with = "no_rht")]
    rht: bool,
    /// Turn incoherence processing off (for caldera, where it is on by default).
    #[arg(long)]
    no_rht: bool,
    /// CALDERA: bits per weight each matrix may use (everything stored counted); sets the rank.
    #[arg(long, default_value_t = 2.5, value_parser = parse_target_bpw)]
    target_bpw: f64,
    /// CALDERA: a fixed rank instead of --target-bpw.
    #[arg(long)]
    rank: Option<usize>,
    /// CALDERA: bits of the L and R codes.
    #[arg(long, default_value_t = 4)]
    lr_bits: u32,
    /// CALDERA: group size of the L and R grids (along their long dimension).
    #[arg(long, default_value_t = 64)]
    lr_group_size: usize,
    /// CALDERA: outer iterations (low-rank fit, then Q by LDLQ).
    #[arg(long, default_value_t = 15)]
    outer_iters: usize,
    /// CALDERA: L/R refinement rounds per outer iteration.
    #[arg(long, default_value_t = 10)]
    inner_iters: usize,
    #[command(flatten)]
    cal: CalibArgs,
    /// Replace the output directory if it exists (never the input).
    #[arg(long)]
    force: bool,
    /// Evaluate before and after on this text (perplexity, KL against the original).
    #[arg(long)]
    eval_text: Option<PathBuf>,
    /// KL divergence of the result against the original on this many fresh sequences the
    /// original model samples itself (256 tokens each; no dataset needed). 0 skips it.
    #[arg(long, default_value_t = 16)]
    eval_samples: usize,
    /// Window length for --eval-text.
    #[arg(long, default_value_t = 256)]
    eval_ctx: usize,
    /// Windows for --eval-text (all when absent).
    #[arg(long)]
    eval_windows: Option<usize>,
    /// Per-layer options from a measurement file (`pumice importance MODEL -o FILE`): each
    /// layer gets one of the measured options, chosen by --allocate within the budget
    /// (--target-bpw for the linear layers, or --max-size, or --memory-budget).
    #[arg(long)]
    measurement: Option<PathBuf>,
    /// How options are allocated to layers: uniform, lsaq (importance), luc (sensitivity
    /// above the mean gets the higher option), optimal (least summed measured KL, exact).
    /// Default: optimal with --measurement.
    #[arg(long, value_enum, requires = "measurement")]
    allocate: Option<AllocateArg>,
    /// With --measurement: the weights file (model.safetensors) must fit in this many bytes
    /// (suffixes K, M, G: powers of 1024).
    #[arg(long, value_parser = parse_bytes, requires = "measurement", conflicts_with = "memory_budget")]
    max_size: Option<u64>,
    /// With --measurement: weights plus the KV cache for --context tokens at batch 1 must fit
    /// in this many bytes (suffixes K, M, G).
    #[arg(long, value_parser = parse_bytes, requires = "measurement")]
    memory_budget: Option<u64>,
    /// Tokens of KV cache --memory-budget must leave room for.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// JSON lines on stdout: one object per event (progress with fraction, elapsed and ETA;
    /// finished layers; notes), then the summary (or an error). Implied when stdout is not a
    /// terminal.
    #[arg(long)]
    json: bool,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
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
fn shard_from_env(count: Option<usize>) -> Result<(usize, usize), pumice::Error> {
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
enum AllocateArg {
    Uniform,
    Lsaq,
    Luc,
    Optimal,
}

fn parse_sparsity(s: &str) -> Result<pumice::quant::sparsity::Sparsity, String> {
    pumice::quant::sparsity::Sparsity::parse(s).map_err(|e| e.to_string())
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (e.g. 3500000, 512K, 1.5G)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("`{s}` is not a byte count"));
    }
    Ok((v * mult as f64) as u64)
}

const EVAL_PROTOCOL: &str = "\
Protocol: the whole file is tokenized with the model's tokenizer.json, no special tokens; it is
cut into consecutive non-overlapping windows of --ctx tokens and the tail is dropped; no BOS is
added; each window is scored on its positions 1..ctx-1 (each predicted from the tokens before it
in the window); the mean NLL is taken over all scored positions and perplexity = exp(mean NLL).
With --ref, the reference model runs on the same windows: kl_divergence is the mean over scored
positions of KL(ref || model), kl_divergence_p99 its 99th percentile, top1_agreement the fraction
of positions where both models' most likely next token agree.";

#[derive(Args, Debug)]
struct EvalArgs {
    /// Model directory.
    model: PathBuf,
    /// Text file to evaluate on (tokenized with the model's tokenizer.json).
    #[arg(
        long,
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    text: Option<PathBuf>,
    /// Whitespace-separated token ids instead of text (for models without a tokenizer).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Tokenize text files byte for byte, keeping CRLF and lone CR (llama.cpp's way). By
    /// default text is read as Python's text mode reads it: CRLF and lone CR become LF.
    #[arg(long)]
    raw_text: bool,

    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Windows per forward batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Reference model (e.g. the uncompressed original) for KL divergence and top-1 agreement.
    #[arg(long = "ref")]
    reference: Option<PathBuf>,
    /// Keep decoder layers on the GPU when they fit in this many MiB; larger models are
    /// streamed layer by layer for every batch.
    #[arg(long, default_value_t = 2048)]
    max_resident_mb: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Model directory.
    model: PathBuf,
    /// Prompt text (empty: start from the BOS token). CRLF and lone CR become LF unless
    /// --raw-text is given.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Keep CRLF and lone CR in the prompt as they are.
    #[arg(long)]
    raw_text: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.8, value_parser = parse_temperature)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (0 < p ≤ 1).
    #[arg(long, default_value_t = 0.95, value_parser = parse_top_p)]
    top_p: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// See `eval --max-resident-mb`.
    #[arg(long, default_value_t = 2048)]
    max_resident_mb: u64,
}

fn main() -> ExitCode {
    quiet_headless_wsi();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.verbose);
    install_stop_handler();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<pumice::Error>()
                .map(|p| p.exit_code())
                .unwrap_or(1);
            // The chain, leaving out causes the message above them already quotes (our
            // errors name their source in their own text).
            let mut parts: Vec<String> = Vec::new();
            for cause in e.chain() {
                let s = cause.to_string();
                if !parts.last().is_some_and(|p| p.contains(&s)) {
                    parts.push(s);
                }
            }
            let mut msg = pumice::error::one_line(&parts.join(": "));
            if let Some(pumice::Error::Interrupted(_)) = e.downcast_ref::<pumice::Error>() {
                msg.push_str(&resume_hint());
            }
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            if progress::json_mode() {
                progress::emit_json(&serde_json::json!({
                    "event": "error", "message": msg, "exit_code": code,
                }));
            }
            ExitCode::from(code as u8)
        }
    }
}

/// SIGINT/SIGTERM (Ctrl-C on Windows): the first asks running work to stop at its next
/// consistent point (between matrices; finished layers in a --work-dir are kept); a second
/// exits at once.
fn install_stop_handler() {
    let _ = ctrlc::set_handler(|| {
        if pumice::interrupt::requested() {
            let _ = writeln!(std::io::stderr(), "second signal: exiting now");
            std::process::exit(130);
        }
        let _ = writeln!(
            std::io::stderr(),
            "signal received: stopping at the next consistent point, after the current matrix (signal again to exit now)"
        );
        pumice::interrupt::request();
    });
}

/// For an interrupted run with a work directory: the command that continues it.
fn resume_hint() -> String {
    let args: Vec<String> = std::env::args().collect();
    if !args
        .iter()
        .any(|a| a == "--work-dir" || a.starts_with("--work-dir="))
    {
        return String::new();
    }
    let mut cmd: Vec<String> = args
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    if !args.iter().any(|a| a == "--resume") {
        cmd.push("--resume".into());
    }
    format!("; resume with: {}", cmd.join(" "))
}

/// Mesa's window-system probes print "XDG_RUNTIME_DIR is invalid" on headless machines where it
/// is unset. Point it at a private empty directory so compute-only runs stay quiet.
fn quiet_headless_wsi() {
    #[cfg(unix)]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        use std::os::unix::fs::PermissionsExt;
        // One directory, reused; if another user owns it, set_permissions fails and we skip.
        let dir = std::env::temp_dir().join("pumice-xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok()
            && std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).is_ok()
        {
            // Single-threaded at this point: nothing else reads the environment concurrently.
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "pumice=debug,warn",
        _ => "pumice=trace,info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUMICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Devices { json } => devices(&cli.gpu.options(), json),
        Command::Inspect {
            model,
            json,
            check_weights,
        } => inspect(&model, json, check_weights),
        Command::Eval(args) => eval(&cli.gpu.options(), args),
        Command::Generate(args) => generate_cmd(&cli.gpu.options(), args),
        Command::Compress(args) => compress_cmd(&cli.gpu.options(), *args),
        Command::Importance(args) => importance_cmd(&cli.gpu.options(), args),
        Command::Hessians(args) => hessians_cmd(&cli.gpu.options(), args),
        Command::Merge(args) => merge_cmd(args),
        Command::Bench(args) => bench_cmd(&cli.gpu, args),
    }
}

fn bench_cmd(gpu_args: &GpuArgs, a: BenchArgs) -> anyhow::Result<()> {
    use pumice::bench::{run as bench_run, BenchOptions, BenchResult, Target};
    let rep = progress::Reporter::new(a.json);
    let scratch = tempdir_for_bench()?;
    let opts = BenchOptions {
        quick: a.quick,
        runs: a.runs.unwrap_or(if a.quick { 3 } else { 5 }),
        warmup: a.warmup,
        caldera_outer: a.caldera_outer,
        model: a.model.clone(),
        scratch: scratch.clone(),
        only: a.only.clone(),
    };
    // Every adapter on the requested backends (all by default), or the one --adapter picks.
    let backend = gpu_args.backend.unwrap_or(BackendChoice::All);
    let listing = GpuOptions {
        backend: Some(backend),
        adapter: None,
        max_binding_bytes: None,
        max_loop_iterations: None,
    };
    let mut adapters = list_adapters(&listing);
    if let Some(sel) = &gpu_args.adapter {
        let chosen = list_adapters(&GpuOptions {
            adapter: Some(sel.clone()),
            ..listing.clone()
        })
        .into_iter()
        .find(|r| r.selected)
        .map(|r| r.index);
        adapters.retain(|r| Some(r.index) == chosen);
    }
    if adapters.is_empty() {
        return Err(pumice::Error::NoAdapter(format!(
            "none on backend {backend:?} to benchmark; on Linux without a GPU install Mesa's \
             lavapipe (mesa-vulkan-drivers) and EGL (libegl1, libgl1-mesa-dri)"
        ))
        .into());
    }
    let mut results: Vec<BenchResult> = Vec::new();
    let mut on_result = |r: BenchResult| {
        eprintln!(
            "{:<7} {:<28} {:<20} {:<48} {}",
            r.backend,
            truncate(&r.adapter, 28),
            r.op,
            truncate(&r.shape, 48),
            match &r.error {
                Some(e) => format!("error: {e}"),
                None => format!("{:.4} s median of {}", r.median_s, r.runs),
            }
        );
        rep.emit("result", serde_json::to_value(&r).unwrap_or_default());
        results.push(r);
    };
    for r in &adapters {
        let gpu = Gpu::new(&GpuOptions {
            backend: Some(backend),
            adapter: Some(AdapterSelector::Index(r.index)),
            max_binding_bytes: None,
            max_loop_iterations: None,
        });
        match gpu {
            Ok(g) => {
                eprintln!("benchmarking {}", g.describe());
                bench_run(&Target::Gpu(&g), &opts, &mut on_result)?;
            }
            Err(e) => eprintln!("skipping {} ({}): {e}", r.name, r.backend),
        }
    }
    if !a.no_cpu {
        eprintln!("benchmarking the CPU baseline (faer)");
        bench_run(&Target::Cpu, &opts, &mut on_result)?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let machine = serde_json::json!({
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpu": pumice::bench::cpu_model(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    if rep.json() {
        rep.summary(serde_json::json!({
            "pumice": env!("CARGO_PKG_VERSION"),
            "quick": a.quick,
            "machine": machine,
            "adapters": adapters,
            "results": results,
        }));
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} ({} threads); medians of {} runs after {} warm-up; x cpu = CPU (faer) median / this median",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["threads"],
        opts.runs,
        opts.warmup
    )?;
    writeln!(
        out,
        "{:<7} {:<34} {:<20} {:<64} {:>10} {:>9} {:>10} {:>7}",
        "backend", "adapter", "operation", "shape", "median s", "GFLOP/s", "tokens/s", "x cpu"
    )?;
    for r in &results {
        let cpu = results.iter().find(|c| {
            c.backend == "cpu" && c.op == r.op && c.shape == r.shape && c.error.is_none()
        });
        let opt = |v: Option<f64>, prec: usize| {
            v.map(|x| format!("{x:.prec$}"))
                .unwrap_or_else(|| "-".into())
        };
        if let Some(e) = &r.error {
            writeln!(
                out,
                "{:<7} {:<34} {:<20} {:<64} error: {}",
                r.backend,
                truncate(&r.adapter, 34),
                r.op,
                truncate(&r.shape, 64),
                e
            )?;
            continue;
        }
        writeln!(
            out,
            "{:<7} {:<34} {:<20} {:<64} {:>10.4} {:>9} {:>10} {:>7}",
            r.backend,
            truncate(&r.adapter, 34),
            r.op,
            truncate(&r.shape, 64),
            r.median_s,
            opt(r.gflops, 1),
            opt(r.tokens_per_s, 0),
            if r.backend == "cpu" {
                "-".into()
            } else {
                opt(cpu.map(|c| c.median_s / r.median_s), 2)
            }
        )?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// A private scratch directory for the end-to-end rows.
fn tempdir_for_bench() -> Result<PathBuf, pumice::Error> {
    let d = std::env::temp_dir().join(format!("pumice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| pumice::Error::Io {
        path: d.clone(),
        source: e,
    })?;
    Ok(d)
}

fn hessians_cmd(gpu_opts: &GpuOptions, a: HessiansArgs) -> anyhow::Result<()> {
    use pumice::compress::pipeline::{collect_hessians, Event};
    let mut rep = progress::Reporter::new(a.json);
    let (source, copts) = (a.cal.source(), a.cal.options()?);
    let ck = Checkpoint::open(&a.model)?;
    let gpu = Gpu::new(gpu_opts)?;
    eprintln!(
        "collecting Hessians of {} on {}",
        a.model.display(),
        gpu.describe()
    );
    rep.emit(
        "start",
        serde_json::json!({"command": "hessians", "model": a.model.display().to_string(), "adapter": gpu.describe()}),
    );
    let s = collect_hessians(
        &gpu,
        &ck,
        &source,
        &copts,
        &a.output,
        a.force,
        &mut |e: &Event| rep.on(e),
    )?;
    rep.conclude(serde_json::to_value(&s)?, || {
        writeln!(
            std::io::stdout(),
            "wrote {}: Hessians of {} layers ({:.1} MiB) from {} sequences of {} tokens in {:.1} s",
            s.output,
            s.layers,
            s.bytes as f64 / (1u64 << 20) as f64,
            s.calibration.samples,
            s.calibration.len,
            s.seconds
        )
    })?;
    Ok(())
}

fn merge_cmd(a: MergeArgs) -> anyhow::Result<()> {
    use pumice::compress::pipeline::{merge, Event};
    let mut rep = progress::Reporter::new(a.json);
    rep.emit(
        "start",
        serde_json::json!({"command": "merge", "work_dir": a.work_dir.display().to_string()}),
    );
    let s = merge(
        &a.work_dir,
        a.model.as_deref(),
        &a.output,
        a.force,
        &mut |e: &Event| rep.on(e),
    )?;
    rep.conclude(serde_json::to_value(&s)?, || {
        writeln!(
            std::io::stdout(),
            "wrote {}: {:.2} MiB, {:.3} bits/parameter overall, {:.3} in the linear layers",
            s.output,
            s.output_bytes as f64 / (1u64 << 20) as f64,
            s.bits_per_parameter,
            s.linear_bits_per_parameter
        )
    })?;
    Ok(())
}

fn importance_cmd(gpu_opts: &GpuOptions, a: ImportanceArgs) -> anyhow::Result<()> {
    use pumice::budget::candidates::Candidate;
    use pumice::budget::importance::lsaq;
    use pumice::budget::measurement::{
        LayerImportanceRecord, Measurement, MEASUREMENT_FORMAT, MEASUREMENT_VERSION,
    };
    use pumice::budget::sensitivity::{measure, SensitivityOptions};
    use pumice::compress::calib::{self, CalibOptions};
    use pumice::compress::pipeline::CalderaSettings;

    let ck = Checkpoint::open(&a.model)?;
    if a.calib_samples == 0 {
        return Err(
            pumice::Error::InvalidArgument("--calib-samples must be at least 1".into()).into(),
        );
    }
    let len = a.calib_len.min(ck.config().max_position_embeddings).max(2);
    let copts = CalibOptions {
        samples: a.calib_samples,
        len,
        seed: a.seed,
        newlines: newlines(a.raw_text),
    };
    let gpu = Gpu::new(gpu_opts)?;
    eprintln!(
        "measuring layer importance of {} on {}",
        a.model.display(),
        gpu.describe()
    );
    let mut engine = Engine::new(
        &gpu,
        &ck,
        &EngineOptions {
            max_positions: len,
            ..Default::default()
        },
    )?;
    let calibration = if a.calib.is_empty() {
        let mut bar = progress::Progress::new(
            "calibration (self-generated: sampling from the model)",
            copts.samples as u64,
            "sequences",
        );
        let c = calib::self_generated(&mut engine, &copts, &mut |d, _| bar.set(d as u64))?;
        bar.finish();
        c
    } else {
        let tok = Tokenizer::from_model_dir(&a.model)?.ok_or_else(|| {
            pumice::Error::InvalidArgument(format!(
                "{} has no tokenizer.json to tokenize --calib text",
                a.model.display()
            ))
        })?;
        calib::from_text(&tok, &a.calib, &copts)?
    };
    let nseq = calibration.tokens.len() / len;
    let mut bar = progress::Progress::new("importance", nseq as u64, "sequences");
    let layers = lsaq(
        &mut engine,
        &calibration.tokens,
        len,
        a.top_k,
        a.batch,
        &mut |d, _| bar.set(d as u64),
    )?;
    bar.finish();
    let candidates = if a.no_sensitivity {
        Vec::new()
    } else {
        Candidate::parse_list(&a.options)?
    };
    let mut records: Vec<LayerImportanceRecord> =
        layers.iter().map(LayerImportanceRecord::from).collect();
    if !candidates.is_empty() {
        let so = SensitivityOptions {
            candidates: candidates.clone(),
            caldera: CalderaSettings {
                outer_iters: a.outer_iters.max(1),
                inner_iters: a.inner_iters.max(1),
                ..Default::default()
            },
            gptq: Default::default(),
            rht: !a.no_rht,
            seed: a.seed,
        };
        let total = layers.len() * candidates.len();
        let mut bar = progress::Progress::new("sensitivity", total as u64, "layer options");
        let rows = measure(&mut engine, &calibration.tokens, len, &so, &mut |p| {
            bar.set(p.done as u64)
        })?;
        bar.finish();
        for (r, row) in records.iter_mut().zip(rows) {
            r.sensitivity = row;
        }
    }
    let layer_params: u64 = ck.arch().layers[0]
        .linears
        .iter()
        .map(|l| (l.in_features * l.out_features) as u64)
        .sum();
    let m = Measurement {
        format: MEASUREMENT_FORMAT.into(),
        format_version: MEASUREMENT_VERSION,
        model: a.model.display().to_string(),
        top_k: a.top_k,
        calibration: calibration.info.clone(),
        options: candidates.iter().map(|c| c.name.clone()).collect(),
        rht: !a.no_rht,
        layer_params,
        layers: records,
    };
    if let Some(path) = &a.output {
        m.write(path)?;
        eprintln!("wrote {}", path.display());
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&m)?)?;
    } else {
        write!(out, "layer  jaccard  importance")?;
        for o in &m.options {
            write!(out, "  {o:>14}")?;
        }
        writeln!(out)?;
        for l in &m.layers {
            write!(
                out,
                "{:>5}  {:>7.4}  {:>10.4}",
                l.layer, l.jaccard, l.importance
            )?;
            for r in &l.sensitivity {
                write!(out, "  {:>14.5}", r.kl)?;
            }
            writeln!(out)?;
        }
        if !m.options.is_empty() {
            write!(out, "bits/param         ")?;
            for r in &m.layers[0].sensitivity {
                write!(out, "  {:>14.3}", r.bits as f64 / m.layer_params as f64)?;
            }
            writeln!(out)?;
            writeln!(
                out,
                "(importance: 1 − top-{} Jaccard; option columns: KL(original ‖ only that layer compressed), nats/token)",
                a.top_k
            )?;
        }
    }
    Ok(())
}

/// Choose per-layer recipes from a measurement file and record the allocation.
fn allocate_layers(
    ck: &Checkpoint,
    path: &std::path::Path,
    a: &CompressArgs,
    opts: &mut pumice::compress::pipeline::CompressOptions,
) -> anyhow::Result<()> {
    use pumice::budget::allocate::{allocate, linear_budget_bits, min_bits, Budget, Rule};
    use pumice::budget::candidates::Candidate;
    use pumice::budget::measurement::Measurement;

    let m = Measurement::read(path)?;
    let cfg = ck.config();
    let layer_params: u64 = ck.arch().layers[0]
        .linears
        .iter()
        .map(|l| (l.in_features * l.out_features) as u64)
        .sum();
    if m.layers.len() != cfg.num_layers || m.layer_params != layer_params {
        return Err(pumice::Error::InvalidArgument(format!(
            "{}: measured on a model with {} layers of {} linear parameters, but {} has {} of {layer_params}",
            path.display(),
            m.layers.len(),
            m.layer_params,
            a.model.display(),
            cfg.num_layers
        ))
        .into());
    }
    let rule = match a.allocate.unwrap_or(AllocateArg::Optimal) {
        AllocateArg::Uniform => Rule::Uniform,
        AllocateArg::Lsaq => Rule::Lsaq,
        AllocateArg::Luc => Rule::Luc,
        AllocateArg::Optimal => Rule::Optimal,
    };
    let budget = match (a.max_size, a.memory_budget) {
        (Some(b), _) => Budget::MaxSize(b),
        (None, Some(b)) => Budget::Memory {
            bytes: b,
            context: a.context,
        },
        (None, None) => Budget::Bpw(a.target_bpw),
    };
    let budget_bits = linear_budget_bits(ck, budget, min_bits(&m))?;
    let alloc = allocate(&m, rule, budget_bits)?;
    let layers: Vec<serde_json::Value> = alloc
        .choice
        .iter()
        .enumerate()
        .map(|(l, &o)| {
            let r = &m.layers[l];
            serde_json::json!({
                "layer": l,
                "importance": r.importance,
                "option": m.options[o],
                "bits_per_parameter": r.sensitivity[o].bits as f64 / m.layer_params as f64,
                "predicted_kl": r.sensitivity[o].kl,
                "sensitivity": r.sensitivity.iter().map(|s| (s.option.clone(), s.kl)).collect::<std::collections::BTreeMap<_, _>>(),
            })
        })
        .collect();
    opts.layers = alloc
        .choice
        .iter()
        .map(|&o| {
            Candidate {
                name: m.options[o].clone(),
            }
            .recipe(&opts.caldera)
        })
        .collect::<pumice::Result<_>>()?;
    // LUC's pruning half: per-layer unstructured sparsity around the mean --sparsity.
    let mut sparsities: Vec<Option<f64>> = vec![None; cfg.num_layers];
    if let (Rule::Luc, Some(sp)) = (rule, a.sparsity) {
        let mean = match sp {
            pumice::quant::sparsity::Sparsity::Unstructured(p) => p as f64,
            _ => {
                return Err(pumice::Error::InvalidArgument(
                    "--allocate luc takes --sparsity as a mean fraction (e.g. 0.3), not 2:4".into(),
                )
                .into())
            }
        };
        let per_layer = pumice::budget::allocate::luc_sparsities(&m, mean);
        for (l, r) in opts.layers.iter_mut().enumerate() {
            if per_layer[l] > 0.0 {
                if r.method != pumice::compress::pipeline::Method::Gptq {
                    return Err(pumice::Error::InvalidArgument(format!(
                        "--allocate luc --sparsity: layer {l} got `{}`, but pruning needs gptq options",
                        m.options[alloc.choice[l]]
                    ))
                    .into());
                }
                r.sparsity = pumice::quant::sparsity::Sparsity::Unstructured(per_layer[l] as f32);
                sparsities[l] = Some(per_layer[l]);
            }
        }
    } else if a.sparsity.is_some() {
        return Err(pumice::Error::InvalidArgument(
            "with --measurement, --sparsity goes with --allocate luc (per-layer sparsity around that mean)".into(),
        )
        .into());
    }
    let layers: Vec<serde_json::Value> = layers
        .into_iter()
        .zip(&sparsities)
        .map(|(mut v, s)| {
            v["sparsity"] = serde_json::json!(s);
            v
        })
        .collect();
    opts.rht = m.rht;
    let planned = pumice::compress::pipeline::planned_linear_bits(ck, opts)?;
    if planned > budget_bits {
        return Err(pumice::Error::InvalidArgument(format!(
            "with LUC pruning the linear layers need {planned} bits, over the budget of {budget_bits} (each pruned weight's mask bit costs more than it saves below 1/bits sparsity); lower --sparsity or raise the budget"
        ))
        .into());
    }
    opts.allocation = Some(serde_json::json!({
        "rule": rule.name(),
        "measurement": path.display().to_string(),
        "budget": match budget {
            Budget::Bpw(b) => serde_json::json!({"target_bpw": b}),
            Budget::MaxSize(b) => serde_json::json!({"max_size": b}),
            Budget::Memory { bytes, context } => serde_json::json!({"memory_budget": bytes, "context": context}),
        },
        "budget_bits": alloc.budget_bits,
        "allocated_bits": alloc.bits,
        "predicted_kl": alloc.predicted_kl,
        "layers": layers,
    }));
    eprintln!(
        "allocation ({}): {} (predicted KL {:.4})",
        rule.name(),
        alloc
            .choice
            .iter()
            .map(|&o| m.options[o].as_str())
            .collect::<Vec<_>>()
            .join(", "),
        alloc.predicted_kl
    );
    Ok(())
}

fn compress_cmd(gpu_opts: &GpuOptions, a: CompressArgs) -> anyhow::Result<()> {
    use pumice::compress::calib::CalibOptions;
    use pumice::compress::pipeline::{compress, CalderaSettings, CompressOptions, Event, Method};
    use pumice::quant::{GptqOptions, Grid};

    let mut rep = progress::Reporter::new(a.json);
    let shard = match (&a.output, a.shard) {
        (Some(_), _) => None,
        (None, Some(s)) => Some(s),
        (None, None) => Some(shard_from_env(a.shards)?),
    };
    if shard.is_some() && (a.hessians.is_none() || a.work_dir.is_none()) {
        return Err(pumice::Error::InvalidArgument(
            "a shard needs --hessians HDIR (from `pumice hessians`) and --work-dir DIR".into(),
        )
        .into());
    }
    let ck = Checkpoint::open(&a.model)?;
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
    let bits = a
        .bits
        .unwrap_or(if a.method == MethodArg::Caldera { 2 } else { 4 });
    let caldera = a.method == MethodArg::Caldera;
    let group_size = a.group_size.unwrap_or(if caldera { 64 } else { 128 });
    let symmetric = a.symmetric || (caldera && !a.asymmetric);
    let grid = Grid::new(bits, group_size, symmetric)?.with_clip(!a.no_clip);
    let mut opts = CompressOptions {
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
        calib: a.cal.options()?,
        caldera: CalderaSettings {
            target_bpw: a.target_bpw,
            rank: a.rank,
            lr_bits: a.lr_bits,
            lr_group_size: a.lr_group_size,
            outer_iters: a.outer_iters.max(1),
            inner_iters: a.inner_iters.max(1),
            clip: !a.no_clip,
        },
        output: a.output.clone().unwrap_or_default(),
        force: a.force,
        rht: a.rht || (a.method == MethodArg::Caldera && !a.no_rht),
        hessians: a.hessians.clone(),
        work_dir: a.work_dir.clone(),
        resume: a.resume,
        shard,
    };
    if let Some(path) = &a.measurement {
        allocate_layers(&ck, path, &a, &mut opts)?;
    }
    let gpu = Gpu::new(gpu_opts)?;
    eprintln!(
        "compressing {} with {:?} on {}",
        a.model.display(),
        a.method,
        gpu.describe()
    );
    rep.emit(
        "start",
        serde_json::json!({
            "command": "compress", "model": a.model.display().to_string(),
            "method": opts.method.name(), "adapter": gpu.describe(),
            "shard": shard.map(|(i, n)| format!("{i}/{n}")),
        }),
    );
    let summary = compress(&gpu, &ck, &opts, &mut |e: &Event| rep.on(e))?;
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
    let mut before_after = None;
    if let Some(tokens) = eval_tokens {
        let out_ck = Checkpoint::open(&output)?;
        let eopts = EngineOptions {
            resident_bytes: 2 << 30,
            max_positions: a.eval_ctx,
        };
        let eval_opts = EvalOptions {
            ctx: a.eval_ctx,
            max_windows: a.eval_windows,
            batch: 4,
        };
        let mut orig = Engine::new(&gpu, &ck, &eopts)?;
        let before = evaluate(&mut orig, None, &tokens, &eval_opts, &mut |_| {})?;
        let mut comp = Engine::new(&gpu, &out_ck, &eopts)?;
        let after = evaluate(&mut comp, Some(&mut orig), &tokens, &eval_opts, &mut |_| {})?;
        before_after = Some((before, after));
    }
    // KL against the original on sequences the original samples itself (seed + 1, so they
    // differ from the calibration).
    let mut self_eval = None;
    if a.eval_samples > 0 {
        let len = 256.min(ck.config().max_position_embeddings).max(2);
        let eopts = EngineOptions {
            resident_bytes: 2 << 30,
            max_positions: len,
        };
        let mut orig = Engine::new(&gpu, &ck, &eopts)?;
        let copts = CalibOptions {
            samples: a.eval_samples,
            len,
            seed: a.cal.seed.wrapping_add(1),
            newlines: newlines(a.cal.raw_text),
        };
        let seqs = pumice::compress::calib::self_generated(&mut orig, &copts, &mut |_, _| {})?;
        let out_ck = Checkpoint::open(&output)?;
        let mut comp = Engine::new(&gpu, &out_ck, &eopts)?;
        let eval_opts = EvalOptions {
            ctx: len,
            max_windows: None,
            batch: 4,
        };
        self_eval = Some(evaluate(
            &mut comp,
            Some(&mut orig),
            &seqs.tokens,
            &eval_opts,
            &mut |_| {},
        )?);
    }
    // The allocation report: report.svg in the output directory (temporary name, renamed).
    let report_rows = if opts.allocation.is_some() {
        let m = pumice::model::compressed::Manifest::read(&output)?;
        let rows = pumice::budget::report::rows(&m).unwrap_or_default();
        let title = format!(
            "{}: {} allocation, {:.3} bits/parameter in the linear layers",
            a.model.display(),
            opts.allocation
                .as_ref()
                .and_then(|v| v["rule"].as_str())
                .unwrap_or("?"),
            summary.linear_bits_per_parameter
        );
        let svg = pumice::budget::report::svg(&rows, &title);
        let path = output.join("report.svg");
        let tmp = output.join(".report.svg.pumice-tmp");
        std::fs::write(&tmp, svg).map_err(|e| pumice::Error::Io {
            path: tmp.clone(),
            source: e,
        })?;
        std::fs::rename(&tmp, &path).map_err(|e| pumice::Error::Io {
            path: path.clone(),
            source: e,
        })?;
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

fn parse_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

/// --temperature: finite and ≥ 0.
fn parse_temperature(s: &str) -> Result<f32, String> {
    let v = parse_f64(s)?;
    if v < 0.0 || v > 1e6 {
        return Err(format!("{v} must be within 0 (greedy) and 1e6"));
    }
    Ok(v as f32)
}

/// --top-p: a probability mass in (0, 1].
fn parse_top_p(s: &str) -> Result<f32, String> {
    let v = parse_f64(s)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("{v} must be within (0, 1]"));
    }
    Ok(v as f32)
}

/// --target-bpw: stored bits per weight; at least 1 (no grid pumice has stores less) and at
/// most 32.
fn parse_target_bpw(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if !(1.0..=32.0).contains(&v) {
        return Err(format!("{v} bits per weight must be within 1 and 32"));
    }
    Ok(v)
}

/// How text inputs are read: Python's universal newlines unless `--raw-text`.
fn newlines(raw: bool) -> pumice::text::Newlines {
    if raw {
        pumice::text::Newlines::Keep
    } else {
        pumice::text::Newlines::Universal
    }
}

fn read_token_file(path: &std::path::Path) -> Result<Vec<u32>, pumice::Error> {
    let text = pumice::text::read_text(path, pumice::text::Newlines::Keep)?;
    text.split_whitespace()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u32>().map_err(|_| {
                pumice::Error::InvalidArgument(format!(
                    "{}: item {} (`{s}`) is not a token id",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect()
}

fn eval(gpu_opts: &GpuOptions, a: EvalArgs) -> anyhow::Result<()> {
    let ck = Checkpoint::open(&a.model)?;
    let reference = a.reference.as_ref().map(Checkpoint::open).transpose()?;
    let tokens = match (&a.text, &a.token_file) {
        (_, Some(f)) => read_token_file(f)?,
        (Some(t), None) => {
            let tok = Tokenizer::from_model_dir(&a.model)?.ok_or_else(|| {
                pumice::Error::InvalidArgument(format!(
                    "{} has no tokenizer.json; pass token ids with --token-file",
                    a.model.display()
                ))
            })?;
            let text = pumice::text::read_text(t, newlines(a.raw_text))?;
            tok.encode(&text)?
        }
        (None, None) => unreachable!("clap requires --text or --token-file"),
    };
    let windows = window_count(tokens.len(), a.ctx, a.max_windows);
    // Checked before anything is sized from --ctx (the RoPE table, the KV buffers).
    let source = a
        .text
        .as_ref()
        .or(a.token_file.as_ref())
        .expect("clap requires one");
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
    let gpu = Gpu::new(gpu_opts)?;
    tracing::info!("evaluating on {}", gpu.describe());
    let eopts = EngineOptions {
        resident_bytes: a.max_resident_mb << 20,
        max_positions: a.ctx,
    };
    let mut engine = Engine::new(&gpu, &ck, &eopts)?;
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

fn generate_cmd(gpu_opts: &GpuOptions, a: GenerateArgs) -> anyhow::Result<()> {
    let ck = Checkpoint::open(&a.model)?;
    let tok = Tokenizer::from_model_dir(&a.model)?.ok_or_else(|| {
        pumice::Error::InvalidArgument(format!("{} has no tokenizer.json", a.model.display()))
    })?;
    let prompt_text = pumice::text::normalize(&a.prompt, newlines(a.raw_text)).into_owned();
    let prompt = tok.encode(&prompt_text)?;
    let gpu = Gpu::new(gpu_opts)?;
    let positions = prompt
        .len()
        .max(1)
        .saturating_add(a.max_tokens)
        .min(ck.config().max_position_embeddings.max(1));
    let mut engine = Engine::new(
        &gpu,
        &ck,
        &EngineOptions {
            resident_bytes: a.max_resident_mb << 20,
            max_positions: positions,
        },
    )?;
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

fn devices(opts: &GpuOptions, json: bool) -> anyhow::Result<()> {
    let reports = list_adapters(opts);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
        return Ok(());
    }
    if reports.is_empty() {
        return Err(pumice::Error::NoAdapter(
            "none found; on Linux without a GPU install Mesa's lavapipe (Debian: mesa-vulkan-drivers libvulkan1)".into(),
        )
        .into());
    }
    for r in &reports {
        print_adapter(&mut out, r)?;
    }
    writeln!(
        out,
        "(* = the adapter pumice uses with these options; choose with --backend / --adapter)"
    )?;
    Ok(())
}

fn print_adapter(out: &mut impl Write, r: &AdapterReport) -> std::io::Result<()> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut feats = Vec::new();
    if r.features.shader_f16 {
        feats.push("shader-f16");
    }
    if r.features.subgroups {
        feats.push("subgroups");
    }
    if r.features.timestamp_query {
        feats.push("timestamps");
    }
    writeln!(
        out,
        "{} [{}] {} — {}, {}, driver: {} {}",
        if r.selected { '*' } else { ' ' },
        r.index,
        r.name,
        r.backend,
        r.device_type,
        r.driver,
        r.driver_info
    )?;
    writeln!(
        out,
        "      max binding {:.0} MiB, max buffer {:.0} MiB, workgroup ≤ {} invocations / {} B shared, subgroup {}–{}, features: {}",
        mib(r.limits.max_storage_buffer_binding_size),
        mib(r.limits.max_buffer_size),
        r.limits.max_compute_invocations_per_workgroup,
        r.limits.max_compute_workgroup_storage_size,
        r.limits.subgroup_min_size,
        r.limits.subgroup_max_size,
        if feats.is_empty() { "none".to_string() } else { feats.join(", ") }
    )
}

fn inspect(model: &std::path::Path, json: bool, check_weights: bool) -> anyhow::Result<()> {
    let ck = Checkpoint::open(model)?;
    if check_weights {
        ck.check_finite()?;
    }
    let s = ModelSummary::of(&ck);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        return Ok(());
    }
    writeln!(out, "{}  ({})", s.path, s.architecture)?;
    writeln!(
        out,
        "  parameters      {} ({} in decoder linear layers)",
        s.parameters, s.linear_parameters
    )?;
    writeln!(out, "  layers          {}", s.layers)?;
    writeln!(
        out,
        "  hidden size     {} (intermediate {})",
        s.hidden_size, s.intermediate_size
    )?;
    writeln!(
        out,
        "  attention       {} heads, {} KV heads, head dim {}{}",
        s.num_attention_heads,
        s.num_key_value_heads,
        s.head_dim,
        if s.attention_bias { ", q/k/v bias" } else { "" }
    )?;
    writeln!(
        out,
        "  vocabulary      {}{}",
        s.vocab_size,
        if s.tie_word_embeddings {
            " (tied LM head)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "  rope            theta {} {:?}",
        s.rope.theta, s.rope.scaling
    )?;
    writeln!(out, "  dtype           {}", s.dtype)?;
    writeln!(
        out,
        "  on disk         {} bytes in {} file(s){}",
        s.bytes_on_disk,
        s.files.len(),
        if s.tokenizer {
            ", tokenizer.json"
        } else {
            ", no tokenizer"
        }
    )?;
    writeln!(
        out,
        "  bits/parameter  {:.3} overall, {:.3} in decoder linear layers",
        s.bits_per_parameter, s.linear_bits_per_parameter
    )?;
    if let Some(m) = ck.manifest() {
        writeln!(
            out,
            "  compressed      {} {} from {} (sha256 {}…)",
            m.method,
            m.params,
            m.source.path,
            &m.source.sha256[..12.min(m.source.sha256.len())]
        )?;
    }
    if check_weights {
        writeln!(out, "  weights         all finite")?;
    }
    Ok(())
}
