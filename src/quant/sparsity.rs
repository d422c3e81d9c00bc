//! Hessian-aware pruning (SparseGPT) on the GPTQ machinery: which weights are pruned, and how
//! many survive per row (fixed, so stored sizes are known before compression).
//!
//! Masks are chosen inside GPTQ's column loop from the error-updated weights with SparseGPT's
//! score w_j² / U_jj² (U the upper Cholesky factor of H⁻¹; the loss of zeroing w_j alone):
//! - `2:4`: at every fourth column, of columns j..j+3 the two with the smallest scores are
//!   pruned (a tail of r < 4 columns prunes ⌊r/2⌋);
//! - unstructured `p`: at the start of every lazy block of b columns, each row prunes its
//!   ⌊p·b⌋ smallest-score weights in the block (the same count in every row, so rows keep a
//!   fixed number of weights).
//!
//! Pruned weights become exactly 0; their error (w − 0)/U_jj is fed back like a rounding error,
//! so the surviving, quantized weights compensate. A pruned weight's code is [`PRUNED`].

use crate::error::{Error, Result};

/// Code of a pruned weight in [`crate::quant::Quantized`].
pub const PRUNED: u32 = u32::MAX;

/// How a matrix is pruned.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Sparsity {
    #[default]
    Dense,
    /// Two of every four consecutive weights.
    TwoFour,
    /// This fraction of every row in every lazy block (0 < p < 1).
    Unstructured(f32),
}

impl Sparsity {
    /// `2:4`, a fraction such as `0.5`, or `0`/`none` for dense.
    pub fn parse(s: &str) -> Result<Sparsity> {
        let s = s.trim();
        if s == "2:4" {
            return Ok(Sparsity::TwoFour);
        }
        if s == "none" || s == "0" {
            return Ok(Sparsity::Dense);
        }
        match s.parse::<f32>() {
            Ok(p) if p > 0.0 && p < 1.0 => Ok(Sparsity::Unstructured(p)),
            _ => Err(Error::InvalidArgument(format!(
                "--sparsity {s}: expected 2:4 or a fraction in (0, 1)"
            ))),
        }
    }

    /// The name as stored in the manifest (`2:4`, `0.5`), None when dense.
    pub fn name(&self) -> Option<String> {
        match self {
            Sparsity::Dense => None,
            Sparsity::TwoFour => Some("2:4".into()),
            Sparsity::Unstructured(p) => Some(format!("{p}")),
        }
    }

    /// Weights pruned per row in a lazy block of `bw` columns (unstructured only).
    pub fn pruned_in_block(&self, bw: usize) -> usize {
        match self {
            Sparsity::Unstructured(p) => (*p as f64 * bw as f64).floor() as usize,
            _ => 0,
        }
    }

    /// Weights kept per row of `n` columns with lazy blocks of `block`.
    pub fn kept_per_row(&self, n: usize, block: usize) -> usize {
        match self {
            Sparsity::Dense => n,
            Sparsity::TwoFour => n - 2 * (n / 4) - (n % 4) / 2,
            Sparsity::Unstructured(_) => {
                let block = block.max(1);
                let mut pruned = 0;
                let mut i = 0;
                while i < n {
                    let bw = block.min(n - i);
                    pruned += self.pruned_in_block(bw);
                    i += bw;
                }
                n - pruned
            }
        }
    }
}

/// The `count` smallest of `scores` (ties to the lower index), as a mask over the slice.
pub fn smallest(scores: &[f64], count: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut m = vec![false; scores.len()];
    for &i in idx.iter().take(count) {
        m[i] = true;
    }
    m
}

/// The mask words (rows × ⌈n/32⌉) and the packed kept codes (rows × packed_words(kept)) of a
/// pruned matrix whose codes use [`PRUNED`](crate::quant::sparsity::PRUNED) for pruned weights.
pub fn pack_sparse(
    codes: &[u32],
    rows: usize,
    n: usize,
    bits: u32,
    kept: usize,
) -> crate::Result<(Vec<u32>, Vec<u32>)> {
    use crate::quant::grid::{pack_row, packed_words};
    let mw = n.div_ceil(32);
    let mut mask = vec![0u32; rows * mw];
    let mut packed = Vec::with_capacity(rows * packed_words(kept, bits));
    let mut row_codes = Vec::with_capacity(kept);
    for r in 0..rows {
        row_codes.clear();
        for j in 0..n {
            let c = codes[r * n + j];
            if c != PRUNED {
                mask[r * mw + j / 32] |= 1 << (j % 32);
                row_codes.push(c);
            }
        }
        if row_codes.len() != kept {
            return Err(crate::Error::Shape(format!(
                "row {r} keeps {} weights, the format expects {kept}",
                row_codes.len()
            )));
        }
        pack_row(&row_codes, bits, &mut packed);
    }
    Ok((mask, packed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_names() {
        assert_eq!(Sparsity::TwoFour.kept_per_row(130, 128), 130 - 64 - 1);
        assert_eq!(Sparsity::TwoFour.kept_per_row(8, 128), 4);
        assert_eq!(
            Sparsity::Unstructured(0.5).kept_per_row(300, 128),
            300 - 64 - 64 - 22
        );
        assert_eq!(Sparsity::Dense.kept_per_row(7, 128), 7);
        assert_eq!(Sparsity::parse("2:4").unwrap(), Sparsity::TwoFour);
        assert_eq!(
            Sparsity::parse("0.25").unwrap(),
            Sparsity::Unstructured(0.25)
        );
        assert!(Sparsity::parse("1.5").is_err() && Sparsity::parse("3:4").is_err());
        assert_eq!(
            smallest(&[3.0, 1.0, 1.0, 0.5], 2),
            vec![false, true, false, true]
        );
    }
}
