//! Randomized Hadamard transforms for incoherence processing, for any dimension.
//!
//! T_n = (H_{2^a} ⊗ B_k) · diag(s) / √(2^a) where n = 2^a · k with k odd, H the Walsh–Hadamard
//! matrix, B_k a random k × k orthogonal block (no Hadamard matrix of odd order > 1 exists; QuIP#
//! and the methods digest allow an orthogonal block as the fallback) and s random signs. T_n is
//! orthogonal and fully determined by (n, seed), so a checkpoint stores only the seed.
//!
//! With W_r = T_m W T_nᵀ and H_r = T_n H T_nᵀ the weighted loss tr(ΔW H ΔWᵀ) is unchanged, while
//! the rotated W and H are incoherent: no column or weight stands out, which is what low-bit
//! grids need. Index layout: element i = p·k + q with p < 2^a (Hadamard index) and q < k (block
//! index).

use crate::base::rng::Rng;

/// An orthogonal transform of size n.
#[derive(Clone, Debug)]
pub struct Rht {
    pub n: usize,
    pub seed: u64,
    pow2: usize,
    k: usize,
    signs: Vec<f64>,
    /// k × k orthogonal block, row-major.
    block: Vec<f64>,
}

/// In-place unnormalized fast Walsh–Hadamard transform over `len` (a power of two) entries
/// spaced `stride` apart starting at `base`.
fn fwht(x: &mut [f64], base: usize, len: usize, stride: usize) {
    let mut h = 1;
    while h < len {
        for i in (0..len).step_by(2 * h) {
            for j in i..i + h {
                let a = x[base + j * stride];
                let b = x[base + (j + h) * stride];
                x[base + j * stride] = a + b;
                x[base + (j + h) * stride] = a - b;
            }
        }
        h *= 2;
    }
}

impl Rht {
    pub fn new(n: usize, seed: u64) -> Rht {
        let n = n.max(1);
        let pow2 = 1usize << n.trailing_zeros();
        let k = n / pow2;
        let mut rng = Rng::new(seed ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let signs = (0..n)
            .map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 })
            .collect();
        let block = if k == 1 {
            vec![1.0]
        } else {
            let g = crate::base::rng::gaussian(k * k, seed ^ 0xB10C ^ k as u64);
            let a = faer::Mat::<f64>::from_fn(k, k, |i, j| g[i * k + j] as f64);
            let q = a.qr().compute_thin_Q();
            (0..k * k).map(|idx| q[(idx / k, idx % k)]).collect()
        };
        Rht {
            n,
            seed,
            pow2,
            k,
            signs,
            block,
        }
    }

    /// The odd block size k (1 for powers of two).
    pub fn block_size(&self) -> usize {
        self.k
    }

    /// x ← T x.
    pub fn apply(&self, x: &mut [f64]) {
        debug_assert_eq!(x.len(), self.n);
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s;
        }
        self.mix_blocks(x, false);
        let norm = 1.0 / (self.pow2 as f64).sqrt();
        for q in 0..self.k {
            fwht(x, q, self.pow2, self.k);
        }
        x.iter_mut().for_each(|v| *v *= norm);
    }

    /// x ← Tᵀ x (the inverse).
    pub fn apply_transpose(&self, x: &mut [f64]) {
        debug_assert_eq!(x.len(), self.n);
        let norm = 1.0 / (self.pow2 as f64).sqrt();
        for q in 0..self.k {
            fwht(x, q, self.pow2, self.k);
        }
        x.iter_mut().for_each(|v| *v *= norm);
        self.mix_blocks(x, true);
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s;
        }
    }

    /// Apply B (or Bᵀ) to each group of k consecutive entries.
    fn mix_blocks(&self, x: &mut [f64], transpose: bool) {
        if self.k == 1 {
            return;
        }
        let k = self.k;
        let mut tmp = vec![0.0; k];
        for p in 0..self.pow2 {
            let g = &mut x[p * k..(p + 1) * k];
            for (i, t) in tmp.iter_mut().enumerate() {
                *t = (0..k)
                    .map(|j| if transpose { self.block[j * k + i] } else { self.block[i * k + j] } * g[j])
                    .sum();
            }
            g.copy_from_slice(&tmp);
        }
    }
}

