//! Kernel configurations per adapter: chosen by a short timing run the first time an adapter
//! is used, then cached per adapter and driver in the user's cache directory.
//!
//! What is tuned: the GEMM register block and workgroup shape for products of many rows
//! ([`Tuning::gemm`]) and for one row (decode, [`Tuning::gemv`]), and the Hessian
//! accumulation's block ([`Tuning::hessian`]). Every candidate is one specialization of the
//! same kernel, and each is checked against an f64 result before it is timed (a candidate a
//! driver miscompiles is dropped, with a warning); the test suite checks every candidate on
//! awkward shapes on each backend it runs on.
//!
//! Invariants: tuning never fails an operation — when timing or the cache fails, the adapter
//! class's defaults are used and a warning is logged; a cache file is written under a
//! temporary name and renamed; its key covers the adapter, the driver and the kernel sources,
//! so a driver or kernel change re-tunes. `PUMICE_GEMM_TILE` (tuning by hand) overrides all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{Error, Result};

use super::batch::Batch;
use super::context::Gpu;
use super::gemm::{gemm_with_config, GemmConfig, GemmOp};
use super::hessian::{HessianAccumulator, HessianConfig};
use super::matrix::GpuMatrix;

/// Whether to tune (`--tune`, `PUMICE_TUNE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TuneMode {
    /// Use the cached choice, or tune once and cache it.
    #[default]
    Auto,
    /// The adapter class's defaults, nothing measured or cached.
    Off,
    /// Measure again and overwrite the cache.
    Again,
}

impl std::str::FromStr for TuneMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "on" => Ok(TuneMode::Auto),
            "off" | "0" | "no" => Ok(TuneMode::Off),
            "again" | "retune" => Ok(TuneMode::Again),
            _ => Err(Error::InvalidArgument(format!(
                "tune mode `{s}`: expected auto, off or again"
            ))),
        }
    }
}

/// Where the choice came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// Tuning off, or it failed (the warning says why).
    Defaults,
    /// Read from this cache file.
    Cached(PathBuf),
    /// Measured now, in this many seconds; saved to the path when there is one.
    Measured {
        seconds: f64,
        saved: Option<PathBuf>,
    },
}

/// One timed candidate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Trial {
    /// `gemm`, `gemv` or `hessian`.
    pub kernel: String,
    /// `WGXxWGYxTMxTN` (GEMM) or `WGXxWGYxBIxBJ` (Hessian).
    pub config: String,
    /// Median seconds of the timed product; `None` when the candidate was rejected.
    pub median_s: Option<f64>,
    /// Why it was rejected (wrong result, failed to build).
    pub rejected: Option<String>,
}

/// The configurations the kernels use on one adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    /// Products of at least `gemm.tm · gemm.wg_y` rows.
    pub gemm: GemmConfig,
    /// Products of one row (decode).
    pub gemv: GemmConfig,
    /// H += XᵀX.
    pub hessian: HessianConfig,
    pub origin: Origin,
    pub trials: Vec<Trial>,
}

/// The cache file's contents.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    key: String,
    gemm: String,
    gemv: String,
    #[serde(default)]
    hessian: Option<String>,
    trials: Vec<Trial>,
}

/// The numbers of a configuration written `AxBxC…` (as the configurations display).
pub(crate) fn parse_dims(s: &str) -> Option<Vec<u32>> {
    s.split('x').map(|p| p.trim().parse().ok()).collect()
}

