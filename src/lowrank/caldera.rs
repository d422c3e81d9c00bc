//! CALDERA: W ≈ Q + L·R, Q quantized by LDLQ/GPTQ against H, L and R low-rank and quantized,
//! found by alternating minimization of the H-weighted error ‖(W − Q − L R) S‖²_F, S Sᵀ = H.
//!
//! Each outer iteration: (a) with A = W − Q, the best H-weighted rank-k fit [A S]_k S⁻¹ from an
//! SVD of A S (split as L = U Σ^½, R = Σ^½ Vᵀ S⁻¹), then `inner_iters` rounds of
//! L ← (A H Rᵀ)(R H Rᵀ)⁻¹, quantize L; R ← (LᵀL)⁻¹ Lᵀ A, quantize R (the unweighted solve is
//! exact for fixed L), keeping the best (L, R); (b) Q ← LDLQ(W − L R, H). The best iterate by
//! relative weighted error is kept, not the last.
//!
//! L is stored transposed (Lᵀ, k × m) so its quantization groups run along m like R's along n:
//! group scales then cost 32/group bits per factor entry whatever the rank.
//!
//! This module holds the shared math and the f64 CPU reference ([`reference`]); the GPU
//! decomposition is [`decompose`].

use super::fit::rows_of;
pub use super::fit::Placement;
use crate::error::{Error, Result};
use crate::quant::reference::{
    gptq, prepare_hessian, rtn, weighted_error, weighted_norm, PreparedHessian,
};
use crate::quant::{GptqOptions, Grid, GridKind, Quantized};

/// Parameters of one decomposition.
#[derive(Clone, Copy, Debug)]
pub struct CalderaOptions {
    pub rank: usize,
    /// Grid of the backbone Q.
    pub q_grid: Grid,
    /// Grid of L and R (groups along their long dimension).
    pub lr_grid: Grid,
    pub outer_iters: usize,
    pub inner_iters: usize,
    /// Stop after this many outer iterations in a row that lower the best relative error by
    /// less than [`PATIENCE_GAIN`] of it (0: run all `outer_iters`). The best iterate is kept
    /// either way, so stopping can only skip later improvements.
    pub patience: usize,
    /// Start each outer iteration after the first from the previous one's R instead of a new
    /// rank-k SVD of (W − Q)·S. Off by default: measured on the asset model it raises the
    /// matrices' weighted errors by about 1.6 % (KL 0.0714 → 0.0752) for 7 % less
    /// quantization time; on a 1024² Gaussian matrix it is both faster and slightly better.
    pub warm_start: bool,
    pub gptq: GptqOptions,
    /// Randomized SVD oversampling and power iterations (GPU path).
    pub oversample: usize,
    pub power_iters: usize,
    pub seed: u64,
    /// Where the low-rank step's products run (GPU path only; [`super::fit`]).
    pub placement: Placement,
}

impl CalderaOptions {
    pub fn new(rank: usize) -> CalderaOptions {
        CalderaOptions {
            rank,
            q_grid: Grid {
                bits: 2,
                group_size: 64,
                kind: GridKind::Midrise,
                clip: true,
            },
            lr_grid: Grid {
                bits: 4,
                group_size: 64,
                kind: GridKind::Asymmetric,
                clip: true,
            },
            outer_iters: 15,
            inner_iters: 10,
            patience: 0,
            warm_start: false,
            gptq: GptqOptions::default(),
            oversample: 10,
            power_iters: 2,
            seed: 0,
            placement: Placement::Auto,
        }
    }

    /// Bits stored for an m × n matrix: Q's codes and grid, Lᵀ (k × m) and R (k × n) with
    /// theirs (whole u32 words per row, f16 scales and zeros).
    pub fn stored_bits(&self, m: usize, n: usize) -> u64 {
        grid_bits(&self.q_grid, m, n)
            + grid_bits(&self.lr_grid, self.rank, m)
            + grid_bits(&self.lr_grid, self.rank, n)
    }
}

