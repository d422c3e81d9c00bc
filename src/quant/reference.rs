//! CPU references: Hessian preparation (damping, dead inputs, act-order, the inverse Cholesky
//! factor), round-to-nearest and GPTQ/LDLQ in f64. The GPU quantizers are tested against these.

use crate::error::{Error, Result};

use super::grid::Grid;
use super::kquant::{KType, SUPER};
use super::sparsity::{smallest, Sparsity, PRUNED};

/// How GPTQ runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    /// Damping as a fraction of the mean diagonal of H.
    pub damp: f64,
    /// Process columns by descending H_ii (stored permutation undone at load).
    pub act_order: bool,
    /// Columns per lazy block.
    pub block: usize,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            act_order: false,
            block: 128,
        }
    }
}

/// A quantized matrix: codes in the stored column order (permuted when act-order), one
/// (scale, zero) per row and group, and the permutation.
#[derive(Clone, Debug)]
pub struct Quantized {
    pub rows: usize,
    pub cols: usize,
    pub grid: Grid,
    /// rows × cols codes, row-major, stored column order.
    pub codes: Vec<u32>,
    /// rows × groups.
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
    /// Stored column j holds original column perm[j].
    pub perm: Option<Vec<u32>>,
    /// A k grid's super-block parameters, per row and super-block
    /// [`KType::params_len`] values: d, dmin, each sub-block's sc, each one's m (empty for
    /// other grids). `scales`/`zeros` hold the effective (a, b) they imply.
    pub kparams: Vec<f32>,
}

impl Quantized {
    /// Dequantize to rows × cols f32 in the original column order.
    pub fn dequantize(&self) -> Vec<f32> {
        let (m, n) = (self.rows, self.cols);
        let g = self.grid.group_len(n);
        let ng = self.grid.groups(n);
        let mut out = vec![0.0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let gi = r * ng + j / g;
                let c = self.codes[r * n + j];
                let v = if c == PRUNED {
                    0.0
                } else {
                    self.grid.value(c, self.scales[gi], self.zeros[gi])
                };
                let col = self.perm.as_ref().map_or(j, |p| p[j] as usize);
                out[r * n + col] = v;
            }
        }
        out
    }
}

/// H prepared for GPTQ.
#[derive(Clone, Debug)]
pub struct PreparedHessian {
    pub n: usize,
    /// Upper-triangular U with (H + damp·I)⁻¹ = UᵀU, in processing (permuted) order.
    pub u: Vec<f64>,
    /// Processing order: position j handles original column perm[j].
    pub perm: Option<Vec<u32>>,
    /// Inputs never seen in calibration (H_ii = 0); their weights are zeroed.
    pub dead: Vec<usize>,
    /// Relative damping finally used (grows when the factorization fails).
    pub damp: f64,
    /// Factorization attempts that failed before one succeeded.
    pub retries: u32,
}

/// Damp, permute and factor H (n×n, row-major f64). Raises the damping tenfold on failure, up
/// to four times.
pub fn prepare_hessian(h: &[f64], n: usize, opts: &GptqOptions) -> Result<PreparedHessian> {
    if h.len() != n * n {
        return Err(Error::Shape(format!(
            "Hessian has {} entries, not {n}²",
            h.len()
        )));
    }
    if h.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(
            "the Hessian contains NaN or infinity".into(),
        ));
    }
    let mut h = h.to_vec();
    let dead: Vec<usize> = (0..n).filter(|&i| h[i * n + i] == 0.0).collect();
    for &i in &dead {
        h[i * n + i] = 1.0;
    }
    let perm: Option<Vec<u32>> = opts.act_order.then(|| {
        let mut p: Vec<u32> = (0..n as u32).collect();
        p.sort_by(|&a, &b| {
            h[b as usize * n + b as usize]
                .total_cmp(&h[a as usize * n + a as usize])
                .then(a.cmp(&b))
        });
        p
    });
    if let Some(p) = &perm {
        let mut hp = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                hp[i * n + j] = h[p[i] as usize * n + p[j] as usize];
            }
        }
        h = hp;
    }
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let mut damp = opts.damp;
    for retries in 0..5u32 {
        // J (H + λI) J, J the exchange matrix: its lower Cholesky factor L gives U = J L⁻¹ J.
        let a = faer::Mat::<f64>::from_fn(n, n, |i, j| {
            let (ri, rj) = (n - 1 - i, n - 1 - j);
            h[ri * n + rj] + if i == j { damp * mean_diag } else { 0.0 }
        });
        match a.llt(faer::Side::Lower) {
            Ok(llt) => {
                let mut linv = faer::Mat::<f64>::zeros(n, n);
                faer::linalg::triangular_inverse::invert_lower_triangular(
                    linv.as_mut(),
                    llt.L(),
                    faer::Par::Seq,
                );
                let mut u = vec![0.0; n * n];
                for i in 0..n {
                    for j in i..n {
                        u[i * n + j] = linv[(n - 1 - i, n - 1 - j)];
                    }
                }
                return Ok(PreparedHessian {
                    n,
                    u,
                    perm,
                    dead,
                    damp,
                    retries,
                });
            }
            Err(_) => {
                tracing::warn!(
                    "Cholesky of the damped Hessian failed at damping {damp}; retrying with {}",
                    damp * 10.0
                );
                damp *= 10.0;
            }
        }
    }
    Err(Error::InvalidArgument(format!(
        "the Hessian is not positive definite even with damping {damp:.3} of its mean diagonal"
    )))
}