/// GEMM candidates for an adapter class; the first is the default. `subgroup`: the adapter's
/// fixed subgroup size, if it has one (see [`super::context::Caps::fixed_subgroup`]).
pub fn gemm_candidates(
    is_cpu: bool,
    max_invocations: u32,
    subgroup: Option<u32>,
) -> Vec<GemmConfig> {
    let mut list: Vec<(u32, u32, u32, u32, bool)> = if is_cpu {
        // CPU adapters: one SIMD lane per invocation along the columns (WG_Y = 1), big
        // register blocks (every storage load is a per-lane loop on Mesa's CPU drivers, so
        // loads per FMA decide). Measured on lavapipe at 1024³ (GFLOP/s, seconds to compile
        // one variant): 8x1x16x8 16.9 / 1.7 s, 8x1x8x4 (the former tile) 8.6 / 0.4 s;
        // 8x1x16x16 and 8x1x32x8 reach 20 but take 5.5 s per variant, and a run builds
        // dozens of variants (dtypes, alignment, orientation, row counts), so they are not
        // offered without subgroups.
        vec![
            (8, 1, 16, 8, false),
            (8, 1, 12, 8, false),
            (16, 1, 16, 8, false),
            (8, 1, 8, 8, false),
            (8, 1, 8, 4, false),
        ]
    } else {
        vec![
            (16, 16, 4, 4, false),
            (16, 8, 8, 4, false),
            (16, 16, 4, 8, false),
            (8, 8, 8, 8, false),
            (32, 8, 4, 4, false),
            (8, 8, 4, 4, false),
        ]
    };
    if let (true, Some(s)) = (is_cpu, subgroup) {
        // Subgroups of one fixed size: one load of A's rows per S lanes (broadcasts for the
        // rest), so the register block can grow. Lavapipe, GFLOP/s at 512² NN / 1024² NN /
        // 256×4096·4096ᵀ (seconds to build): 8x1x32x8+sg 42.6 / 40.4 / 60.2 (0.3 s),
        // 16x1x16x8+sg 30.6 / 26.7 / 46.3, 8x1x24x8+sg 35.5 / 34.3 / 53.5; without: the best
        // 20 / 18.6 / 28.3. 16x1x32x8+sg and TN 12 or 16 build for 4–17 s: not offered.
        for (wg_x, tm, tn) in [
            (s.max(8), 32u32, 8),
            (s.max(8), 24, 8),
            (2 * s.max(8), 16, 8),
        ] {
            if wg_x.is_multiple_of(s) && tm.is_multiple_of(s) {
                list.push((wg_x, 1, tm, tn, true));
            }
        }
    }
    list.into_iter()
        .map(|(wg_x, wg_y, tm, tn, sg)| GemmConfig {
            wg_x,
            wg_y,
            tm,
            tn,
            sg,
        })
        .filter(|c| c.wg_x * c.wg_y <= max_invocations)
        .collect()
}

/// One-row (decode) candidates; the first is the default. `subgroup` as for
/// [`gemm_candidates`].
pub fn gemv_candidates(
    is_cpu: bool,
    max_invocations: u32,
    subgroup: Option<u32>,
) -> Vec<GemmConfig> {
    let mut list: Vec<(u32, u32, bool)> = if is_cpu {
        // Measured on lavapipe at 1×4096·4096ᵀ: 32x1x1x8 and 64x1x1x4 3.9 GFLOP/s, the
        // former one-row configuration (64 invocations, TN 4) the same.
        vec![
            (64, 4, false),
            (32, 8, false),
            (128, 4, false),
            (32, 4, false),
        ]
    } else {
        vec![
            (64, 4, false),
            (128, 4, false),
            (256, 4, false),
            (64, 8, false),
            (32, 4, false),
        ]
    };
    if let (true, Some(s)) = (is_cpu, subgroup) {
        // The contraction shared across a subgroup (each lane loads 4 of every 4·S values of
        // the row, the others take them by broadcast): on lavapipe 5.5–5.8 GFLOP/s at
        // 1×4096·4096ᵀ against 4.4–4.7 for the same shapes without.
        for (wg_x, tn) in [(16u32, 4), (32, 4), (8, 4)] {
            if wg_x.is_multiple_of(s) {
                list.push((wg_x, tn, true));
            }
        }
    }
    list.into_iter()
        .map(|(wg_x, tn, sg)| GemmConfig {
            wg_x: wg_x.min(max_invocations),
            wg_y: 1,
            tm: 1,
            tn,
            sg,
        })
        .collect()
}

