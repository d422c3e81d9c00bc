//! The `pumice` command line. The only place that uses anyhow: library errors arrive as
//! `pumice::Error`, are printed as one line, and map to the documented exit codes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pumice::gpu::{list_adapters, AdapterReport, AdapterSelector, BackendChoice, GpuOptions};
use pumice::model::{Checkpoint, ModelSummary};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the machine failed: GPU or device error, I/O error, out of memory
  2  bad input: unreadable or inconsistent model files, bad arguments";

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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<pumice::Error>().map(|p| p.exit_code()).unwrap_or(1);
            let msg = pumice::error::one_line(&format!("{e:#}"));
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::from(code as u8)
        }
    }
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
    }
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
    writeln!(out, "(* = the adapter pumice uses with these options; choose with --backend / --adapter)")?;
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
    writeln!(out, "  hidden size     {} (intermediate {})", s.hidden_size, s.intermediate_size)?;
    writeln!(
        out,
        "  attention       {} heads, {} KV heads, head dim {}{}",
        s.num_attention_heads,
        s.num_key_value_heads,
        s.head_dim,
        if s.attention_bias { ", q/k/v bias" } else { "" }
    )?;
    writeln!(out, "  vocabulary      {}{}", s.vocab_size, if s.tie_word_embeddings { " (tied LM head)" } else { "" })?;
    writeln!(out, "  rope            theta {} {:?}", s.rope.theta, s.rope.scaling)?;
    writeln!(out, "  dtype           {}", s.dtype)?;
    writeln!(
        out,
        "  on disk         {} bytes in {} file(s){}",
        s.bytes_on_disk,
        s.files.len(),
        if s.tokenizer { ", tokenizer.json" } else { ", no tokenizer" }
    )?;
    if check_weights {
        writeln!(out, "  weights         all finite")?;
    }
    Ok(())
}
