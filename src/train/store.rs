//! How a trainable CALDERA factor pair is stored: the factor grid (asymmetric RTN with the
//! clip search, per row of Lᵀ and of R) and the randomized-Hadamard rotation of its weight.
//! The output quantizes with it, and quantization-aware training rounds through it after
//! every step, so what is trained is what is written.

use crate::lowrank::caldera::quantize_factors;
use crate::model::compressed::RhtSeeds;
use crate::quant::rht::{self, Rht};
use crate::quant::{Grid, Quantized};

#[derive(Clone, Copy, Debug)]
pub struct FactorStore {
    pub grid: Grid,
    pub rht: Option<RhtSeeds>,
    /// The weight's rows (L's) and columns (R's).
    pub rows: usize,
    pub cols: usize,
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
        quantize_factors(&lt, &rr, k, m, n, self.grid)
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