/// Apply `t` (or its transpose) to every row of a row-major rows × t.n matrix.
pub fn rows(a: &mut [f64], t: &Rht, transpose: bool) {
    for r in a.chunks_mut(t.n) {
        if transpose {
            t.apply_transpose(r)
        } else {
            t.apply(r)
        }
    }
}

/// Apply `t` (or its transpose) to every column of a row-major t.n × cols matrix.
pub fn cols(a: &mut [f64], cols_n: usize, t: &Rht, transpose: bool) {
    let mut col = vec![0.0; t.n];
    for c in 0..cols_n {
        for (i, v) in col.iter_mut().enumerate() {
            *v = a[i * cols_n + c];
        }
        if transpose {
            t.apply_transpose(&mut col)
        } else {
            t.apply(&mut col)
        }
        for (i, v) in col.iter().enumerate() {
            a[i * cols_n + c] = *v;
        }
    }
}

/// W_r = T_m W T_nᵀ for W m × n.
pub fn rotate_weight(w: &[f32], m: usize, n: usize, tm: &Rht, tn: &Rht) -> Vec<f32> {
    debug_assert_eq!(w.len(), m * n);
    let mut a: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    rows(&mut a, tn, false);
    cols(&mut a, n, tm, false);
    a.into_iter().map(|v| v as f32).collect()
}

/// W = T_mᵀ W_r T_n (undo [`rotate_weight`]).
pub fn unrotate_weight(wr: &[f32], m: usize, n: usize, tm: &Rht, tn: &Rht) -> Vec<f32> {
    debug_assert_eq!(wr.len(), m * n);
    let mut a: Vec<f64> = wr.iter().map(|&v| v as f64).collect();
    cols(&mut a, n, tm, true);
    rows(&mut a, tn, true);
    a.into_iter().map(|v| v as f32).collect()
}

/// H_r = T_n H T_nᵀ.
pub fn rotate_hessian(h: &[f64], n: usize, tn: &Rht) -> Vec<f64> {
    let mut a = h.to_vec();
    rows(&mut a, tn, false);
    cols(&mut a, n, tn, false);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::reference::weighted_error;
    use crate::quant::test_values as lcg;

    #[test]
    fn orthogonal_for_awkward_sizes() {
        for n in [1usize, 2, 3, 12, 64, 192, 172, 43] {
            let t = Rht::new(n, 5);
            assert_eq!(t.pow2 * t.block_size(), n);
            // T Tᵀ = I column by column, and Tᵀ inverts T.
            for i in 0..n {
                let mut e = vec![0.0; n];
                e[i] = 1.0;
                let x = e.clone();
                t.apply(&mut e);
                let norm: f64 = e.iter().map(|v| v * v).sum();
                assert!((norm - 1.0).abs() < 1e-12, "n {n}: |T e{i}|² = {norm}");
                t.apply_transpose(&mut e);
                for (a, b) in e.iter().zip(&x) {
                    assert!((a - b).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn weighted_loss_is_invariant_and_outliers_spread() {
        let (m, n) = (24, 48);
        let mut w = lcg(m * n, 1);
        for r in 0..m {
            w[r * n + 7] *= 30.0; // an outlier column
        }
        let x = lcg(200 * n, 2);
        let h = crate::quant::reference::hessian_f64(&x, 200, n);
        let wq: Vec<f32> = w.iter().map(|v| (v * 4.0).round() / 4.0).collect();
        let (tm, tn) = (Rht::new(m, 3), Rht::new(n, 4));
        let (wr, wqr, hr) = (
            rotate_weight(&w, m, n, &tm, &tn),
            rotate_weight(&wq, m, n, &tm, &tn),
            rotate_hessian(&h, n, &tn),
        );
        let (e, er) = (
            weighted_error(&w, &wq, m, &h),
            weighted_error(&wr, &wqr, m, &hr),
        );
        assert!((e - er).abs() < 1e-4 * e, "{e} vs {er}");
        let back = unrotate_weight(&wr, m, n, &tm, &tn);
        assert!(back.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1e-4));
        let peak = |v: &[f32]| {
            let rms = (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt();
            v.iter().fold(0.0f64, |a, x| a.max(x.abs() as f64)) / rms
        };
        assert!(
            peak(&wr) < 0.5 * peak(&w),
            "incoherence: {} -> {}",
            peak(&w),
            peak(&wr)
        );
    }
}
