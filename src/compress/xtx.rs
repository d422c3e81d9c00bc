//! The Hessian H = Σ XᵀX accumulated on the host (`--hessians-on host`, the default on a CPU
//! adapter, where faer on the same cores is several times faster than the emulated GPU's
//! kernel): f64 products of X widened in bounded blocks, the upper triangle only, mirrored at
//! the end.

/// H += XᵀX for X rows × f (f32, row-major), in f64 with faer on all cores: the host path of
/// the Hessian accumulation (`--hessians-on host`, the default on a CPU adapter). X is widened
/// in blocks of [`XTX_BLOCK`] rows, so the f64 copy stays bounded; only the upper triangle of
/// `h` is meaningful afterwards (see [`mirror_upper`]).
pub fn xtx_accumulate(h: &mut [f64], x: &[f32], rows: usize, f: usize) {
    use faer::linalg::matmul::triangular::{matmul, BlockStructure};
    use faer::{Accum, MatMut, Par};
    assert_eq!(x.len(), rows * f, "X has the wrong length");
    assert_eq!(h.len(), f * f, "H has the wrong length");
    let mut hm = MatMut::from_row_major_slice_mut(h, f, f);
    let mut wide = faer::Mat::<f64>::zeros(XTX_BLOCK.min(rows), f);
    for r0 in (0..rows).step_by(XTX_BLOCK) {
        let n = XTX_BLOCK.min(rows - r0);
        for i in 0..n {
            let src = &x[(r0 + i) * f..(r0 + i + 1) * f];
            for (j, &v) in src.iter().enumerate() {
                wide[(i, j)] = v as f64;
            }
        }
        let xb = wide.as_ref().subrows(0, n);
        matmul(
            hm.as_mut(),
            BlockStructure::TriangularUpper,
            Accum::Add,
            xb.transpose(),
            BlockStructure::Rectangular,
            xb,
            BlockStructure::Rectangular,
            1.0f64,
            Par::rayon(0),
        );
    }
}

/// Rows of X widened to f64 at a time by [`xtx_accumulate`].
pub const XTX_BLOCK: usize = 2048;

/// Copy the upper triangle of the symmetric f × f `h` onto its lower one.
pub fn mirror_upper(h: &mut [f64], f: usize) {
    for i in 0..f {
        for j in 0..i {
            h[i * f + j] = h[j * f + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::reference::hessian_f64;

    /// The host Hessian path equals the f64 reference on awkward shapes: one row and one
    /// feature, primes, more rows than one widened block (and not a multiple of it), and
    /// repeated accumulation into the same H.
    #[test]
    fn host_hessian_matches_the_f64_reference() {
        for &(rows, f) in &[
            (1usize, 1usize),
            (7, 3),
            (13, 61),
            (XTX_BLOCK + 1, 5),
            (4099, 37),
        ] {
            let x: Vec<f32> = (0..rows * f)
                .map(|i| ((i as f32 * 0.618).sin() * 3.0) + if i % 5 == 0 { 7.0 } else { 0.0 })
                .collect();
            let want = hessian_f64(&x, rows, f);
            let mut h = vec![0.0f64; f * f];
            let half = rows / 2;
            xtx_accumulate(&mut h, &x[..half * f], half, f);
            xtx_accumulate(&mut h, &x[half * f..], rows - half, f);
            mirror_upper(&mut h, f);
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for i in 0..f {
                for j in 0..f {
                    let (g, w) = (h[i * f + j], want[i * f + j]);
                    assert!(
                        (g - w).abs() <= 1e-12 * scale,
                        "{rows}x{f} ({i},{j}): {g} vs {w}"
                    );
                    assert_eq!(g.to_bits(), h[j * f + i].to_bits(), "not symmetric");
                }
            }
        }
    }
}
