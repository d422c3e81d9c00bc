//! Randomized SVD (Halko–Martinsson–Tropp) with the large products on the GPU.
//!
//! Range finder: Y = A Ω (Ω Gaussian n × (k+p)), then q power iterations Z = orth(Aᵀ Q),
//! Q = orth(A Z), re-orthonormalizing at every step. Orthonormalization is shifted CholeskyQR3:
//! the Gram matrix YᵀY is accumulated on the GPU with compensated sums and read in f64, its
//! Cholesky factor R (with a small shift the first time, so it exists even when Y is
//! numerically rank deficient) is formed on the CPU, and Y ← Y R⁻¹ on the GPU; two more unshifted
//! passes restore orthogonality to working precision (plain f32 CholeskyQR fails above κ ≈ 10³).
//! The small (k+p) × n problem B = Qᵀ A is decomposed on the CPU in f64.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{matmul, ops, GemmOp, Gpu, GpuMatrix, HessianAccumulator};

/// A rank-k factorization A ≈ U diag(s) Vᵀ.
#[derive(Clone, Debug)]
pub struct Svd {
    /// m × k, row-major.
    pub u: Vec<f64>,
    pub s: Vec<f64>,
    /// n × k, row-major (columns are right singular vectors).
    pub v: Vec<f64>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Randomized SVD parameters.
#[derive(Clone, Copy, Debug)]
pub struct RsvdOptions {
    pub rank: usize,
    /// Oversampling p.
    pub oversample: usize,
    /// Power iterations q.
    pub power_iters: usize,
    pub seed: u64,
}

impl Default for RsvdOptions {
    fn default() -> Self {
        RsvdOptions {
            rank: 16,
            oversample: 10,
            power_iters: 2,
            seed: 0,
        }
    }
}

pub use crate::base::rng::gaussian;

/// Gram matrix YᵀY (l × l, f64) of a tall GPU matrix.
fn gram(gpu: &Gpu, y: &GpuMatrix) -> Result<Vec<f64>> {
    let mut acc = HessianAccumulator::new(gpu, y.cols())?;
    let mut b = crate::gpu::Batch::new(gpu);
    acc.accumulate(&mut b, y)?;
    b.submit()?;
    acc.read(gpu)
}

/// Inverse of the upper Cholesky factor R of G + shift·I (G = RᵀR), row-major l × l.
fn chol_inv_upper(g: &[f64], l: usize, shift: f64) -> Option<Vec<f64>> {
    let a = faer::Mat::<f64>::from_fn(l, l, |i, j| g[i * l + j] + if i == j { shift } else { 0.0 });
    let llt = a.llt(faer::Side::Lower).ok()?;
    let mut linv = faer::Mat::<f64>::zeros(l, l);
    faer::linalg::triangular_inverse::invert_lower_triangular(
        linv.as_mut(),
        llt.L(),
        faer::Par::Seq,
    );
    // R = Lᵀ, so R⁻¹ = (L⁻¹)ᵀ.
    let mut out = vec![0.0; l * l];
    for i in 0..l {
        for j in 0..l {
            out[i * l + j] = linv[(j, i)];
        }
    }
    out.iter().all(|v| v.is_finite()).then_some(out)
}

/// Orthonormalize the columns of a tall matrix Y (m × l, m ≥ l) by shifted CholeskyQR3.
pub fn orthonormalize(gpu: &Gpu, y: &GpuMatrix) -> Result<GpuMatrix> {
    let (m, l) = (y.rows(), y.cols());
    if m < l {
        return Err(Error::Shape(format!(
            "orthonormalize: {m} rows < {l} columns"
        )));
    }
    let mut cur: Option<GpuMatrix> = None;
    for pass in 0..3 {
        let src = cur.as_ref().unwrap_or(y);
        let g = gram(gpu, src)?;
        let norm2: f64 = (0..l).map(|i| g[i * l + i]).sum();
        if norm2 == 0.0 || !norm2.is_finite() {
            return Err(Error::InvalidArgument(
                "orthonormalize: the matrix is zero or not finite".into(),
            ));
        }
        // Shift of shifted CholeskyQR (Fukaya et al.), with u the f32 unit roundoff.
        let u = f32::EPSILON as f64 / 2.0;
        let mut shift = if pass == 0 {
            11.0 * ((m * l) as f64 + (l * (l + 1)) as f64) * u * norm2
        } else {
            0.0
        };
        let rinv = loop {
            match chol_inv_upper(&g, l, shift) {
                Some(r) => break r,
                None if shift < norm2 => {
                    shift = if shift == 0.0 {
                        1e-7 * norm2
                    } else {
                        shift * 100.0
                    }
                }
                None => {
                    return Err(Error::InvalidArgument(
                        "orthonormalize: Cholesky of the Gram matrix failed".into(),
                    ))
                }
            }
        };
        let rm = GpuMatrix::from_f32(
            gpu,
            l,
            l,
            DType::F32,
            &rinv.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        )?;
        cur = Some(matmul(gpu, src, &rm, GemmOp::NN)?);
    }
    Ok(cur.expect("three passes ran"))
}

/// Rank-k randomized SVD of A (m × n) given A and Aᵀ on the GPU.
pub fn rsvd(gpu: &Gpu, a: &GpuMatrix, at: &GpuMatrix, opts: &RsvdOptions) -> Result<Svd> {
    let (m, n) = (a.rows(), a.cols());
    if at.rows() != n || at.cols() != m {
        return Err(Error::Shape(format!(
            "rsvd: A {:?} but Aᵀ {:?}",
            a.shape(),
            at.shape()
        )));
    }
    rsvd_op(
        gpu,
        m,
        n,
        &|x| matmul(gpu, a, x, GemmOp::NN),
        &|y| matmul(gpu, at, y, GemmOp::NN),
        opts,
    )
}

/// The range finder of [`rsvd_op`]: Q (m × l, orthonormal columns spanning A's dominant range
/// after the power iterations) and Bᵀ = Aᵀ Q read back (n × l, row-major), l = k + oversample
/// (at most min(m, n)).
pub fn sketch_op(
    gpu: &Gpu,
    m: usize,
    n: usize,
    apply: &dyn Fn(&GpuMatrix) -> Result<GpuMatrix>,
    apply_t: &dyn Fn(&GpuMatrix) -> Result<GpuMatrix>,
    opts: &RsvdOptions,
) -> Result<(GpuMatrix, Vec<f32>)> {
    let k = opts.rank.min(m).min(n);
    if k == 0 {
        return Err(Error::InvalidArgument("rsvd: rank 0".into()));
    }
    let l = (k + opts.oversample).min(m).min(n);
    let omega = GpuMatrix::from_f32(gpu, n, l, DType::F32, &gaussian(n * l, opts.seed))?;
    let mut q = orthonormalize(gpu, &apply(&omega)?)?;
    for _ in 0..opts.power_iters {
        let z = orthonormalize(gpu, &apply_t(&q)?)?;
        q = orthonormalize(gpu, &apply(&z)?)?;
    }
    // B = Qᵀ A (l × n), formed as (Aᵀ Q)ᵀ.
    let bt = apply_t(&q)?.to_f32(gpu)?;
    Ok((q, bt))
}

/// Rank-k randomized SVD of an m × n operator A known only by its products: `apply(X)` = A·X
/// (X n × l) and `apply_t(Y)` = Aᵀ·Y (Y m × l). For A = B·S this costs two thin products per
/// application instead of forming B·S (an m·n² product).
pub fn rsvd_op(
    gpu: &Gpu,
    m: usize,
    n: usize,
    apply: &dyn Fn(&GpuMatrix) -> Result<GpuMatrix>,
    apply_t: &dyn Fn(&GpuMatrix) -> Result<GpuMatrix>,
    opts: &RsvdOptions,
) -> Result<Svd> {
    let (q, bt) = sketch_op(gpu, m, n, apply, apply_t, opts)?;
    let (k, l) = (opts.rank.min(m).min(n), q.cols());
    let b = faer::Mat::<f64>::from_fn(l, n, |i, j| bt[j * l + i] as f64);
    let svd = b
        .thin_svd()
        .map_err(|e| Error::InvalidArgument(format!("rsvd: small SVD failed: {e:?}")))?;
    let (ub, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    // U = Q Ũ (m × l · l × k).
    let ut: Vec<f32> = (0..l * k)
        .map(|idx| ub[(idx / k, idx % k)] as f32)
        .collect();
    let um = GpuMatrix::from_f32(gpu, l, k, DType::F32, &ut)?;
    let u = matmul(gpu, &q, &um, GemmOp::NN)?.to_f32(gpu)?;
    Ok(Svd {
        u: u.into_iter().map(f64::from).collect(),
        s: (0..k).map(|i| s[i]).collect(),
        v: (0..n * k).map(|idx| v[(idx / k, idx % k)]).collect(),
        m,
        n,
        k,
    })
}

/// Convenience: randomized SVD of a host matrix (uploads A and Aᵀ).
pub fn rsvd_host(gpu: &Gpu, a: &[f32], m: usize, n: usize, opts: &RsvdOptions) -> Result<Svd> {
    let am = GpuMatrix::from_f32(gpu, m, n, DType::F32, a)?;
    let at = ops::transpose(gpu, &am)?;
    rsvd(gpu, &am, &at, opts)
}