/// Round-to-nearest quantization of W (rows × cols, row-major).
pub fn rtn(w: &[f32], rows: usize, cols: usize, grid: Grid) -> Quantized {
    let g = grid.group_len(cols);
    let ng = grid.groups(cols);
    let mut codes = vec![0u32; rows * cols];
    let mut scales = vec![0.0f32; rows * ng];
    let mut zeros = vec![0.0f32; rows * ng];
    let mut kparams = kparams_for(grid, rows, cols);
    // Parameters are fixed a span at a time (one group, or a k grid's super-block).
    let span = grid.span(cols);
    for r in 0..rows {
        for c0 in (0..cols).step_by(span) {
            let row = &w[r * cols + c0..r * cols + (c0 + span).min(cols)];
            if let Some(k) = grid.ktype() {
                let (s, z, kp) = (&mut scales, &mut zeros, &mut kparams);
                set_super(k, grid.clip, row, r, c0, cols, s, z, kp);
            } else {
                let (s, z) = grid.params(row);
                scales[r * ng + c0 / g] = s;
                zeros[r * ng + c0 / g] = z;
            }
            for (j, &x) in row.iter().enumerate() {
                let gi = r * ng + (c0 + j) / g;
                codes[r * cols + c0 + j] = grid.code(x, scales[gi], zeros[gi]);
            }
        }
    }
    Quantized {
        rows,
        cols,
        grid,
        codes,
        scales,
        zeros,
        perm: None,
        kparams,
    }
}

/// GPTQ/LDLQ in f64 (codes and grids as the GPU stores them). Columns are processed in the
/// order of `prep.perm` in lazy blocks of `block`; each group's grid is computed when its first
/// column is reached, from the group's current (error-updated) values.
pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    prep: &PreparedHessian,
    grid: Grid,
    block: usize,
) -> Quantized {
    sparse_gptq(w, rows, cols, prep, grid, block, Sparsity::Dense)
}

