//! `pumice bench`: the same operations on every adapter and backend present, beside the CPU
//! (faer) doing the same work, each timed as the median of several runs after warm-up.
//!
//! Operations: GEMM at several shapes (GFLOP/s), Hessian accumulation H += XᵀX, GPTQ and
//! CALDERA of Llama-7B-shaped matrices (synthetic Gaussian W; H from correlated activations
//! with 0.25 % outlier channels), the forward pass on the asset model (tokens/s) and
//! end-to-end compression of it. `quick` shrinks shapes and runs so every backend finishes
//! in minutes even on a CPU adapter.
//!
//! Results carry the adapter's identity (name, backend, type, driver) so tables from
//! different machines can be compared.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::compress::calib::CalibOptions;
use crate::compress::pipeline::{compress, CalibSource, CompressOptions, Method};
use crate::cpu;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::quant::gptq;
use crate::gpu::{gemm, Batch, GemmOp, Gpu, GpuMatrix, HessianAccumulator};
use crate::infer::eval::{evaluate, EvalOptions};
use crate::infer::{Engine, EngineOptions};
use crate::lowrank::caldera::{decompose, CalderaOptions};
use crate::model::Checkpoint;
use crate::quant::reference::prepare_hessian;
use crate::quant::{GptqOptions, Grid, GridKind};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Small shapes and few runs (minutes on a CPU adapter).
    pub quick: bool,
    /// Timed runs per operation (the median is reported).
    pub runs: usize,
    /// Untimed runs before them.
    pub warmup: usize,
    /// Outer iterations of each timed CALDERA run (a full run is 15; time scales with them).
    pub caldera_outer: usize,
    /// L/R refinement rounds per outer iteration (a compression's default is 10).
    pub caldera_inner: usize,
    /// Warm-started outer iterations (compressions do not warm-start).
    pub caldera_warm_start: bool,
    /// Where the CALDERA rows' low-rank products run.
    pub caldera_placement: crate::lowrank::fit::Placement,
    /// Only this (rows, cols) for the GPTQ and CALDERA rows.
    pub matrix: Option<(usize, usize)>,
    /// Only this CALDERA rank.
    pub rank: Option<usize>,
    /// The model for the forward and end-to-end rows (the asset model by default).
    pub model: PathBuf,
    /// Where end-to-end compressions write (removed after each run).
    pub scratch: PathBuf,
    /// Only operations whose name contains one of these (all when empty).
    pub only: Vec<String>,
}

/// One measured operation on one target.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// `vulkan`, `gl`, `metal`, `dx12`, or `cpu` for the faer baseline.
    pub backend: String,
    pub adapter: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub op: String,
    pub shape: String,
    pub runs: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// Floating-point operations per second (nominal count of the operation), in 10⁹.
    pub gflops: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Relative weighted error of the result (GPTQ, CALDERA), a check that the work was done.
    pub relative_error: Option<f64>,
    /// Set when the operation failed on this target (the others still run).
    pub error: Option<String>,
    /// The kernel configuration the GPU used (GEMM: `WGXxWGYxTMxTN`, tuned per adapter).
    pub config: Option<String>,
    /// With `--profile`: GPU time per kernel over this operation's runs, warm-up included.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<crate::gpu::profile::KernelTime>,
}

/// Where an operation runs.
pub enum Target<'a> {
    Gpu(&'a Gpu),
    /// faer on the CPU (the baseline).
    Cpu,
}

impl Target<'_> {
    fn identity(&self) -> (String, String, String, String, String) {
        match self {
            Target::Gpu(g) => {
                let r = g.report();
                (
                    r.backend.clone(),
                    r.name.clone(),
                    r.device_type.clone(),
                    r.driver.clone(),
                    r.driver_info.clone(),
                )
            }
            Target::Cpu => (
                "cpu".into(),
                format!("faer on {} threads", rayon_threads()),
                "cpu".into(),
                "faer".into(),
                cpu_model(),
            ),
        }
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The CPU's model name (Linux), for result identity.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Deterministic values uniform in [-0.5, 0.5) (xorshift).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// H = XᵀX/N for N = `t` correlated activations of `n` channels (16 latent factors plus
/// noise) in which every 400th channel is scaled ×20 (0.25 %): the outlier regime of real
/// LLM activations.
pub fn outlier_hessian(t: usize, n: usize) -> Vec<f64> {
    let z = values(t * 16, 1);
    let mix = values(16 * n, 2);
    let noise = values(t * n, 3);
    let x: Vec<f32> = (0..t * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let v: f32 =
                (0..16).map(|k| z[r * 16 + k] * mix[k * n + c]).sum::<f32>() + 0.3 * noise[i];
            if c % 400 == 7 {
                v * 20.0
            } else {
                v
            }
        })
        .collect();
    cpu::hessian_faer(&x, t, n)
        .into_iter()
        .map(|v| v as f64 / t as f64)
        .collect()
}

