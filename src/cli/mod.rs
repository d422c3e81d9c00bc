//! The command line: one file per command, each holding its arguments, its help and a `run`
//! that converts the arguments into library options, calls the library and renders the result.
//! `args.rs` holds what several commands share, `setup.rs` the process around them,
//! `progress.rs` the rendering of progress (bars on a terminal, JSON lines otherwise).
//!
//! Invariant: no file is written and no layer is looped over here; that is the library's work.

pub(crate) mod args;
pub(crate) mod bench;
pub(crate) mod compress;
pub(crate) mod devices;
pub(crate) mod eval;
pub(crate) mod export;
pub(crate) mod finetune;
pub(crate) mod generate;
pub(crate) mod hessians;
pub(crate) mod importance;
pub(crate) mod inspect;
pub(crate) mod merge;
pub(crate) mod progress;
pub(crate) mod setup;

use std::path::PathBuf;

use bench::BenchArgs;
use clap::{Args, Parser, Subcommand};
use compress::CompressArgs;
use eval::{EvalArgs, EVAL_PROTOCOL};
use export::ExportArgs;
use generate::GenerateArgs;
use hessians::HessiansArgs;
use importance::ImportanceArgs;
use merge::MergeArgs;
use pumice::gpu::{AdapterSelector, BackendChoice, GpuOptions, TuneMode};

pub(crate) const EXIT_CODES: &str = "\
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
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) gpu: GpuArgs,

    /// More log output on stderr (-v debug, -vv trace); PUMICE_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args, Debug)]
pub(crate) struct GpuArgs {
    /// Graphics API to use: vulkan, metal, dx12, gl or all.
    #[arg(long, global = true, env = "PUMICE_BACKEND", value_parser = parse_backend)]
    pub(crate) backend: Option<BackendChoice>,

    /// Adapter by index (as listed by `pumice devices`) or by a substring of its name.
    /// Default: the best discrete GPU, else integrated, else a CPU adapter (lavapipe).
    #[arg(long, global = true, env = "PUMICE_ADAPTER", value_parser = parse_adapter)]
    pub(crate) adapter: Option<AdapterSelector>,

    /// Kernel tuning: auto (time the kernel configurations the first time an adapter and
    /// driver are used, cache the choice in the user's cache directory), off (the adapter
    /// class's defaults), again (measure again and overwrite the cache).
    #[arg(long, global = true, env = "PUMICE_TUNE", default_value = "auto", value_parser = parse_tune)]
    pub(crate) tune: TuneMode,

    /// Time every GPU dispatch with timestamp queries and report the time per kernel (and
    /// the shader build time per kernel). Slower: each dispatch waits for its timestamps.
    #[arg(long, global = true, env = "PUMICE_PROFILE")]
    pub(crate) profile: bool,
}

impl GpuArgs {
    pub(crate) fn options(&self) -> GpuOptions {
        GpuOptions {
            backend: self.backend,
            adapter: self.adapter.clone(),
            max_binding_bytes: None,
            max_loop_iterations: None,
            tune: self.tune,
            profile: self.profile,
        }
    }
}

pub(crate) fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    s.parse().map_err(|e: pumice::Error| e.to_string())
}

pub(crate) fn parse_tune(s: &str) -> Result<TuneMode, String> {
    s.parse().map_err(|e: pumice::Error| e.to_string())
}

pub(crate) fn parse_adapter(s: &str) -> Result<AdapterSelector, String> {
    s.parse().map_err(|e: pumice::Error| e.to_string())
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
    /// Write a compressed checkpoint in another format: dense weights, compressed-tensors
    /// (transformers, vLLM) with CALDERA's factors as a PEFT adapter, or the adapter alone.
    /// Only the checkpoint is read; no GPU. What a format cannot hold exactly is refused.
    Export(ExportArgs),
    /// Measure each decoder layer: LSAQ importance (1 − mean Jaccard similarity of the top-k
    /// tokens predicted from the layer's input and output, both read through the final norm and
    /// the LM head) and, per option, the measured sensitivity (KL vs the original when only that
    /// layer is compressed with it) and stored size. `compress --measurement` reuses the file.
    Importance(ImportanceArgs),
    /// Tune a CALDERA checkpoint's low-rank factors on the GPU (Q frozen): distillation
    /// against the original model on sequences sampled from it (no dataset needed) or on
    /// text, or cross-entropy on text; writes the checkpoint with the tuned factors quantized
    /// again on the stored factor grid (same size) or a finer one (--factor-bits); or LoRA
    /// adapters on any checkpoint (--lora-rank: a PEFT adapter directory), with Edge-LLM's
    /// exits and windows (--exit-every, --window).
    Finetune(Box<finetune::FinetuneArgs>),
}

/// Run the parsed command.
pub(crate) fn run(cli: Cli) -> anyhow::Result<()> {
    let gpu = cli.gpu.options();
    match cli.command {
        Command::Devices { json } => devices::run(&gpu, json),
        Command::Inspect {
            model,
            json,
            check_weights,
        } => inspect::run(&model, json, check_weights),
        Command::Eval(args) => eval::run(&gpu, args),
        Command::Generate(args) => generate::run(&gpu, args),
        Command::Compress(args) => compress::run(&gpu, *args),
        Command::Importance(args) => importance::run(&gpu, args),
        Command::Hessians(args) => hessians::run(&gpu, args),
        Command::Merge(args) => merge::run(args),
        Command::Export(args) => export::run(args),
        Command::Bench(args) => bench::run(&cli.gpu, args),
        Command::Finetune(args) => finetune::run(&gpu, *args),
    }
}