/// GPTQ with SparseGPT pruning (see [`super::sparsity`]): pruned weights get code
/// [`PRUNED`] and dequantize to 0. Needs the natural column order (no act-order).
pub fn sparse_gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    prep: &PreparedHessian,
    grid: Grid,
    block: usize,
    sparsity: Sparsity,
) -> Quantized {
    assert!(
        sparsity == Sparsity::Dense || prep.perm.is_none(),
        "pruning needs the natural column order"
    );
    let n = cols;
    let g = grid.group_len(n);
    let ng = grid.groups(n);
    // Working copy in processing order, dead inputs zeroed.
    let mut wk = vec![0.0f64; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let src = prep.perm.as_ref().map_or(j, |p| p[j] as usize);
            wk[r * n + j] = w[r * n + src] as f64;
        }
    }
    for &d in &prep.dead {
        let j = prep.perm.as_ref().map_or(d, |p| {
            p.iter()
                .position(|&x| x as usize == d)
                .expect("perm covers all")
        });
        for r in 0..rows {
            wk[r * n + j] = 0.0;
        }
    }
    let u = &prep.u;
    let mut codes = vec![0u32; rows * n];
    let mut scales = vec![0.0f32; rows * ng];
    let mut zeros = vec![0.0f32; rows * ng];
    let mut kparams = kparams_for(grid, rows, n);
    let block = block.max(1);
    let mut err = vec![0.0f64; rows * block];
    let mut i1 = 0;
    while i1 < n {
        let i2 = (i1 + block).min(n);
        let bw = i2 - i1;
        for r in 0..rows {
            let row = &mut wk[r * n..(r + 1) * n];
            let mut pruned = vec![false; bw];
            if let Sparsity::Unstructured(_) = sparsity {
                let scores: Vec<f64> = (i1..i2)
                    .map(|j| row[j] * row[j] / (u[j * n + j] * u[j * n + j]))
                    .collect();
                pruned = smallest(&scores, sparsity.pruned_in_block(bw));
            }
            for i in i1..i2 {
                if sparsity == Sparsity::TwoFour && i % 4 == 0 {
                    let end = (i + 4).min(n);
                    let scores: Vec<f64> = (i..end)
                        .map(|j| row[j] * row[j] / (u[j * n + j] * u[j * n + j]))
                        .collect();
                    let m = smallest(&scores, (end - i) / 2);
                    for (k, p) in m.into_iter().enumerate() {
                        if i + k < i2 {
                            pruned[i + k - i1] = p;
                        }
                    }
                }
                if let Some(k) = grid.ktype() {
                    if i % SUPER == 0 {
                        let end = (i + SUPER).min(n);
                        let vals: Vec<f32> = row[i..end].iter().map(|&v| v as f32).collect();
                        set_super(
                            k,
                            grid.clip,
                            &vals,
                            r,
                            i,
                            n,
                            &mut scales,
                            &mut zeros,
                            &mut kparams,
                        );
                    }
                } else if i % g == 0 {
                    let end = (i + g).min(n);
                    let vals: Vec<f32> = row[i..end].iter().map(|&v| v as f32).collect();
                    let (ps, pz) = grid.params(&vals);
                    scales[r * ng + i / g] = ps;
                    zeros[r * ng + i / g] = pz;
                }
                let (s, z) = (scales[r * ng + i / g], zeros[r * ng + i / g]);
                let x = row[i];
                let (q, v) = if pruned[i - i1] {
                    (PRUNED, 0.0)
                } else {
                    let q = grid.code(x as f32, s, z);
                    (q, grid.value(q, s, z) as f64)
                };
                codes[r * n + i] = q;
                let e = (x - v) / u[i * n + i];
                for j in i + 1..i2 {
                    row[j] -= e * u[i * n + j];
                }
                err[r * block + (i - i1)] = e;
            }
            // Lazy update of the columns after the block.
            for j in i2..n {
                let mut acc = 0.0;
                for k in 0..bw {
                    acc += err[r * block + k] * u[(i1 + k) * n + j];
                }
                row[j] -= acc;
            }
        }
        i1 = i2;
    }
    Quantized {
        rows,
        cols,
        grid,
        codes,
        scales,
        zeros,
        perm: prep.perm.clone(),
        kparams,
    }
}

/// Zeroed k-grid parameters for a rows × cols matrix (empty for other grids).
fn kparams_for(grid: Grid, rows: usize, cols: usize) -> Vec<f32> {
    grid.ktype().map_or(Vec::new(), |k| {
        vec![0.0; rows * cols.div_ceil(SUPER) * k.params_len()]
    })
}

/// Choose the super-block of row `r` starting at column `c0` from its values `x`; record its
/// parameters and the effective (a, b) of its sub-blocks.
#[allow(clippy::too_many_arguments)]
fn set_super(
    k: KType,
    clip: bool,
    x: &[f32],
    r: usize,
    c0: usize,
    cols: usize,
    scales: &mut [f32],
    zeros: &mut [f32],
    kparams: &mut [f32],
) {
    let p = k.choose(x, clip);
    let ng = cols.div_ceil(k.sub);
    let nsb = cols.div_ceil(SUPER);
    let base = (r * nsb + c0 / SUPER) * k.params_len();
    kparams[base..base + k.params_len()].copy_from_slice(&p.flatten());
    for j in 0..x.len().div_ceil(k.sub) {
        let (a, b) = p.effective_for(k, j);
        scales[r * ng + c0 / k.sub + j] = a;
        zeros[r * ng + c0 / k.sub + j] = b;
    }
}