/// The relative gain in the best error an outer iteration must bring to count as progress
/// ([`CalderaOptions::patience`]).
pub const PATIENCE_GAIN: f64 = 1e-3;

/// Early stopping over outer iterations: counts iterations in a row that lower the best error
/// by less than [`PATIENCE_GAIN`] of it.
struct Patience {
    limit: usize,
    stale: usize,
    best: f64,
}

impl Patience {
    fn new(limit: usize) -> Patience {
        Patience {
            limit,
            stale: 0,
            best: f64::INFINITY,
        }
    }

    /// Record an iteration's relative error; true when the run should stop after it.
    fn record(&mut self, rel: f64) -> bool {
        let progress = !self.best.is_finite() || (self.best - rel) >= PATIENCE_GAIN * self.best;
        self.stale = if progress { 0 } else { self.stale + 1 };
        self.best = self.best.min(rel);
        self.limit > 0 && self.stale >= self.limit
    }
}

/// Bits of a rows × cols matrix quantized on `g` as stored (codes in whole u32 words per row,
/// f16 scale and zero per group).
pub fn grid_bits(g: &Grid, rows: usize, cols: usize) -> u64 {
    g.stored_bits(rows, cols)
}

/// The largest rank whose storage keeps an m × n matrix within `target_bpw` bits per weight
/// (0 when even rank 0 exceeds it).
pub fn rank_for_budget(
    q_grid: &Grid,
    lr_grid: &Grid,
    m: usize,
    n: usize,
    target_bpw: f64,
) -> usize {
    let budget = (target_bpw * (m * n) as f64).floor() as u64;
    let q = grid_bits(q_grid, m, n);
    if q > budget {
        return 0;
    }
    let mut k = 0;
    while k < m.min(n) && q + grid_bits(lr_grid, k + 1, m) + grid_bits(lr_grid, k + 1, n) <= budget
    {
        k += 1;
    }
    k
}

/// A decomposition: Q (m × n), Lᵀ (k × m), R (k × n), all quantized.
#[derive(Clone, Debug)]
pub struct Decomposition {
    pub q: Quantized,
    pub lt: Quantized,
    pub r: Quantized,
    /// tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of the kept iterate.
    pub relative_error: f64,
    /// Relative error after each outer iteration.
    pub history: Vec<f64>,
    /// Damping finally used by LDLQ.
    pub damp: f64,
}

impl Decomposition {
    pub fn rank(&self) -> usize {
        self.r.rows
    }

    /// Q + L R densified (m × n f32) — for checking, never for inference.
    pub fn dense(&self) -> Vec<f32> {
        let (m, n, k) = (self.q.rows, self.q.cols, self.r.rows);
        let mut w = self.q.dequantize();
        let lt = self.lt.dequantize();
        let r = self.r.dequantize();
        for i in 0..m {
            for t in 0..k {
                let l = lt[t * m + i];
                if l != 0.0 {
                    for j in 0..n {
                        w[i * n + j] += l * r[t * n + j];
                    }
                }
            }
        }
        w
    }
}

/// Lower Cholesky factor S of the damped H (H + λ·mean(diag H)·I = S Sᵀ) and S⁻¹, f64.
pub fn weighting(h: &[f64], n: usize, damp: f64) -> Result<(faer::Mat<f64>, faer::Mat<f64>)> {
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let mut d = damp.max(1e-6);
    for _ in 0..5 {
        let a = faer::Mat::<f64>::from_fn(n, n, |i, j| {
            h[i * n + j] + if i == j { d * mean.max(1e-30) } else { 0.0 }
        });
        if let Ok(llt) = a.llt(faer::Side::Lower) {
            let s = llt.L().to_owned();
            let mut sinv = faer::Mat::<f64>::zeros(n, n);
            faer::linalg::triangular_inverse::invert_lower_triangular(
                sinv.as_mut(),
                s.as_ref(),
                faer::Par::Seq,
            );
            return Ok((s, sinv));
        }
        d *= 10.0;
    }
    Err(Error::InvalidArgument(
        "CALDERA: the Hessian is not positive definite even with damping".into(),
    ))
}