/// Hessian-accumulation candidates for an adapter class; the first is the default.
pub fn hessian_candidates(is_cpu: bool, max_invocations: u32) -> Vec<HessianConfig> {
    let list: &[(u32, u32, u32, u32)] = if is_cpu {
        // Measured on lavapipe at 1024 features (seconds per 1024 rows / to compile one
        // variant): 16×8 blocks 0.139 / 3.5 s, 8×8 0.174 / 1.1 s, 4×4 in 8×8 workgroups (the
        // former kernel) 0.336 / 0.3 s; 16×16 0.116 but 13 s to compile, not offered.
        &[(8, 1, 4, 2), (8, 1, 2, 2), (8, 1, 2, 4), (8, 8, 1, 1)]
    } else {
        &[
            (16, 16, 1, 1),
            (8, 8, 2, 2),
            (16, 8, 2, 1),
            (8, 8, 1, 1),
            (32, 8, 1, 1),
        ]
    };
    list.iter()
        .map(|&(wg_x, wg_y, bi, bj)| HessianConfig { wg_x, wg_y, bi, bj })
        .filter(|c| c.wg_x * c.wg_y <= max_invocations)
        .collect()
}

/// The user's cache directory for pumice: `PUMICE_CACHE_DIR`, else `$XDG_CACHE_HOME/pumice`,
/// else the platform's (`~/.cache`, `~/Library/Caches`, `%LOCALAPPDATA%`) + `pumice`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |n: &str| {
        std::env::var_os(n)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("PUMICE_CACHE_DIR") {
        return Some(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(d.join("pumice"));
    }
    if cfg!(windows) {
        return var("LOCALAPPDATA").map(|d| d.join("pumice"));
    }
    let home = var("HOME")?;
    Some(if cfg!(target_os = "macos") {
        home.join("Library/Caches/pumice")
    } else {
        home.join(".cache/pumice")
    })
}

