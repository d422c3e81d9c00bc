//! How a trainable CALDERA factor pair is stored: the factor grid (asymmetric RTN with the
//! clip search, per row of Lᵀ and of R) and the randomized-Hadamard rotation of its weight.
//! The output quantizes with it, and quantization-aware training rounds through it after
//! every step, so what is trained is what is written.

use crate::lowrank::caldera::spd_inverse;
use crate::model::compressed::RhtSeeds;
use crate::quant::reference::{gptq, prepare_hessian, rtn};
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
    /// With `refit` and `h` (the weight's input Hessian XᵀX, cols × cols, unrotated; rotated
    /// here like the weight), R is rounded by LDLQ against H instead of RTN, and the refit
    /// weighs the product's error by the inputs: L' minimizes ‖(L R − L' R̂) Xᵀ‖_F.
    pub fn quantize(
        &self,
        l: &[f32],
        r: &[f32],
        k: usize,
        h: Option<&[f64]>,
    ) -> (Quantized, Quantized) {
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
        // R first (by LDLQ when H is given); then (with `refit`) Lᵀ re-solved against the
        // rounded R (least squares: the L minimizing ‖(L R − L' R̂) Xᵀ‖_F, X = I without H,
        // so L absorbs what rounding R lost in R̂'s row space), then rounded.
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let hr = h.filter(|_| self.refit).map(|h| match self.rht {
            Some(s) => rht::rotate_hessian(h, n, &Rht::new(n, s.cols)),
            None => h.to_vec(),
        });
        let opts = crate::quant::GptqOptions::default();
        let rq = match hr.as_deref().map(|h| prepare_hessian(h, n, &opts)) {
            Some(Ok(p)) => gptq(&f32s(&rr), k, n, &p, self.grid, opts.block),
            _ => rtn(&f32s(&rr), k, n, self.grid),
        };
        let rhat: Vec<f64> = rq.dequantize().iter().map(|&v| v as f64).collect();
        let lt = if self.refit {
            refit_left(&lt, &rr, &rhat, k, m, n, hr.as_deref())
        } else {
            lt
        };
        let ltq = rtn(&f32s(&lt), k, m, self.grid);
        (ltq, rq)
    }

    /// The factors a reader gets back from [`quantize`](Self::quantize), in the trained
    /// layout (L: rows × k, R: k × cols).
    pub fn round_trip(
        &self,
        l: &[f32],
        r: &[f32],
        k: usize,
        h: Option<&[f64]>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (m, n) = (self.rows, self.cols);
        let (ltq, rq) = self.quantize(l, r, k, h);
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

/// Lᵀ' (k × m) = (R̂ H R̂ᵀ)⁻¹ R̂ H Rᵀ Lᵀ (H = I without `h`): the left factor that, with R̂
/// (k × n) in place of R, comes closest to L·R in the H-weighted norm ‖(L R − L' R̂) Xᵀ‖_F.
fn refit_left(
    lt: &[f64],
    r: &[f64],
    rhat: &[f64],
    k: usize,
    m: usize,
    n: usize,
    h: Option<&[f64]>,
) -> Vec<f64> {
    use faer::Mat;
    if k == 0 {
        return Vec::new();
    }
    let rh = Mat::<f64>::from_fn(k, n, |i, j| rhat[i * n + j]);
    let rm = Mat::<f64>::from_fn(k, n, |i, j| r[i * n + j]);
    let weighted = match h {
        Some(h) => &rh * Mat::<f64>::from_fn(n, n, |i, j| h[i * n + j]),
        None => rh.clone(),
    };
    let g = &weighted * rh.transpose();
    let c = &weighted * rm.transpose();
    let t = spd_inverse(&g) * c;
    let ltm = Mat::<f64>::from_fn(k, m, |i, j| lt[i * m + j]);
    let out = t * ltm;
    (0..k * m).map(|x| out[(x / m, x % m)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GridKind;

    fn refitting(grid: Grid, rht: Option<RhtSeeds>, m: usize, n: usize) -> FactorStore {
        FactorStore {
            grid,
            rht,
            rows: m,
            cols: n,
            refit: true,
        }
    }

    /// L·R (m × k times k × n) in f64.
    fn product(l: &[f32], r: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut p = vec![0.0; m * n];
        for i in 0..m {
            for t in 0..k {
                for j in 0..n {
                    p[i * n + j] += l[i * k + t] as f64 * r[t * n + j] as f64;
                }
            }
        }
        p
    }

    /// Re-solving L against the rounded R brings the stored product closer to the trained
    /// one than rounding both factors independently; with and without a rotation.
    #[test]
    fn refitting_l_after_rounding_r_reduces_the_product_error() {
        let (m, n, k) = (48, 40, 6);
        let l = crate::base::rng::gaussian(m * k, 1);
        let r = crate::base::rng::gaussian(k * n, 2);
        let grid = Grid::new(4, 0, GridKind::Asymmetric).unwrap();
        let product = |l: &[f32], r: &[f32]| product(l, r, m, k, n);
        let want = product(&l, &r);
        let err = |p: &[f64]| {
            p.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
        };
        for rht in [None, Some(RhtSeeds { rows: 3, cols: 4 })] {
            let store = refitting(grid, rht, m, n);
            let (lq, rq) = store.round_trip(&l, &r, k, None);
            // Independent rounding, for comparison (no rotation).
            let lt: Vec<f32> = (0..k * m).map(|i| l[(i % m) * k + i / m]).collect();
            let ltq = rtn(&lt, k, m, grid).dequantize();
            let lo: Vec<f32> = (0..m * k).map(|i| ltq[(i % k) * m + i / k]).collect();
            let plain = err(&product(&lo, &rtn(&r, k, n, grid).dequantize()));
            let refit = err(&product(&lq, &rq));
            assert!(refit < plain, "{rht:?}: refit {refit} vs plain {plain}");
        }
    }

    /// With the inputs' Hessian, R is rounded by LDLQ and L re-solved in the H-weighted norm:
    /// the product's error on the inputs, ‖(L R − L̂ R̂) Xᵀ‖_F, is smaller than without it
    /// (inputs with a few dominant, correlated directions, as activations have); with and
    /// without a rotation.
    #[test]
    fn input_hessians_weigh_the_rounding() {
        let (m, n, k, rows) = (48, 64, 6, 400);
        let l = crate::base::rng::gaussian(m * k, 3);
        let r = crate::base::rng::gaussian(k * n, 4);
        let z = crate::base::rng::gaussian(rows * n, 5);
        // X = Z·D with a decaying spectrum per feature plus a shared direction.
        let x: Vec<f32> = (0..rows * n)
            .map(|i| {
                let (row, j) = (i / n, i % n);
                z[i] * (1.0 + 8.0 / (1.0 + j as f32)) + 3.0 * z[row * n]
            })
            .collect();
        let h = crate::quant::reference::hessian_f64(&x, rows, n);
        let grid = Grid::new(4, 32, GridKind::Asymmetric)
            .unwrap()
            .with_clip(true);
        // ‖(L R − A B) Xᵀ‖² = tr(Δ H Δᵀ).
        let want = product(&l, &r, m, k, n);
        let weighted = |a: &[f32], b: &[f32]| -> f64 {
            let got = product(a, b, m, k, n);
            let d: Vec<f64> = want.iter().zip(&got).map(|(w, g)| w - g).collect();
            (0..m)
                .map(|i| {
                    let di = &d[i * n..(i + 1) * n];
                    (0..n)
                        .map(|p| di[p] * (0..n).map(|q| h[p * n + q] * di[q]).sum::<f64>())
                        .sum::<f64>()
                })
                .sum()
        };
        for rht in [None, Some(RhtSeeds { rows: 3, cols: 4 })] {
            let store = refitting(grid, rht, m, n);
            let (la, ra) = store.round_trip(&l, &r, k, None);
            let (lb, rb) = store.round_trip(&l, &r, k, Some(&h));
            let (plain, with_h) = (weighted(&la, &ra), weighted(&lb, &rb));
            assert!(
                with_h < 0.97 * plain,
                "{rht:?}: with H {with_h} vs without {plain}"
            );
        }
    }
}
