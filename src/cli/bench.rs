//! `pumice bench`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use pumice::gpu::tune::Origin;
use pumice::gpu::{list_adapters, AdapterSelector, BackendChoice, Gpu, GpuOptions};

use super::progress;
use super::GpuArgs;

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Small shapes (1024² stand-ins for the 7B matrices) and few runs: minutes per backend
    /// even on a CPU adapter.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Timed runs per operation (default 3 with --quick, else 5); the median is reported.
    #[arg(long)]
    pub(crate) runs: Option<usize>,
    /// Untimed warm-up runs before them.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Outer iterations of each timed CALDERA run (a compression uses 15; time is about
    /// proportional).
    #[arg(long, default_value_t = 1)]
    pub(crate) caldera_outer: usize,

    /// L/R refinement rounds per outer iteration of each timed CALDERA run (for error vs time
    /// curves; a compression's default is 10).
    #[arg(long, default_value_t = 10)]
    pub(crate) caldera_inner: usize,

    /// Start every CALDERA outer iteration after the first from the previous iteration's
    /// factors instead of a new randomized SVD (for comparison; compressions do not).
    #[arg(long)]
    pub(crate) caldera_warm: bool,

    /// Where each timed CALDERA run's low-rank products run: auto, gpu or host (as compress's
    /// --lowrank-on).
    #[arg(long, default_value = "auto", value_parser = super::args::parse_placement)]
    pub(crate) caldera_lowrank_on: pumice::lowrank::fit::Placement,

    /// Only this weight shape (ROWSxCOLS) for the GPTQ and CALDERA rows, e.g. 4096x4096.
    #[arg(long, value_parser = parse_shape)]
    pub(crate) matrix: Option<(usize, usize)>,

    /// Only this CALDERA rank.
    #[arg(long)]
    pub(crate) rank: Option<usize>,
    /// Only operations whose name contains one of these: gemm, hessian, gptq, caldera,
    /// forward, compress.
    #[arg(long, num_args = 1..)]
    pub(crate) only: Vec<String>,
    /// Skip the CPU (faer) baseline rows.
    #[arg(long)]
    pub(crate) no_cpu: bool,
    /// Model for the forward and end-to-end rows.
    #[arg(long, default_value = "assets/models/gutenberg-llama")]
    pub(crate) model: PathBuf,
    /// JSON lines on stdout: one per result, then a summary with every result and the
    /// machine's identity (implied when stdout is not a terminal).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(gpu_args: &GpuArgs, a: BenchArgs) -> anyhow::Result<()> {
    use pumice::bench::{run as bench_run, BenchOptions, BenchResult, Target};
    let rep = progress::Reporter::new(a.json);
    let scratch = tempdir_for_bench()?;
    let opts = BenchOptions {
        quick: a.quick,
        runs: a.runs.unwrap_or(if a.quick { 3 } else { 5 }),
        warmup: a.warmup,
        caldera_outer: a.caldera_outer,
        caldera_inner: a.caldera_inner,
        caldera_warm_start: a.caldera_warm,
        caldera_placement: a.caldera_lowrank_on,
        matrix: a.matrix,
        rank: a.rank,
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
        tune: gpu_args.tune,
        profile: gpu_args.profile,
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
                None => format!(
                    "{:.4} s median of {}{}",
                    r.median_s,
                    r.runs,
                    r.config
                        .as_ref()
                        .map(|c| format!(" [{c}]"))
                        .unwrap_or_default()
                ),
            }
        );
        if !r.kernels.is_empty() {
            eprintln!(
                "        GPU time by kernel: {}",
                pumice::gpu::profile::ProfileReport::line(&r.kernels, 6)
            );
        }
        rep.emit("result", serde_json::to_value(&r).unwrap_or_default());
        results.push(r);
    };
    for r in &adapters {
        let gpu = Gpu::new(&GpuOptions {
            backend: Some(backend),
            adapter: Some(AdapterSelector::Index(r.index)),
            max_binding_bytes: None,
            max_loop_iterations: None,
            tune: gpu_args.tune,
            profile: gpu_args.profile,
        });
        match gpu {
            Ok(g) => {
                eprintln!("benchmarking {}", g.describe());
                let t = g.tuning();
                let origin = match &t.origin {
                    Origin::Defaults => "defaults, tuning off".to_string(),
                    Origin::Cached(p) => format!("tuned earlier, cached in {}", p.display()),
                    Origin::Measured { seconds, saved } => format!(
                        "tuned now in {seconds:.1} s{}",
                        saved
                            .as_ref()
                            .map(|p| format!(", cached in {}", p.display()))
                            .unwrap_or_default()
                    ),
                };
                eprintln!(
                    "kernels: gemm {}, gemv {}, hessian {} ({origin})",
                    t.gemm, t.gemv, t.hessian
                );
                rep.emit(
                    "tuning",
                    serde_json::json!({
                        "adapter": g.report().name,
                        "backend": g.report().backend,
                        "gemm": t.gemm.to_string(),
                        "gemv": t.gemv.to_string(),
                        "hessian": t.hessian.to_string(),
                        "origin": origin,
                        "trials": t.trials,
                    }),
                );
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

pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// A private scratch directory for the end-to-end rows.
pub(crate) fn tempdir_for_bench() -> Result<PathBuf, pumice::Error> {
    let d = std::env::temp_dir().join(format!("pumice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| pumice::Error::Io {
        path: d.clone(),
        source: e,
    })?;
    Ok(d)
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(['x', 'X', '×'])
        .ok_or_else(|| format!("`{s}`: expected ROWSxCOLS, e.g. 4096x4096"))?;
    match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
        (Ok(m), Ok(n)) if m > 0 && n > 0 => Ok((m, n)),
        _ => Err(format!("`{s}`: expected ROWSxCOLS with positive sizes")),
    }
}