/// What identifies an adapter's tuning: adapter, backend, driver, and the kernel sources and
/// candidate lists (so a change to either re-tunes).
fn cache_key(gpu: &Gpu) -> String {
    let r = gpu.report();
    let c = gpu.caps();
    let kernels = format!(
        "{}|{}|{:?}|{:?}|{:?}",
        super::gemm::KERNEL_SOURCE,
        super::hessian::KERNEL_SOURCE,
        gemm_candidates(c.is_cpu, c.max_invocations, c.fixed_subgroup()),
        gemv_candidates(c.is_cpu, c.max_invocations, c.fixed_subgroup()),
        hessian_candidates(c.is_cpu, c.max_invocations)
    );
    format!(
        "{}|{}|{}|{}|{}|{:04x}:{:04x}|kernels {:016x}",
        r.name,
        r.backend,
        r.device_type,
        r.driver,
        r.driver_info,
        r.vendor_id,
        r.device_id,
        fnv(&kernels)
    )
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The tuning for `gpu` under `mode`, with `dir` as the cache directory (none: measure and
/// keep in memory only). Never fails: see the module doc.
pub fn tune(gpu: &Gpu, mode: TuneMode, dir: Option<&Path>) -> Tuning {
    let caps = gpu.caps();
    let defaults = Tuning {
        gemm: gemm_candidates(caps.is_cpu, caps.max_invocations, caps.fixed_subgroup())[0],
        gemv: gemv_candidates(caps.is_cpu, caps.max_invocations, caps.fixed_subgroup())[0],
        hessian: hessian_candidates(caps.is_cpu, caps.max_invocations)[0],
        origin: Origin::Defaults,
        trials: Vec::new(),
    };
    if mode == TuneMode::Off {
        return defaults;
    }
    let key = cache_key(gpu);
    let path = dir.map(|d| d.join("tuning").join(format!("{:016x}.json", fnv(&key))));
    if mode == TuneMode::Auto {
        if let Some(p) = &path {
            match read_cache(p, &key) {
                Ok(Some(t)) => return t,
                Ok(None) => {}
                Err(e) => tracing::warn!("ignoring the kernel tuning cache: {e}"),
            }
        }
    }
    tracing::info!(
        "tuning kernels for {} (once per adapter and driver)",
        gpu.describe()
    );
    let start = Instant::now();
    let measured = (|| -> Result<Tuning> {
        let mut trials = Vec::new();
        let big = if caps.is_cpu {
            (256, 1024, 1024)
        } else {
            (2048, 4096, 4096)
        };
        let gemm = pick(
            gpu,
            "gemm",
            &gemm_candidates(caps.is_cpu, caps.max_invocations, caps.fixed_subgroup()),
            big,
            &mut trials,
        )?;
        let gemv = pick(
            gpu,
            "gemv",
            &gemv_candidates(caps.is_cpu, caps.max_invocations, caps.fixed_subgroup()),
            (1, 4096, 4096),
            &mut trials,
        )?;
        let hessian = pick_hessian(
            gpu,
            &hessian_candidates(caps.is_cpu, caps.max_invocations),
            if caps.is_cpu {
                (2048, 512)
            } else {
                (16384, 2048)
            },
            &mut trials,
        )?;
        Ok(Tuning {
            gemm,
            gemv,
            hessian,
            origin: Origin::Defaults,
            trials,
        })
    })();
    let mut t = match measured {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("kernel tuning failed ({e}); using the defaults");
            return defaults;
        }
    };
    let saved = path.and_then(|p| match write_cache(&p, &key, &t) {
        Ok(()) => Some(p),
        Err(e) => {
            tracing::warn!("could not save the kernel tuning: {e}");
            None
        }
    });
    t.origin = Origin::Measured {
        seconds: start.elapsed().as_secs_f64(),
        saved,
    };
    tracing::info!(
        "tuned: gemm {}, gemv {}, hessian {} ({:.1} s)",
        t.gemm,
        t.gemv,
        t.hessian,
        start.elapsed().as_secs_f64()
    );
    t
}

/// Whether `gpu`'s tuning would be measured now (no valid cache file, tuning not off): callers
/// that want to say so before the wait ask first.
pub fn will_measure(gpu: &Gpu, mode: TuneMode) -> bool {
    match mode {
        TuneMode::Off => false,
        TuneMode::Again => true,
        TuneMode::Auto => {
            let key = cache_key(gpu);
            match cache_dir() {
                Some(d) => {
                    let p = d.join("tuning").join(format!("{:016x}.json", fnv(&key)));
                    !matches!(read_cache(&p, &key), Ok(Some(_)))
                }
                None => true,
            }
        }
    }
}

/// The tuning of `gpu` for this process: tuned (or read from the cache) once per adapter key,
/// whatever number of `Gpu`s open it.
pub(crate) fn for_process(gpu: &Gpu, mode: TuneMode) -> Tuning {
    static MEMO: OnceLock<Mutex<HashMap<String, Tuning>>> = OnceLock::new();
    let key = format!("{:?}|{}", mode, cache_key(gpu));
    let memo = MEMO.get_or_init(Default::default);
    if let Some(t) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return t.clone();
    }
    let t = tune(gpu, mode, cache_dir().as_deref());
    memo.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, t.clone());
    t
}

fn read_cache(path: &Path, key: &str) -> Result<Option<Tuning>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let bad = |why: String| Error::input(path, why);
    let f: CacheFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if f.key != key {
        return Ok(None);
    }
    let parse = |s: &str| GemmConfig::parse(s).ok_or_else(|| bad(format!("configuration `{s}`")));
    let Some(hessian) = f.hessian else {
        return Ok(None);
    };
    Ok(Some(Tuning {
        gemm: parse(&f.gemm)?,
        gemv: parse(&f.gemv)?,
        hessian: HessianConfig::parse(&hessian)
            .ok_or_else(|| bad(format!("configuration `{hessian}`")))?,
        origin: Origin::Cached(path.to_path_buf()),
        trials: f.trials,
    }))
}

