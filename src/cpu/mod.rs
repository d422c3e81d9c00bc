//! CPU references (f64) for every GPU kernel, and CPU baselines for benchmarks.
//!
//! The references are deliberately plain loops in f64: they define what the kernels must
//! compute. The baselines use faer, an optimized BLAS-class library, so benchmark ratios are
//! against a strong CPU implementation.

/// `A · B` (or `A · Bᵀ` when `b_transposed`) in f64. A is [m, k]; B is [k, n] or [n, k].
pub fn gemm_f64(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, b_transposed: bool) -> Vec<f64> {
    assert_eq!(a.len(), m * k, "A has the wrong length");
    assert_eq!(b.len(), k * n, "B has the wrong length");
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        let ai = &a[i * k..(i + 1) * k];
        let ci = &mut c[i * n..(i + 1) * n];
        if b_transposed {
            for (j, cij) in ci.iter_mut().enumerate() {
                let bj = &b[j * k..(j + 1) * k];
                *cij = ai.iter().zip(bj).map(|(&x, &y)| x as f64 * y as f64).sum();
            }
        } else {
            for (kk, &x) in ai.iter().enumerate() {
                let bk = &b[kk * n..(kk + 1) * n];
                for (cij, &y) in ci.iter_mut().zip(bk) {
                    *cij += x as f64 * y as f64;
                }
            }
        }
    }
    c
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

/// CPU baseline with faer: `C = A · op(B)` in f32 on all cores. Returns C row-major.
pub fn gemm_faer(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, b_transposed: bool) -> Vec<f32> {
    use faer::{Accum, MatRef, Par};
    let a = MatRef::from_row_major_slice(a, m, k);
    let b_mat = if b_transposed {
        MatRef::from_row_major_slice(b, n, k).transpose()
    } else {
        MatRef::from_row_major_slice(b, k, n)
    };
    let mut c = faer::Mat::<f32>::zeros(m, n);
    faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a, b_mat, 1.0f32, Par::rayon(0));
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = c[(i, j)];
        }
    }
    out
}

/// CPU baseline with faer: `XᵀX` (f32, all cores), full matrix, row-major.
pub fn hessian_faer(x: &[f32], rows: usize, f: usize) -> Vec<f32> {
    gemm_faer_tn(x, rows, f)
}

fn gemm_faer_tn(x: &[f32], rows: usize, f: usize) -> Vec<f32> {
    use faer::{Accum, MatRef, Par};
    let xm = MatRef::from_row_major_slice(x, rows, f);
    let mut h = faer::Mat::<f32>::zeros(f, f);
    faer::linalg::matmul::matmul(h.as_mut(), Accum::Replace, xm.transpose(), xm, 1.0f32, Par::rayon(0));
    let mut out = vec![0.0f32; f * f];
    for i in 0..f {
        for j in 0..f {
            out[i * f + j] = h[(i, j)];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_agree_with_faer() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for bt in [false, true] {
            let r = gemm_f64(&a, &b, m, k, n, bt);
            let f = gemm_faer(&a, &b, m, k, n, bt);
            for (x, y) in r.iter().zip(&f) {
                assert!((x - *y as f64).abs() < 1e-5);
            }
        }
        let h = hessian_f64(&a, m, k);
        let hf = hessian_faer(&a, m, k);
        for (x, y) in h.iter().zip(&hf) {
            assert!((x - *y as f64).abs() < 1e-5);
        }
    }
}