/// tr(ΔW H ΔWᵀ) for ΔW = a − b (rows × n), H n×n.
pub fn weighted_error(a: &[f32], b: &[f32], rows: usize, h: &[f64]) -> f64 {
    let n = h.len().isqrt();
    let mut total = 0.0;
    let mut d = vec![0.0f64; n];
    for r in 0..rows {
        for j in 0..n {
            d[j] = a[r * n + j] as f64 - b[r * n + j] as f64;
        }
        for i in 0..n {
            if d[i] == 0.0 {
                continue;
            }
            let hi = &h[i * n..(i + 1) * n];
            total += d[i] * hi.iter().zip(&d).map(|(x, y)| x * y).sum::<f64>();
        }
    }
    total
}

/// tr(W H Wᵀ): the denominator of the relative weighted error.
pub fn weighted_norm(w: &[f32], rows: usize, h: &[f64]) -> f64 {
    let zeros = vec![0.0f32; w.len()];
    weighted_error(w, &zeros, rows, h)
}

/// `XᵀX` in f64 for X of shape [rows, f], full symmetric matrix.
pub fn hessian_f64(x: &[f32], rows: usize, f: usize) -> Vec<f64> {
    assert_eq!(x.len(), rows * f, "X has the wrong length");
    let mut h = vec![0.0f64; f * f];
    let mut row64 = vec![0.0f64; f];
    for r in 0..rows {
        for (d, &s) in row64.iter_mut().zip(&x[r * f..(r + 1) * f]) {
            *d = s as f64;
        }
        for i in 0..f {
            let xi = row64[i];
            let hi = &mut h[i * f..(i + 1) * f];
            for j in i..f {
                hi[j] += xi * row64[j];
            }
        }
    }
    for i in 0..f {
        for j in 0..i {
            h[i * f + j] = h[j * f + i];
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_values as lcg;

    fn hessian(x: &[f32], rows: usize, n: usize) -> Vec<f64> {
        hessian_f64(x, rows, n)
    }

    #[test]
    fn u_is_the_inverse_cholesky_factor() {
        let n = 9;
        let x = lcg(40 * n, 3);
        let h = hessian(&x, 40, n);
        let p = prepare_hessian(
            &h,
            n,
            &GptqOptions {
                damp: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        // UᵀU · H = I
        for i in 0..n {
            for j in 0..n {
                let mut v = 0.0;
                for k in 0..n {
                    let hinv_ik: f64 = (0..n).map(|l| p.u[l * n + i] * p.u[l * n + k]).sum();
                    v += hinv_ik * h[k * n + j];
                }
                assert!(
                    (v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8,
                    "({i},{j}) = {v}"
                );
            }
        }
    }

    #[test]
    fn gptq_beats_rtn_on_correlated_inputs() {
        let (m, n, t) = (16, 48, 400);
        // Correlated inputs: a few latent factors.
        let z = lcg(t * 4, 5);
        let mix = lcg(4 * n, 6);
        let noise = lcg(t * n, 7);
        let x: Vec<f32> = (0..t * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..4).map(|k| z[r * 4 + k] * mix[k * n + c]).sum::<f32>() + 0.05 * noise[i]
            })
            .collect();
        let h = hessian(&x, t, n);
        let w = lcg(m * n, 8);
        let grid = Grid::new(3, 0, crate::quant::GridKind::Asymmetric).unwrap();
        let rt = rtn(&w, m, n, grid).dequantize();
        for act_order in [false, true] {
            let opts = GptqOptions {
                act_order,
                block: 16,
                ..Default::default()
            };
            let p = prepare_hessian(&h, n, &opts).unwrap();
            let gq = gptq(&w, m, n, &p, grid, opts.block).dequantize();
            let (e_rtn, e_gptq) = (
                weighted_error(&w, &rt, m, &h),
                weighted_error(&w, &gq, m, &h),
            );
            assert!(
                e_gptq < 0.7 * e_rtn,
                "act_order {act_order}: gptq {e_gptq} vs rtn {e_rtn}"
            );
        }
    }

    #[test]
    fn indefinite_hessian_retries_with_more_damping() {
        let n = 4;
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            h[i * n + i] = 1.0;
        }
        h[1] = 1.5; // symmetric off-diagonal larger than the diagonal: indefinite
        h[n] = 1.5;
        let p = prepare_hessian(
            &h,
            n,
            &GptqOptions {
                damp: 0.01,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(p.retries > 0 && p.damp > 0.01);
    }
}