/// Times of `runs` calls after `warmup` untimed ones.
fn time_runs(warmup: usize, runs: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        crate::interrupt::check("stopped during the benchmark")?;
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(t)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// GEMM shapes (m, k, n, op, label).
fn gemm_shapes(quick: bool) -> Vec<(usize, usize, usize, GemmOp, &'static str)> {
    if quick {
        vec![
            (512, 512, 512, GemmOp::NN, "square"),
            (1024, 1024, 1024, GemmOp::NN, "square"),
            (
                1,
                4096,
                4096,
                GemmOp::NT,
                "decode: one token × W[4096×4096]ᵀ",
            ),
            (
                256,
                4096,
                4096,
                GemmOp::NT,
                "prefill: 256 tokens × W[4096×4096]ᵀ",
            ),
        ]
    } else {
        vec![
            (1024, 1024, 1024, GemmOp::NN, "square"),
            (2048, 2048, 2048, GemmOp::NN, "square"),
            (4096, 4096, 4096, GemmOp::NN, "square"),
            (
                1,
                4096,
                11008,
                GemmOp::NT,
                "decode: one token × W[11008×4096]ᵀ",
            ),
            (
                2048,
                4096,
                4096,
                GemmOp::NT,
                "prefill: 2048 tokens × W[4096×4096]ᵀ",
            ),
            (
                2048,
                4096,
                11008,
                GemmOp::NT,
                "prefill: 2048 tokens × W[11008×4096]ᵀ",
            ),
        ]
    }
}

/// Run every operation on `target`, handing each result to `emit` as it is measured.
pub fn run(
    target: &Target<'_>,
    opts: &BenchOptions,
    emit: &mut dyn FnMut(BenchResult),
) -> Result<()> {
    let (backend, adapter, device_type, driver, driver_info) = target.identity();
    if let Target::Gpu(g) = target {
        // Tune first, so no operation's time (or profile) includes it.
        g.tuning();
        g.reset_profile();
    }
    let wanted =
        |op: &str| opts.only.is_empty() || opts.only.iter().any(|o| op.contains(o.as_str()));
    // Set before a record() whose row should name its kernel configuration.
    let config: std::cell::RefCell<Option<String>> = Default::default();
    let mut record = |op: &str,
                      shape: String,
                      times: Result<Vec<f64>>,
                      work: Option<f64>,
                      tokens: Option<f64>,
                      relative_error: Option<f64>|
     -> Result<()> {
        let (runs, med, min, max, error) = match times {
            Ok(t) => (
                t.len(),
                median(&t),
                t.iter().cloned().fold(f64::INFINITY, f64::min),
                t.iter().cloned().fold(0.0, f64::max),
                None,
            ),
            // A stop request ends the whole benchmark; other failures are recorded.
            Err(Error::Interrupted(m)) => return Err(Error::Interrupted(m)),
            Err(e) => (0, f64::NAN, f64::NAN, f64::NAN, Some(e.to_string())),
        };
        emit(BenchResult {
            backend: backend.clone(),
            adapter: adapter.clone(),
            device_type: device_type.clone(),
            driver: driver.clone(),
            driver_info: driver_info.clone(),
            op: op.into(),
            shape,
            runs,
            median_s: med,
            min_s: min,
            max_s: max,
            gflops: work.filter(|_| error.is_none()).map(|w| w / med / 1e9),
            tokens_per_s: tokens.filter(|_| error.is_none()).map(|t| t / med),
            relative_error,
            error,
            config: config.borrow_mut().take(),
            kernels: match target {
                Target::Gpu(g) if g.profiling() => {
                    let k = g.profile().gpu;
                    g.reset_profile();
                    k
                }
                _ => Vec::new(),
            },
        });
        Ok(())
    };
    let (warmup, runs) = (opts.warmup, opts.runs.max(1));

    if wanted("gemm") {
        for (m, k, n, op, label) in gemm_shapes(opts.quick) {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let (br, bc) = match op {
                GemmOp::NN => (k, n),
                GemmOp::NT => (n, k),
            };
            let shape = match op {
                GemmOp::NN => format!("A[{m}×{k}]·B[{k}×{n}] ({label})"),
                GemmOp::NT => format!("X[{m}×{k}]·W[{n}×{k}]ᵀ ({label})"),
            };
            let times = match target {
                Target::Gpu(g) => (|| {
                    let ga = GpuMatrix::from_f32(g, m, k, DType::F32, &a)?;
                    let gb = GpuMatrix::from_f32(g, br, bc, DType::F32, &b)?;
                    let gc = GpuMatrix::uninit(g, m, n)?;
                    time_runs(warmup, runs, &mut || {
                        let mut batch = Batch::new(g);
                        gemm(&mut batch, &ga, &gb, op, &gc, false)?;
                        batch.submit()?;
                        g.wait()
                    })
                })(),
                Target::Cpu => time_runs(warmup, runs, &mut || {
                    std::hint::black_box(cpu::gemm_faer(&a, &b, m, k, n, op == GemmOp::NT));
                    Ok(())
                }),
            };
            if let Target::Gpu(g) = target {
                *config.borrow_mut() =
                    Some(crate::gpu::GemmConfig::for_product(g, m, n).to_string());
            }
            record(
                "gemm f32",
                shape,
                times,
                Some(2.0 * (m * k * n) as f64),
                None,
                None,
            )?;
        }
    }

    let hn = if opts.quick { 1024 } else { 4096 };
    if wanted("hessian") {
        let t = hn;
        let x = values(t * hn, 3);
        let times = match target {
            Target::Gpu(g) => (|| {
                let gx = GpuMatrix::from_f32(g, t, hn, DType::F32, &x)?;
                let mut acc = HessianAccumulator::new(g, hn)?;
                time_runs(warmup, runs, &mut || {
                    let mut batch = Batch::new(g);
                    acc.accumulate(&mut batch, &gx)?;
                    batch.submit()?;
                    g.wait()
                })
            })(),
            Target::Cpu => time_runs(warmup, runs, &mut || {
                std::hint::black_box(cpu::hessian_faer(&x, t, hn));
                Ok(())
            }),
        };
        // The symmetric result's flops: t·n·(n+1).
        record(
            "hessian XᵀX",
            format!("X[{t}×{hn}]"),
            times,
            Some((t * hn * (hn + 1)) as f64),
            None,
            None,
        )?;
    }

    // GPTQ and CALDERA of Llama-7B-shaped matrices (quick: a 1024² stand-in).
    let shapes: Vec<(usize, usize)> = match opts.matrix {
        Some(s) => vec![s],
        None if opts.quick => vec![(1024, 1024)],
        None => vec![(4096, 4096), (11008, 4096)],
    };
    let ranks: Vec<usize> = match opts.rank {
        Some(k) => vec![k],
        None if opts.quick => vec![64],
        None => vec![64, 256],
    };
    let want_q = wanted("gptq") || wanted("caldera");
    let mut hessians: Vec<(usize, Vec<f64>)> = Vec::new();
    for &(m, n) in shapes.iter().filter(|_| want_q) {
        if !hessians.iter().any(|(k, _)| *k == n) {
            hessians.push((n, outlier_hessian(n, n)));
        }
        let h = &hessians
            .iter()
            .find(|(k, _)| *k == n)
            .expect("just added")
            .1;
        let w: Vec<f32> = crate::lowrank::rsvd::gaussian(m * n, m as u64)
            .iter()
            .map(|v| v * 0.02)
            .collect();
        let gopts = GptqOptions::default();
        let grid = Grid::new(2, 64, GridKind::Asymmetric)?;
        if wanted("gptq") {
            let prep = prepare_hessian(h, n, &gopts)?;
            let mut last = None;
            let times = match target {
                Target::Gpu(g) => time_runs(warmup, runs, &mut || {
                    let q = gptq(g, &w, m, n, &prep, grid, gopts.block)?;
                    g.wait()?;
                    last = Some(q.download(g)?);
                    Ok(())
                }),
                // The CPU baseline is the f64 reference; only at the small shape.
                Target::Cpu if opts.quick => time_runs(warmup.min(1), runs.min(3), &mut || {
                    last = Some(crate::quant::reference::gptq(
                        &w,
                        m,
                        n,
                        &prep,
                        grid,
                        gopts.block,
                    ));
                    Ok(())
                }),
                Target::Cpu => continue_unmeasured(),
            };
            // The result's relative weighted error (untimed), comparable with CALDERA's.
            let err = last.map(|q| {
                use crate::quant::reference::{weighted_error, weighted_norm};
                weighted_error(&w, &q.dequantize(), m, h) / weighted_norm(&w, m, h)
            });
            if !matches!(times, Err(Error::InvalidArgument(ref s)) if s == SKIP) {
                record(
                    "gptq 2-bit g64",
                    format!("W[{m}×{n}]"),
                    times,
                    Some(2.0 * (m * n * n) as f64),
                    None,
                    err,
                )?;
            }
        }
        if wanted("caldera") {
            for &k in &ranks {
                let co = CalderaOptions {
                    outer_iters: opts.caldera_outer.max(1),
                    inner_iters: opts.caldera_inner.max(1),
                    warm_start: opts.caldera_warm_start,
                    placement: opts.caldera_placement,
                    ..CalderaOptions::new(k)
                };
                let mut err = None;
                let times = match target {
                    Target::Gpu(g) => time_runs(warmup, runs, &mut || {
                        let d = decompose(g, &w, m, n, h, &co)?;
                        err = Some(d.relative_error);
                        Ok(())
                    }),
                    Target::Cpu if opts.quick => time_runs(warmup.min(1), runs.min(3), &mut || {
                        let d = crate::lowrank::caldera::reference(&w, m, n, h, &co)?;
                        err = Some(d.relative_error);
                        Ok(())
                    }),
                    Target::Cpu => continue_unmeasured(),
                };
                if !matches!(times, Err(Error::InvalidArgument(ref s)) if s == SKIP) {
                    record(
                        "caldera",
                        format!(
                            "W[{m}×{n}] rank {k}, {} outer × {} inner iterations",
                            co.outer_iters, co.inner_iters
                        ),
                        times,
                        None,
                        None,
                        err,
                    )?;
                }
            }
        }
    }

    // The forward pass and end-to-end compression of the asset model (GPU only).
    if let Target::Gpu(g) = target {
        if wanted("forward") {
            let (batch, ctx) = (4usize, 256usize);
            let times = (|| {
                let ck = Checkpoint::open(&opts.model)?;
                let v = ck.config().vocab_size as u64;
                let tokens: Vec<u32> = values(batch * ctx, 9)
                    .iter()
                    .map(|x| (((*x + 0.5) as f64 * v as f64) as u64).min(v - 1) as u32)
                    .collect();
                let mut engine = Engine::new(
                    g,
                    &ck,
                    &EngineOptions {
                        resident_bytes: 2 << 30,
                        max_positions: ctx,
                    },
                )?;
                let eo = EvalOptions {
                    ctx,
                    max_windows: Some(batch),
                    batch,
                };
                time_runs(warmup, runs, &mut || {
                    evaluate(&mut engine, None, &tokens, &eo, &mut |_| {})?;
                    Ok(())
                })
            })();
            record(
                "forward (eval)",
                format!("{}: {batch} × {ctx} tokens", model_name(&opts.model)),
                times,
                None,
                Some((batch * ctx) as f64),
                None,
            )?;
        }
        if wanted("compress") {
            let (method, samples, len, label) = if opts.quick {
                (Method::Gptq, 16, 128, "gptq 4-bit g128")
            } else {
                (Method::Caldera, 128, 512, "caldera defaults")
            };
            let out = opts.scratch.join("bench-compress");
            let times = (|| {
                let ck = Checkpoint::open(&opts.model)?;
                let co = CompressOptions {
                    layers: Vec::new(),
                    allocation: None,
                    sparsity: Default::default(),
                    method,
                    grid: if method == Method::Caldera {
                        Grid::new(2, 64, GridKind::Midrise)?
                    } else {
                        Grid::new(4, 128, GridKind::Asymmetric)?
                    },
                    gptq: GptqOptions::default(),
                    calib_source: CalibSource::SelfGenerated,
                    calib: CalibOptions {
                        samples,
                        len,
                        seed: 0,
                        hessians_on: crate::lowrank::fit::Placement::Auto,
                        newlines: Default::default(),
                    },
                    caldera: Default::default(),
                    output: out.clone(),
                    force: true,
                    rht: method == Method::Caldera,
                    hessians: None,
                    work_dir: None,
                    resume: false,
                    shard: None,
                    format: crate::format::FormatKind::Native,
                    dtype: None,
                };
                // Whole jobs: no warm-up beyond the kernels' pipelines, at most three runs.
                let r = time_runs(0, runs.min(3), &mut || {
                    compress(g, &ck, &co, &mut |_| {})?;
                    Ok(())
                });
                let _ = std::fs::remove_dir_all(&out);
                r
            })();
            record(
                "compress end to end",
                format!(
                    "{}: {label}, self-calibration {samples} × {len}",
                    model_name(&opts.model)
                ),
                times,
                None,
                None,
                None,
            )?;
        }
    }
    Ok(())
}

/// Marker for a row that has no CPU baseline at this size.
const SKIP: &str = "no CPU baseline at this size";

fn continue_unmeasured() -> Result<Vec<f64>> {
    Err(Error::InvalidArgument(SKIP.into()))
}

fn model_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
