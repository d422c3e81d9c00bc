//! CPU references (f64) for every GPU kernel, and CPU baselines for benchmarks.
//!
//! The references are deliberately plain loops in f64: they define what the kernels must
//! compute. The baselines use faer, an optimized BLAS-class library, so benchmark ratios are
//! against a strong CPU implementation.

/// `A · B` (or `A · Bᵀ` when `b_transposed`) in f64. A is [m, k]; B is [k, n] or [n, k].
pub fn gemm_f64(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b_transposed: bool,
) -> Vec<f64> {
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

pub use crate::quant::reference::hessian_f64;

/// CPU baseline with faer: `C = A · op(B)` in f32 on all cores. Returns C row-major.
pub fn gemm_faer(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b_transposed: bool,
) -> Vec<f32> {
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
    faer::linalg::matmul::matmul(
        h.as_mut(),
        Accum::Replace,
        xm.transpose(),
        xm,
        1.0f32,
        Par::rayon(0),
    );
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

pub mod forward;
pub mod grad;
pub mod train;

/// Reference transformer pieces in f64, matching the kernels in `gpu::ops`.
pub mod ops {
    /// RMSNorm of each row of `x` ([rows, h]) times `w`.
    pub fn rms_norm(x: &[f32], w: &[f32], h: usize, eps: f64) -> Vec<f64> {
        x.chunks(h)
            .flat_map(|row| {
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / h as f64;
                let inv = 1.0 / (ms + eps).sqrt();
                row.iter()
                    .zip(w)
                    .map(move |(&v, &g)| g as f64 * v as f64 * inv)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// RoPE (rotate_half layout) on rows of `heads · 2·half` values; `positions[r]` per row.
    pub fn rope(x: &[f32], heads: usize, inv_freq: &[f32], positions: &[u32]) -> Vec<f64> {
        let half = inv_freq.len();
        let d = 2 * half;
        let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (r, &pos) in positions.iter().enumerate() {
            for hh in 0..heads {
                let b = r * heads * d + hh * d;
                for i in 0..half {
                    let a = (pos as f32 * inv_freq[i]) as f64;
                    let (x1, x2) = (x[b + i] as f64, x[b + i + half] as f64);
                    out[b + i] = x1 * a.cos() - x2 * a.sin();
                    out[b + i + half] = x2 * a.cos() + x1 * a.sin();
                }
            }
        }
        out
    }

    /// Causal GQA attention over `nseq` sequences: q [nseq·t, heads·d], k/v [nseq·s, kv·d];
    /// query i sees keys j ≤ q_pos0 + i (and > q_pos0 + i − window when window > 0).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        nseq: usize,
        t: usize,
        s: usize,
        heads: usize,
        kv_heads: usize,
        d: usize,
        q_pos0: usize,
        window: usize,
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; nseq * t * heads * d];
        let scale = 1.0 / (d as f64).sqrt();
        for b in 0..nseq {
            for i in 0..t {
                let pos = q_pos0 + i;
                let lo = if window > 0 && pos + 1 > window {
                    pos + 1 - window
                } else {
                    0
                };
                for h in 0..heads {
                    let kh = h / (heads / kv_heads);
                    let qr = &q[(b * t + i) * heads * d + h * d..][..d];
                    let keys: Vec<usize> = (lo..=pos.min(s - 1)).collect();
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            let kr = &k[(b * s + j) * kv_heads * d + kh * d..][..d];
                            qr.iter()
                                .zip(kr)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    let o = &mut out[(b * t + i) * heads * d + h * d..][..d];
                    for (&j, sc) in keys.iter().zip(&scores) {
                        let w = (sc - m).exp() / z;
                        let vr = &v[(b * s + j) * kv_heads * d + kh * d..][..d];
                        for (od, &vv) in o.iter_mut().zip(vr) {
                            *od += w * vv as f64;
                        }
                    }
                }
            }
        }
        out
    }

    /// silu(g) · u elementwise.
    pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f64> {
        g.iter()
            .zip(u)
            .map(|(&g, &u)| {
                let g = g as f64;
                g / (1.0 + (-g).exp()) * u as f64
            })
            .collect()
    }

    /// Edge-LLM's vote of exits' logits (each rows × v, f32 or f64): per row, in f64,
    /// log max_e softmax(z_e).
    pub fn vote<T: Copy + Into<f64>>(exits: &[&[T]], v: usize) -> Vec<f64> {
        let rows = exits.first().map_or(0, |z| z.len() / v.max(1));
        let mut out = vec![f64::NEG_INFINITY; rows * v];
        for z in exits {
            for (row, o) in z.chunks(v).zip(out.chunks_mut(v)) {
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b.into()));
                let lse = m + row.iter().map(|&x| (x.into() - m).exp()).sum::<f64>().ln();
                for (oi, &x) in o.iter_mut().zip(row) {
                    *oi = oi.max(x.into() - lse);
                }
            }
        }
        out
    }

    /// Per-row (NLL of target, KL(ref ‖ z), argmax z, argmax ref) of logits rows of length v.
    pub fn logit_stats(
        z: &[f32],
        z_ref: Option<&[f32]>,
        targets: &[u32],
        v: usize,
    ) -> Vec<(f64, f64, usize, usize)> {
        let lse = |row: &[f32]| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
        };
        let argmax = |row: &[f32]| {
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            best
        };
        z.chunks(v)
            .enumerate()
            .map(|(r, row)| {
                let lz = lse(row);
                let nll = lz - row[targets[r] as usize] as f64;
                match z_ref {
                    None => (nll, 0.0, argmax(row), argmax(row)),
                    Some(zr) => {
                        let rr = &zr[r * v..(r + 1) * v];
                        let lr = lse(rr);
                        let kl = rr
                            .iter()
                            .zip(row)
                            .map(|(&a, &b)| {
                                let lp = a as f64 - lr;
                                lp.exp() * (lp - (b as f64 - lz))
                            })
                            .sum::<f64>();
                        (nll, kl, argmax(row), argmax(rr))
                    }
                }
            })
            .collect()
    }

    /// Indices of the k largest entries of each row of length v (descending; ties to the lower
    /// index).
    pub fn top_k(z: &[f32], v: usize, k: usize) -> Vec<Vec<usize>> {
        z.chunks(v)
            .map(|row| {
                let mut idx: Vec<usize> = (0..v).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                idx.truncate(k);
                idx
            })
            .collect()
    }
}