fn write_cache(path: &Path, key: &str, t: &Tuning) -> Result<()> {
    let f = CacheFile {
        key: key.to_string(),
        gemm: t.gemm.to_string(),
        gemv: t.gemv.to_string(),
        hessian: Some(t.hessian.to_string()),
        trials: t.trials.clone(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Unique per process: tests and parallel jobs may tune the same adapter at once.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let text =
        serde_json::to_string_pretty(&f).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Check and time every candidate (`measure` returns its median seconds, or why it was
/// rejected), record each as a trial, and return the fastest.
fn choose<C: Copy + std::fmt::Display>(
    gpu: &Gpu,
    kernel: &str,
    candidates: &[C],
    trials: &mut Vec<Trial>,
    mut measure: impl FnMut(C) -> Result<f64>,
) -> Result<C> {
    let mut best: Option<(f64, C)> = None;
    for &cfg in candidates {
        let mut trial = Trial {
            kernel: kernel.into(),
            config: cfg.to_string(),
            median_s: None,
            rejected: None,
        };
        match measure(cfg) {
            Ok(s) => {
                trial.median_s = Some(s);
                if best.as_ref().is_none_or(|(b, _)| s < *b) {
                    best = Some((s, cfg));
                }
            }
            Err(e) => {
                tracing::warn!(
                    "{kernel} configuration {cfg} rejected on {}: {e}",
                    gpu.describe()
                );
                trial.rejected = Some(e.to_string());
            }
        }
        trials.push(trial);
    }
    best.map(|(_, c)| c).ok_or_else(|| Error::Gpu {
        op: format!("{kernel} tuning"),
        msg: "every configuration was rejected".into(),
    })
}

/// Median wall seconds of five runs of `record` (one submission, waited for) after a warm-up.
fn median_time(gpu: &Gpu, mut record: impl FnMut(&mut Batch<'_>) -> Result<()>) -> Result<f64> {
    let mut run = || -> Result<f64> {
        let t = Instant::now();
        let mut b = Batch::new(gpu);
        record(&mut b)?;
        b.submit()?;
        gpu.wait()?;
        Ok(t.elapsed().as_secs_f64())
    };
    run()?;
    let mut v = [run()?, run()?, run()?, run()?, run()?];
    v.sort_by(f64::total_cmp);
    Ok(v[2])
}

/// The fastest GEMM candidate that computes a small awkward product right, timed on an
/// `(m, k, n)` NT product.
fn pick(
    gpu: &Gpu,
    kernel: &str,
    candidates: &[GemmConfig],
    (m, k, n): (usize, usize, usize),
    trials: &mut Vec<Trial>,
) -> Result<GemmConfig> {
    let a = GpuMatrix::from_f32(gpu, m, k, DType::F32, &pattern(m * k, 1))?;
    let b = GpuMatrix::from_f32(gpu, n, k, DType::F32, &pattern(n * k, 2))?;
    let c = GpuMatrix::uninit(gpu, m, n)?;
    choose(gpu, kernel, candidates, trials, |cfg| {
        check(gpu, cfg)?;
        median_time(gpu, |batch| {
            gemm_with_config(batch, &a, 0..m, &b, GemmOp::NT, &c, 0, 0, false, cfg)
        })
    })
}

/// The fastest Hessian candidate that accumulates a small X right, timed accumulating
/// `rows` × `features`.
fn pick_hessian(
    gpu: &Gpu,
    candidates: &[HessianConfig],
    (rows, features): (usize, usize),
    trials: &mut Vec<Trial>,
) -> Result<HessianConfig> {
    let x = GpuMatrix::from_f32(
        gpu,
        rows,
        features,
        DType::F32,
        &pattern(rows * features, 5),
    )?;
    choose(gpu, "hessian", candidates, trials, |cfg| {
        check_hessian(gpu, cfg)?;
        let mut acc = HessianAccumulator::new(gpu, features)?;
        median_time(gpu, |batch| acc.accumulate_with(batch, &x, cfg))
    })
}

fn check_hessian(gpu: &Gpu, cfg: HessianConfig) -> Result<()> {
    let (t, f) = (37usize, 45usize);
    let x = pattern(t * f, 6);
    let mut acc = HessianAccumulator::new(gpu, f)?;
    let xm = GpuMatrix::from_f32(gpu, t, f, DType::F32, &x)?;
    let mut b = Batch::new(gpu);
    acc.accumulate_with(&mut b, &xm, cfg)?;
    b.submit()?;
    let h = acc.read(gpu)?;
    for i in 0..f {
        for j in 0..f {
            let want: f64 = (0..t)
                .map(|r| x[r * f + i] as f64 * x[r * f + j] as f64)
                .sum();
            let scale: f64 = (0..t)
                .map(|r| (x[r * f + i] as f64 * x[r * f + j] as f64).abs())
                .sum();
            if (h[i * f + j] - want).abs() > 1e-5 * scale.max(1.0) {
                return Err(Error::Gpu {
                    op: format!("hessian with {cfg}"),
                    msg: format!("H[{i},{j}] = {} where f64 gives {want}", h[i * f + j]),
                });
            }
        }
    }
    Ok(())
}

/// A 37×61·(29×61)ᵀ and a 37×61·(61×29) product against f64: the candidate computes
/// what the kernel means on this driver.
fn check(gpu: &Gpu, cfg: GemmConfig) -> Result<()> {
    let (m, k, n) = (37usize, 61usize, 29usize);
    let x = pattern(m * k, 3);
    let w = pattern(n * k, 4);
    let a = GpuMatrix::from_f32(gpu, m, k, DType::F32, &x)?;
    for op in [GemmOp::NT, GemmOp::NN] {
        let b = match op {
            GemmOp::NT => GpuMatrix::from_f32(gpu, n, k, DType::F32, &w)?,
            GemmOp::NN => GpuMatrix::from_f32(gpu, k, n, DType::F32, &w)?,
        };
        let c = GpuMatrix::uninit(gpu, m, n)?;
        let mut batch = Batch::new(gpu);
        gemm_with_config(&mut batch, &a, 0..m, &b, op, &c, 0, 0, false, cfg)?;
        batch.submit()?;
        let got = c.to_f32(gpu)?;
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|t| {
                        let bv = match op {
                            GemmOp::NT => w[j * k + t],
                            GemmOp::NN => w[t * n + j],
                        };
                        x[i * k + t] as f64 * bv as f64
                    })
                    .sum();
                let scale: f64 = (0..k).map(|t| (x[i * k + t] as f64).abs()).sum::<f64>();
                if (got[i * n + j] as f64 - want).abs() > 1e-5 * scale.max(1.0) {
                    return Err(Error::Gpu {
                        op: format!("gemm {op:?} with {cfg}"),
                        msg: format!("C[{i},{j}] = {} where f64 gives {want}", got[i * n + j]),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Deterministic values in [-1, 1) from the crate's seeded generator.
fn pattern(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::base::rng::Rng::new(seed);
    (0..len)
        .map(|_| (2.0 * rng.uniform() - 1.0) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_candidates_fit_the_adapter() {
        assert_eq!("OFF".parse::<TuneMode>().unwrap(), TuneMode::Off);
        assert_eq!("again".parse::<TuneMode>().unwrap(), TuneMode::Again);
        assert!("sometimes".parse::<TuneMode>().is_err());
        for cpu in [true, false] {
            for c in gemm_candidates(cpu, 128, Some(8))
                .into_iter()
                .chain(gemv_candidates(cpu, 128, Some(8)))
            {
                assert!(c.wg_x * c.wg_y <= 128, "{c}");
                assert_eq!(GemmConfig::parse(&c.to_string()), Some(c));
            }
            for c in hessian_candidates(cpu, 128) {
                assert!(c.wg_x * c.wg_y <= 128, "{c}");
                assert_eq!(HessianConfig::parse(&c.to_string()), Some(c));
            }
        }
        assert!(!gemm_candidates(false, 64, None).is_empty());
        assert!(gemm_candidates(true, 128, Some(8)).iter().any(|c| c.sg));
        assert!(gemm_candidates(true, 128, Some(4)).iter().any(|c| c.sg));
        assert!(!gemm_candidates(true, 128, None).iter().any(|c| c.sg));
        assert!(gemv_candidates(true, 128, Some(8)).iter().any(|c| c.sg));
    }
}
