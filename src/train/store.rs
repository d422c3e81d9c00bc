//! How a trainable CALDERA factor pair is stored: the factor grid (asymmetric RTN with the
//! clip search, per row of Lᵀ and of R) and the randomized-Hadamard rotation of its weight.
//! The output quantizes with it, and quantization-aware training rounds through it after
//! every step, so what is trained is what is written.

use crate::lowrank::caldera::spd_inverse;
use crate::model::compressed::RhtSeeds;
use crate::quant::reference::rtn;
use crate::quant::rht::{self, Rht};
use crate::quant::{Grid, Quantized};

#[derive(Clone, Copy, Debug)]
pub struct FactorStore {
    pub grid: Grid,
    pub rht: Option<RhtSeeds>,
    /// The weight's rows (L's) and columns (R's).
    pub rows: usize,
    pub cols: usize,
    /// Re-solve L against the rounded R before rounding it (least squares).
    pub refit: bool,
}

impl FactorStore {
    /// Lᵀ (k × rows) and R (k × cols) as stored: rotated into the stored space, then
    /// quantized (`l`: rows × k, `r`: k × cols, as trained).
    pub fn quantize(&self, l: &[f32], r: &[f32], k: usize) -> (Quantized, Quantized) {
        let (m, n) = (self.rows, self.cols);
        let mut lt = vec![0.0f64; k * m];
        for i in 0..m {
            for t in 0..k {
                lt[t * m + i] = l[i * k + t] as f64;
            }
        }
        let mut rr: Vec<f64> = r.iter().map(|&v| v as f64).collect();
        if let Some(s) = self.rht {
            // Stored: L_r = T_m L, R_r = R T_nᵀ (the reader applies the inverse).
            rht::rows(&mut lt, &Rht::new(m, s.rows), false);
            rht::rows(&mut rr, &Rht::new(n, s.cols), false);
        }
        // R first; then (with `refit`) Lᵀ re-solved against the rounded R (least squares: the
        // L minimizing ‖L R − L' R̂‖_F, so L absorbs what rounding R lost), then rounded.
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let rq = rtn(&f32s(&rr), k, n, self.grid);
        let rhat: Vec<f64> = rq.dequantize().iter().map(|&v| v as f64).collect();
        let lt = if self.refit {
            refit_left(&lt, &rr, &rhat, k, m, n)
        } else {
            lt
        };
        let ltq = rtn(&f32s(&lt), k, m, self.grid);
        (ltq, rq)
    }

    /// The factors a reader gets back from [`quantize`](Self::quantize), in the trained
    /// layout (L: rows × k, R: k × cols).
    pub fn round_trip(&self, l: &[f32], r: &[f32], k: usize) -> (Vec<f32>, Vec<f32>) {
        let (m, n) = (self.rows, self.cols);
        let (ltq, rq) = self.quantize(l, r, k);
        let mut lt: Vec<f64> = ltq.dequantize().iter().map(|&v| v as f64).collect();
        let mut rr: Vec<f64> = rq.dequantize().iter().map(|&v| v as f64).collect();
        if let Some(s) = self.rht {
            rht::rows(&mut lt, &Rht::new(m, s.rows), true);
            rht::rows(&mut rr, &Rht::new(n, s.cols), true);
        }
        let mut lo = vec![0.0f32; m * k];
        for i in 0..m {
            for t in 0..k {
                lo[i * k + t] = lt[t * m + i] as f32;
            }
        }
        (lo, rr.into_iter().map(|v| v as f32).collect())
    }
}

/// Lᵀ' (k × m) = (R̂ R̂ᵀ)⁻¹ R̂ Rᵀ Lᵀ: the left factor that, with R̂ (k × n) in place of R, comes
/// closest to L·R in the Frobenius norm.
fn refit_left(lt: &[f64], r: &[f64], rhat: &[f64], k: usize, m: usize, n: usize) -> Vec<f64> {
    if k == 0 {
        return Vec::new();
    }
    let dot = |a: &[f64], i: usize, b: &[f64], j: usize| {
        a[i * n..(i + 1) * n]
            .iter()
            .zip(&b[j * n..(j + 1) * n])
            .map(|(x, y)| x * y)
            .sum::<f64>()
    };
    let g = faer::Mat::<f64>::from_fn(k, k, |i, j| dot(rhat, i, rhat, j));
    let c = faer::Mat::<f64>::from_fn(k, k, |i, j| dot(rhat, i, r, j));
    let t = spd_inverse(&g) * c;
    let mut out = vec![0.0f64; k * m];
    for i in 0..k {
        for j in 0..k {
            let w = t[(i, j)];
            if w != 0.0 {
                for (o, &x) in out[i * m..(i + 1) * m]
                    .iter_mut()
                    .zip(&lt[j * m..(j + 1) * m])
                {
                    *o += w * x;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GridKind;

    /// Re-solving L against the rounded R brings the stored product closer to the trained
    /// one than rounding both factors independently; with and without a rotation.
    #[test]
    fn refitting_l_after_rounding_r_reduces_the_product_error() {
        let (m, n, k) = (48, 40, 6);
        let l = crate::base::rng::gaussian(m * k, 1);
        let r = crate::base::rng::gaussian(k * n, 2);
        let grid = Grid::new(4, 0, GridKind::Asymmetric).unwrap();
        let product = |l: &[f32], r: &[f32]| -> Vec<f64> {
            let mut p = vec![0.0; m * n];
            for i in 0..m {
                for t in 0..k {
                    for j in 0..n {
                        p[i * n + j] += l[i * k + t] as f64 * r[t * n + j] as f64;
                    }
                }
            }
            p
        };
        let want = product(&l, &r);
        let err = |p: &[f64]| {
            p.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
        };
        for rht in [None, Some(RhtSeeds { rows: 3, cols: 4 })] {
            let store = FactorStore {
                grid,
                rht,
                rows: m,
                cols: n,
                refit: true,
            };
            let (lq, rq) = store.round_trip(&l, &r, k);
            // Independent rounding, for comparison (no rotation).
            let lt: Vec<f32> = (0..k * m).map(|i| l[(i % m) * k + i / m]).collect();
            let ltq = rtn(&lt, k, m, grid).dequantize();
            let lo: Vec<f32> = (0..m * k).map(|i| ltq[(i % k) * m + i / k]).collect();
            let plain = err(&product(&lo, &rtn(&r, k, n, grid).dequantize()));
            let refit = err(&product(&lq, &rq));
            assert!(refit < plain, "{rht:?}: refit {refit} vs plain {plain}");
        }
    }
}