/// Inverse of a symmetric positive semi-definite k × k matrix, with a growing ridge when it is
/// singular (a rank-deficient factor).
pub fn spd_inverse(x: &faer::Mat<f64>) -> faer::Mat<f64> {
    use faer::linalg::solvers::DenseSolveCore;
    let k = x.nrows();
    let scale = ((0..k).map(|i| x[(i, i)].abs()).sum::<f64>() / k.max(1) as f64).max(1e-30);
    let mut ridge = 0.0;
    loop {
        let a =
            faer::Mat::<f64>::from_fn(k, k, |i, j| x[(i, j)] + if i == j { ridge } else { 0.0 });
        if let Ok(c) = a.llt(faer::Side::Lower) {
            return c.inverse();
        }
        ridge = if ridge == 0.0 {
            1e-10 * scale
        } else {
            ridge * 100.0
        };
    }
}

/// A row-major rows × cols matrix in faer.
pub(super) fn mat(rows: usize, cols: usize, v: &[f64]) -> faer::Mat<f64> {
    faer::Mat::<f64>::from_fn(rows, cols, |i, j| v[i * cols + j])
}

pub(super) fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Quantize Lᵀ (k × m) and R (k × n) on their grid (RTN per row, groups along the row).
pub fn quantize_factors(
    lt: &[f64],
    r: &[f64],
    k: usize,
    m: usize,
    n: usize,
    grid: Grid,
) -> (Quantized, Quantized) {
    (rtn(&f32s(lt), k, m, grid), rtn(&f32s(r), k, n, grid))
}

