//! The values a compressed matrix stands for, computed on the host: what every format that
//! stores values rather than codes (dense) or factors apart from codes (adapters) writes.
//!
//! Invariant: the same arithmetic as the reader's GPU dequantization (`shaders/quant/
//! dequant.wgsl`: scale · (code − zero) in f32, groups over stored columns, the permutation
//! applied on the way out, pruned weights 0), so the two agree bit for bit (tested).

use half::f16;

use crate::error::{Error, Result};
use crate::model::compressed::QuantEntry;
use crate::quant::grid::{packed_words, unpack};
use crate::quant::rht::{self, Rht};
use crate::quant::Grid;

use super::{CompressedMatrix, PackedMatrix};

fn f16s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl PackedMatrix {
    /// The integer codes, rows × cols in stored column order (pruned weights: None).
    pub fn codes(&self, rows: usize, cols: usize, bits: u32) -> Vec<Option<u32>> {
        let words = packed_words(self.kept, bits);
        let codes = u32s(&self.codes);
        let mw = cols.div_ceil(32);
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let row = &codes[r * words..(r + 1) * words];
            let mut k = 0;
            for j in 0..cols {
                let kept = match &self.mask {
                    Some(m) => m[r * mw + j / 32] >> (j % 32) & 1 == 1,
                    None => true,
                };
                out.push(kept.then(|| {
                    k += 1;
                    unpack(row, k - 1, bits)
                }));
            }
        }
        out
    }

    /// Scales and zero points per row and group, as f32 (the implied zero of a midrise or
    /// symmetric grid; a k grid's effective (a, b) per sub-block, value a·q − b).
    pub fn scales_zeros(&self, grid: &Grid, rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
        let scales = f16s(&self.scales);
        if let Some(k) = grid.ktype() {
            let words = u32s(self.subscales.as_deref().unwrap_or_default());
            return crate::quant::kquant::effective_stored(k, &scales, &words, rows, cols);
        }
        let zeros = match &self.zeros {
            Some(z) => f16s(z),
            None => vec![grid.implied_zero().unwrap_or(0.0); scales.len()],
        };
        (scales, zeros)
    }

    /// Dequantized values, rows × cols in the original column order, f32.
    pub fn values(&self, rows: usize, cols: usize, grid: &Grid) -> Vec<f32> {
        let codes = self.codes(rows, cols, grid.bits);
        let (scales, zeros) = self.scales_zeros(grid, rows, cols);
        let groups = grid.groups(cols);
        let g = grid.group_len(cols);
        let perm: Option<Vec<u32>> = self.perm.as_deref().map(u32s);
        let mut out = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for j in 0..cols {
                let Some(q) = codes[r * cols + j] else {
                    continue;
                };
                let gi = r * groups + j / g;
                let col = perm.as_ref().map_or(j, |p| p[j] as usize);
                out[r * cols + col] = grid.value(q, scales[gi], zeros[gi]);
            }
        }
        out
    }
}

/// Lᵀ (rank × rows) and R (rank × cols) of a CALDERA weight, dequantized to f32 (rotated
/// space when the weight has incoherence processing).
pub fn factors(e: &QuantEntry, d: &PackedMatrix) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    match (e.lr_grid()?, d.factors.as_deref()) {
        (None, _) => Ok(None),
        (Some(lg), Some((l, r))) => Ok(Some((
            l.values(e.rank, e.rows, &lg),
            r.values(e.rank, e.cols, &lg),
        ))),
        (Some(_), None) => Err(Error::Shape(
            "an entry with factors but no factor data".into(),
        )),
    }
}

impl CompressedMatrix {
    /// The backbone Q alone, dequantized (rotated space under incoherence processing).
    pub fn backbone(&self) -> Result<Vec<f32>> {
        let e = &self.entry;
        Ok(self.data.values(e.rows, e.cols, &e.grid()?))
    }

    /// The weight this matrix stands for, rows × cols f32: Q + L·R (the product and the sum in
    /// f64, rounded once), with
    /// any incoherence rotation undone (in f64).
    pub fn dense(&self) -> Result<Vec<f32>> {
        let e = &self.entry;
        let mut w = self.backbone()?;
        if let Some((lt, r)) = factors(e, &self.data)? {
            add_low_rank(&mut w, &lt, &r, e.rows, e.cols, e.rank);
        }
        if let Some(seeds) = e.rht {
            w = rht::unrotate_weight(
                &w,
                e.rows,
                e.cols,
                &Rht::new(e.rows, seeds.rows),
                &Rht::new(e.cols, seeds.cols),
            );
        }
        Ok(w)
    }
}

/// w += L·R for Lᵀ (k × m) and R (k × n), row-major: the product in f64 (faer's GEMM on all
/// cores), each sum rounded once to f32.
fn add_low_rank(w: &mut [f32], lt: &[f32], r: &[f32], m: usize, n: usize, k: usize) {
    use faer::{Accum, MatRef, Par};
    let l64: Vec<f64> = lt.iter().map(|&x| x as f64).collect();
    let r64: Vec<f64> = r.iter().map(|&x| x as f64).collect();
    // Lᵀ stored row-major (k × m) is L column-major (m × k).
    let l = MatRef::from_column_major_slice(&l64, m, k);
    let rm = MatRef::from_row_major_slice(&r64, k, n);
    let mut c = faer::Mat::<f64>::zeros(m, n);
    faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, l, rm, 1.0f64, Par::rayon(0));
    for i in 0..m {
        for (j, x) in w[i * n..(i + 1) * n].iter_mut().enumerate() {
            *x = (*x as f64 + c[(i, j)]) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    /// The faer product equals the plain f64 sum to f32 rounding, on awkward shapes.
    #[test]
    fn low_rank_sum_matches_the_plain_f64_loop() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        };
        for (m, n, k) in [(1, 1, 1), (7, 13, 3), (64, 33, 8), (37, 300, 17)] {
            let lt: Vec<f32> = (0..k * m).map(|_| rnd()).collect();
            let r: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let w0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            let mut w = w0.clone();
            super::add_low_rank(&mut w, &lt, &r, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let lr: f64 = (0..k)
                        .map(|t| lt[t * m + i] as f64 * r[t * n + j] as f64)
                        .sum();
                    let want = w0[i * n + j] as f64 + lr;
                    let got = w[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= want.abs() * 6e-8 + 1e-12,
                        "{m}x{n}x{k} ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
