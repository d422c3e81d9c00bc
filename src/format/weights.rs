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

    /// The weight this matrix stands for, rows × cols f32: Q + L·R (the product in f64), with
    /// any incoherence rotation undone (in f64).
    pub fn dense(&self) -> Result<Vec<f32>> {
        let e = &self.entry;
        let mut w = self.backbone()?;
        if let Some((lt, r)) = factors(e, &self.data)? {
            let (m, n, k) = (e.rows, e.cols, e.rank);
            for i in 0..m {
                for j in 0..n {
                    let lr: f64 = (0..k)
                        .map(|t| lt[t * m + i] as f64 * r[t * n + j] as f64)
                        .sum();
                    w[i * n + j] = (w[i * n + j] as f64 + lr) as f32;
                }
            }
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