/// The CPU f64 reference of the whole decomposition (exact SVD, f64 GEMMs, the f64 GPTQ).
pub fn reference(
    w: &[f32],
    m: usize,
    n: usize,
    h: &[f64],
    opts: &CalderaOptions,
) -> Result<Decomposition> {
    let k = opts.rank.min(m).min(n);
    let (s, sinv) = weighting(h, n, opts.gptq.damp)?;
    let prep: PreparedHessian = prepare_hessian(h, n, &opts.gptq)?;
    let hm = mat(n, n, h);
    let wm = mat(m, n, &w.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let norm = weighted_norm(w, m, h);
    let mut qd = faer::Mat::<f64>::zeros(m, n);
    let mut best: Option<Decomposition> = None;
    let mut history = Vec::new();
    let mut patience = Patience::new(opts.patience);
    let mut prev_r: Option<Quantized> = None;
    for _ in 0..opts.outer_iters.max(1) {
        let a = &wm - &qd;
        // (a) Low-rank fit of A in the H-weighted norm.
        let (lt_q, r_q) = if k == 0 {
            (rtn(&[], 0, m, opts.lr_grid), rtn(&[], 0, n, opts.lr_grid))
        } else {
            // L is re-solved from R at the start of every inner round.
            let mut l: faer::Mat<f64>;
            let mut r = match prev_r.as_ref().filter(|_| opts.warm_start) {
                Some(rq) => {
                    let rd = rq.dequantize();
                    faer::Mat::<f64>::from_fn(k, n, |t, j| rd[t * n + j] as f64)
                }
                None => {
                    let svd = (&a * &s)
                        .thin_svd()
                        .map_err(|e| Error::InvalidArgument(format!("SVD failed: {e:?}")))?;
                    let sig = svd.S().column_vector();
                    let rv =
                        faer::Mat::<f64>::from_fn(k, n, |t, j| svd.V()[(j, t)] * sig[t].sqrt());
                    &rv * &sinv
                }
            };
            let mut best_lr: Option<(f64, Quantized, Quantized)> = None;
            let ahat = (&a * &hm) * a.transpose();
            let c: f64 = (0..m).map(|i| ahat[(i, i)]).sum();
            for _ in 0..opts.inner_iters.max(1) {
                // L ← (A H Rᵀ)(R H Rᵀ)⁻¹, quantized.
                let ahrt = &a * (&hm * r.transpose());
                let rhrt = &r * (&hm * r.transpose());
                let inv = spd_inverse(&rhrt);
                l = &ahrt * &inv;
                let (lq, _) = quantize_factors(
                    &rows_of(l.transpose()),
                    &rows_of(r.as_ref()),
                    k,
                    m,
                    n,
                    opts.lr_grid,
                );
                let ld = lq.dequantize();
                l = faer::Mat::<f64>::from_fn(m, k, |i, t| ld[t * m + i] as f64);
                // R ← (LᵀL)⁻¹ Lᵀ A, quantized.
                let ltl = l.transpose() * &l;
                let inv = spd_inverse(&ltl);
                r = &inv * (l.transpose() * &a);
                let (ltq, rq) = quantize_factors(
                    &rows_of(l.transpose()),
                    &rows_of(r.as_ref()),
                    k,
                    m,
                    n,
                    opts.lr_grid,
                );
                let rd = rq.dequantize();
                r = faer::Mat::<f64>::from_fn(k, n, |t, j| rd[t * n + j] as f64);
                // ‖(A − L R) S‖² = c − 2 tr(L R H Aᵀ) + tr(L R H Rᵀ Lᵀ).
                let lr = &l * &r;
                let cross = (&lr * &hm) * a.transpose();
                let quad = (&lr * &hm) * lr.transpose();
                let err = c - 2.0 * (0..m).map(|i| cross[(i, i)]).sum::<f64>()
                    + (0..m).map(|i| quad[(i, i)]).sum::<f64>();
                if best_lr.as_ref().is_none_or(|(e, _, _)| err < *e) {
                    best_lr = Some((err, ltq, rq));
                }
            }
            let (_, ltq, rq) = best_lr.expect("at least one inner iteration");
            prev_r = Some(rq.clone());
            (ltq, rq)
        };
        // (b) Q ← LDLQ(W − L R, H).
        let lr = low_rank_product(&lt_q, &r_q, m, n);
        let resid: Vec<f32> = w
            .iter()
            .zip(&lr)
            .map(|(a, b)| (*a as f64 - b) as f32)
            .collect();
        let q = gptq(&resid, m, n, &prep, opts.q_grid, opts.gptq.block);
        let qv = q.dequantize();
        let approx: Vec<f32> = qv
            .iter()
            .zip(&lr)
            .map(|(a, b)| (*a as f64 + b) as f32)
            .collect();
        let rel = weighted_error(w, &approx, m, h) / norm;
        history.push(rel);
        let stop = patience.record(rel);
        if best.as_ref().is_none_or(|b| rel < b.relative_error) {
            best = Some(Decomposition {
                q: q.clone(),
                lt: lt_q,
                r: r_q,
                relative_error: rel,
                history: Vec::new(),
                damp: prep.damp,
            });
        }
        if stop {
            break;
        }
        qd = faer::Mat::<f64>::from_fn(m, n, |i, j| qv[i * n + j] as f64);
    }
    let mut b = best.expect("at least one outer iteration");
    b.history = history;
    Ok(b)
}

/// L R (m × n, f64) from quantized Lᵀ and R.
pub fn low_rank_product(lt: &Quantized, r: &Quantized, m: usize, n: usize) -> Vec<f64> {
    let k = r.rows;
    let mut out = vec![0.0f64; m * n];
    if k == 0 {
        return out;
    }
    let ltd = lt.dequantize();
    let rd = r.dequantize();
    for i in 0..m {
        for t in 0..k {
            let l = ltd[t * m + i] as f64;
            if l != 0.0 {
                let row = &rd[t * n..(t + 1) * n];
                for (o, &x) in out[i * n..(i + 1) * n].iter_mut().zip(row) {
                    *o += l * x as f64;
                }
            }
        }
    }
    out
}

/// The decomposition with the GPU's GPTQ and the low-rank step's products where
/// `opts.placement` puts them ([`super::fit`]: the GPU, or the host for small products and CPU
/// adapters); k × k solves and the factor quantization (O(k·(m+n)) work) stay on the host.
pub fn decompose(
    gpu: &crate::gpu::Gpu,
    w: &[f32],
    m: usize,
    n: usize,
    h: &[f64],
    opts: &CalderaOptions,
) -> Result<Decomposition> {
    use super::fit::{fit, GpuSpace, HostSpace, Space};

    let k = opts.rank.min(m).min(n);
    if w.len() != m * n || h.len() != n * n {
        return Err(Error::Shape(format!(
            "CALDERA: W has {} values for {m}×{n}, H {} for {n}²",
            w.len(),
            h.len()
        )));
    }
    let (s, sinv) = weighting(h, n, opts.gptq.damp)?;
    let prep = prepare_hessian(h, n, &opts.gptq)?;
    let l = (k + opts.oversample).min(m).min(n);
    let space: Box<dyn Space + '_> = if opts.placement.on_host(gpu.caps().is_cpu, m, n, l) {
        Box::new(HostSpace::new(h, &s, &sinv))
    } else {
        Box::new(GpuSpace::new(gpu, h, &s, &sinv)?)
    };
    let norm = space.quad(w, m)?;
    let mut qv = vec![0.0f32; m * n];
    let mut best: Option<Decomposition> = None;
    let mut history = Vec::new();
    let mut patience = Patience::new(opts.patience);
    let mut prev_r: Option<Quantized> = None;
    for outer in 0..opts.outer_iters.max(1) {
        let (lt_q, r_q) = if k == 0 {
            (rtn(&[], 0, m, opts.lr_grid), rtn(&[], 0, n, opts.lr_grid))
        } else {
            let a: Vec<f32> = w.iter().zip(&qv).map(|(x, q)| x - q).collect();
            let res = space.residual(&a, m)?;
            let warm = prev_r.take().filter(|_| opts.warm_start);
            let (lt_q, r_q) = fit(&*res, m, n, k, opts, outer, warm)?;
            prev_r = Some(r_q.clone());
            (lt_q, r_q)
        };
        // (b) Q ← LDLQ(W − L R, H) on the GPU.
        let lr: Vec<f32> = if k == 0 {
            vec![0.0; m * n]
        } else {
            space.low_rank(&lt_q.dequantize(), &r_q.dequantize(), k, m)?
        };
        let resid: Vec<f32> = w.iter().zip(&lr).map(|(a, b)| a - b).collect();
        let (gq, damped) = crate::gpu::quant::gptq_with_error(
            gpu,
            &resid,
            m,
            n,
            &prep,
            opts.q_grid,
            opts.gptq.block,
        )?;
        let q = gq.download(gpu)?;
        qv = q.dequantize();
        let delta: Vec<f32> = (0..m * n).map(|i| w[i] - qv[i] - lr[i]).collect();
        // tr(Δ H Δᵀ) = tr(Δ (H + λI) Δᵀ) − λ‖Δ‖², the first from GPTQ's own errors (no
        // m·n² product); with dead inputs (their diagonal was replaced) the product is formed.
        let rel = if prep.dead.is_empty() {
            let lambda = prep.damp * (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
            let d2: f64 = delta.iter().map(|&v| v as f64 * v as f64).sum();
            (damped - lambda * d2).max(0.0) / norm
        } else {
            space.quad(&delta, m)? / norm
        };
        history.push(rel);
        let stop = patience.record(rel);
        if best.as_ref().is_none_or(|b| rel < b.relative_error) {
            best = Some(Decomposition {
                q,
                lt: lt_q,
                r: r_q,
                relative_error: rel,
                history: Vec::new(),
                damp: prep.damp,
            });
        }
        if stop {
            break;
        }
    }
    let mut b = best.expect("at least one outer iteration");
    b.history = history;
    Ok(b)
}
