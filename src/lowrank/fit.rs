//! CALDERA's low-rank step — (a) of an outer iteration — on the GPU or on the host.
//!
//! The step needs few products with the residual A = W − Q (m × n) and the weighting (H, its
//! damped Cholesky factor S and S⁻¹): a rank-k randomized SVD of A·S for the start, then per
//! round A·H·Rᵀ, R·H·Rᵀ and Aᵀ·L. Everything else is k × k or O(k·(m + n)) host work (solves,
//! the factors' quantization). [`Space`] holds the weighting where the products run — uploaded
//! to the adapter ([`GpuSpace`]) or kept in host memory ([`HostSpace`], f32 faer products, f64
//! factorizations) — and [`fit`] is the one inner loop over either, so both places compute the
//! same algorithm.
//!
//! Where ([`Placement`]): each GPU product waits for a submission and a read-back before the
//! host can go on (a round is three such waits, the start about a dozen), which costs more than
//! the arithmetic when the products are small: 0.05–0.1 ms on a discrete GPU, 0.3–1 ms on a
//! CPU driver (lavapipe), where the host's own BLAS on the same cores is also several times
//! faster than the emulated GPU. `Auto` therefore runs the step on the host for a CPU adapter
//! and, on a GPU, when one A-sized product 2·m·n·(k + p) is at most [`HOST_FLOPS`].

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{matmul, ops, GemmOp, Gpu, GpuMatrix};
use crate::lowrank::caldera::{f32s, mat, spd_inverse, CalderaOptions};
use crate::lowrank::RsvdOptions;
use crate::quant::reference::rtn;
use crate::quant::Quantized;
use faer::Mat;

/// Where the low-rank step's products run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// The host for a CPU adapter or small products, else the GPU (module docs).
    #[default]
    Auto,
    Gpu,
    Host,
}

/// Largest A-sized product (flops) that `Auto` keeps on the host beside a GPU: about 0.2 ms of
/// one core's f32 arithmetic, what three GPU round trips cost.
pub const HOST_FLOPS: f64 = (1u64 << 23) as f64;

impl Placement {
    pub fn parse(s: &str) -> Result<Placement> {
        match s {
            "auto" => Ok(Placement::Auto),
            "gpu" => Ok(Placement::Gpu),
            "host" => Ok(Placement::Host),
            _ => Err(Error::InvalidArgument(format!(
                "{s}: expected auto, gpu or host"
            ))),
        }
    }

    /// True when work that suits the host's BLAS better than an emulated GPU runs on the host
    /// (`Auto`: on a CPU adapter).
    pub fn host_for(self, cpu_adapter: bool) -> bool {
        match self {
            Placement::Gpu => false,
            Placement::Host => true,
            Placement::Auto => cpu_adapter,
        }
    }

    /// True when the step of an m × n matrix with `l` = k + p sketch columns runs on the host.
    pub fn on_host(self, cpu_adapter: bool, m: usize, n: usize, l: usize) -> bool {
        match self {
            Placement::Gpu => false,
            Placement::Host => true,
            Placement::Auto => cpu_adapter || 2.0 * (m * n * l) as f64 <= HOST_FLOPS,
        }
    }
}

/// The weighting of one matrix, where the products run.
pub(crate) trait Space {
    /// tr(X H Xᵀ) of an m × n matrix X.
    fn quad(&self, x: &[f32], m: usize) -> Result<f64>;
    /// The products with one residual A (m × n).
    fn residual<'s>(&'s self, a: &[f32], m: usize) -> Result<Box<dyn Residual + 's>>;
    /// L·R (m × n) from Lᵀ (k × m) and R (k × n).
    fn low_rank(&self, lt: &[f32], r: &[f32], k: usize, m: usize) -> Result<Vec<f32>>;
}

/// Products with one residual A.
pub(crate) trait Residual {
    /// R₀ = Σ_k^½ V_kᵀ S⁻¹ (k × n) from a rank-k randomized SVD of A·S.
    fn start(&self, ro: &RsvdOptions) -> Result<Vec<f32>>;
    /// A·H·Rᵀ (m × k) and R·H·Rᵀ (k × k) of R (k × n), row-major.
    fn ahrt_rhrt(&self, r: &[f32], k: usize) -> Result<(Vec<f64>, Vec<f64>)>;
    /// Aᵀ·L (n × k) of L (m × k), row-major.
    fn atl(&self, l: &[f32], k: usize) -> Result<Vec<f64>>;
}

/// A matrix's entries in row-major order.
pub(super) fn rows_of<T: Copy>(m: faer::MatRef<'_, T>) -> Vec<T> {
    let (r, c) = (m.nrows(), m.ncols());
    (0..r * c).map(|i| m[(i / c, i % c)]).collect()
}

fn mat32(rows: usize, cols: usize, v: &[f32]) -> Mat<f32> {
    Mat::<f32>::from_fn(rows, cols, |i, j| v[i * cols + j])
}

/// R₀ = √σ_t V[:, t]ᵀ for t < k (k × n) from the SVD of the small B = Qᵀ (A S) (l × n, given as
/// its transpose, n × l).
fn start_from_sketch(bt: &[f64], n: usize, l: usize, k: usize) -> Result<Vec<f64>> {
    let b = Mat::<f64>::from_fn(l, n, |i, j| bt[j * l + i]);
    let svd = b
        .thin_svd()
        .map_err(|e| Error::InvalidArgument(format!("rsvd: small SVD failed: {e:?}")))?;
    let (s, v) = (svd.S().column_vector(), svd.V());
    Ok((0..k * n)
        .map(|idx| v[(idx % n, idx / n)] * s[idx / n].sqrt())
        .collect())
}

/// The weighting uploaded to the adapter.
pub(crate) struct GpuSpace<'g> {
    gpu: &'g Gpu,
    n: usize,
    h: GpuMatrix,
    s: GpuMatrix,
    st: GpuMatrix,
    sinv: GpuMatrix,
}

impl<'g> GpuSpace<'g> {
    pub fn new(gpu: &'g Gpu, h: &[f64], s: &Mat<f64>, sinv: &Mat<f64>) -> Result<GpuSpace<'g>> {
        let n = s.nrows();
        let up = |v: &[f64]| GpuMatrix::from_f32(gpu, n, n, DType::F32, &f32s(v));
        Ok(GpuSpace {
            gpu,
            n,
            h: up(h)?,
            s: up(&rows_of(s.as_ref()))?,
            st: up(&rows_of(s.transpose()))?,
            sinv: up(&rows_of(sinv.as_ref()))?,
        })
    }

    fn up(&self, rows: usize, cols: usize, v: &[f32]) -> Result<GpuMatrix> {
        GpuMatrix::from_f32(self.gpu, rows, cols, DType::F32, v)
    }
}

impl Space for GpuSpace<'_> {
    fn quad(&self, x: &[f32], m: usize) -> Result<f64> {
        let xm = self.up(m, self.n, x)?;
        let xh = matmul(self.gpu, &xm, &self.h, GemmOp::NN)?.to_f32(self.gpu)?;
        Ok(xh.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum())
    }

    fn residual<'s>(&'s self, a: &[f32], m: usize) -> Result<Box<dyn Residual + 's>> {
        let am = self.up(m, self.n, a)?;
        let at = ops::transpose(self.gpu, &am)?;
        Ok(Box::new(GpuResidual {
            space: self,
            m,
            a: am,
            at,
        }))
    }

    fn low_rank(&self, lt: &[f32], r: &[f32], k: usize, m: usize) -> Result<Vec<f32>> {
        let l = ops::transpose(self.gpu, &self.up(k, m, lt)?)?;
        matmul(self.gpu, &l, &self.up(k, self.n, r)?, GemmOp::NN)?.to_f32(self.gpu)
    }
}

struct GpuResidual<'s, 'g> {
    space: &'s GpuSpace<'g>,
    m: usize,
    a: GpuMatrix,
    at: GpuMatrix,
}

impl Residual for GpuResidual<'_, '_> {
    fn start(&self, ro: &RsvdOptions) -> Result<Vec<f32>> {
        let (sp, gpu, n) = (self.space, self.space.gpu, self.space.n);
        // A S is applied as A (S X) and Sᵀ (Aᵀ Y), never formed (an m·n² product); only V
        // and Σ are needed, so U is not formed either.
        let apply = |x: &GpuMatrix| {
            matmul(
                gpu,
                &self.a,
                &matmul(gpu, &sp.s, x, GemmOp::NN)?,
                GemmOp::NN,
            )
        };
        let apply_t = |y: &GpuMatrix| {
            matmul(
                gpu,
                &sp.st,
                &matmul(gpu, &self.at, y, GemmOp::NN)?,
                GemmOp::NN,
            )
        };
        let (q, bt) = crate::lowrank::rsvd::sketch_op(gpu, self.m, n, &apply, &apply_t, ro)?;
        let k = ro.rank.min(self.m).min(n);
        let bt: Vec<f64> = bt.into_iter().map(f64::from).collect();
        let rv = start_from_sketch(&bt, n, q.cols(), k)?;
        matmul(gpu, &sp.up(k, n, &f32s(&rv))?, &sp.sinv, GemmOp::NN)?.to_f32(gpu)
    }

    fn ahrt_rhrt(&self, r: &[f32], k: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let (sp, gpu) = (self.space, self.space.gpu);
        let rm = sp.up(k, sp.n, r)?;
        let hrt = matmul(gpu, &sp.h, &rm, GemmOp::NT)?;
        let wide = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        let ahrt = wide(matmul(gpu, &self.a, &hrt, GemmOp::NN)?.to_f32(gpu)?);
        let rhrt = wide(matmul(gpu, &rm, &hrt, GemmOp::NN)?.to_f32(gpu)?);
        Ok((ahrt, rhrt))
    }

    fn atl(&self, l: &[f32], k: usize) -> Result<Vec<f64>> {
        let gpu = self.space.gpu;
        let lm = self.space.up(self.m, k, l)?;
        Ok(matmul(gpu, &self.at, &lm, GemmOp::NN)?
            .to_f32(gpu)?
            .into_iter()
            .map(f64::from)
            .collect())
    }
}

/// The weighting in host memory (f32 for the products, as the GPU computes them).
pub(crate) struct HostSpace {
    n: usize,
    h: Mat<f32>,
    s: Mat<f32>,
    sinv: Mat<f32>,
}

impl HostSpace {
    pub fn new(h: &[f64], s: &Mat<f64>, sinv: &Mat<f64>) -> HostSpace {
        let n = s.nrows();
        HostSpace {
            n,
            h: Mat::<f32>::from_fn(n, n, |i, j| h[i * n + j] as f32),
            s: Mat::<f32>::from_fn(n, n, |i, j| s[(i, j)] as f32),
            sinv: Mat::<f32>::from_fn(n, n, |i, j| sinv[(i, j)] as f32),
        }
    }
}

impl Space for HostSpace {
    fn quad(&self, x: &[f32], m: usize) -> Result<f64> {
        let xh = mat32(m, self.n, x) * &self.h;
        Ok((0..m * self.n)
            .map(|i| xh[(i / self.n, i % self.n)] as f64 * x[i] as f64)
            .sum())
    }

    fn residual<'s>(&'s self, a: &[f32], m: usize) -> Result<Box<dyn Residual + 's>> {
        Ok(Box::new(HostResidual {
            space: self,
            a: mat32(m, self.n, a),
        }))
    }

    fn low_rank(&self, lt: &[f32], r: &[f32], k: usize, m: usize) -> Result<Vec<f32>> {
        let lr = mat32(k, m, lt).transpose() * mat32(k, self.n, r);
        Ok(rows_of(lr.as_ref()))
    }
}

struct HostResidual<'s> {
    space: &'s HostSpace,
    a: Mat<f32>,
}

/// Orthonormal columns spanning those of y (thin QR, f64).
fn orth(y: &Mat<f32>) -> Mat<f32> {
    let q = Mat::<f64>::from_fn(y.nrows(), y.ncols(), |i, j| y[(i, j)] as f64)
        .qr()
        .compute_thin_Q();
    Mat::<f32>::from_fn(q.nrows(), q.ncols(), |i, j| q[(i, j)] as f32)
}

impl Residual for HostResidual<'_> {
    fn start(&self, ro: &RsvdOptions) -> Result<Vec<f32>> {
        let (sp, n, m) = (self.space, self.space.n, self.a.nrows());
        let k = ro.rank.min(m).min(n);
        let l = (k + ro.oversample).min(m).min(n);
        // The same range finder as the GPU's (rsvd_op), with the same sketch.
        let apply = |x: &Mat<f32>| &self.a * (&sp.s * x);
        let apply_t = |y: &Mat<f32>| sp.s.transpose() * (self.a.transpose() * y);
        let omega = mat32(n, l, &crate::lowrank::rsvd::gaussian(n * l, ro.seed));
        let mut q = orth(&apply(&omega));
        for _ in 0..ro.power_iters {
            let z = orth(&apply_t(&q));
            q = orth(&apply(&z));
        }
        let bt = apply_t(&q);
        let bt: Vec<f64> = rows_of(bt.as_ref()).into_iter().map(f64::from).collect();
        let rv = start_from_sketch(&bt, n, l, k)?;
        Ok(rows_of((mat32(k, n, &f32s(&rv)) * &sp.sinv).as_ref()))
    }

    fn ahrt_rhrt(&self, r: &[f32], k: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let sp = self.space;
        let rm = mat32(k, sp.n, r);
        let hrt = &sp.h * rm.transpose();
        let wide = |x: Mat<f32>| rows_of(x.as_ref()).into_iter().map(f64::from).collect();
        Ok((wide(&self.a * &hrt), wide(&rm * &hrt)))
    }

    fn atl(&self, l: &[f32], k: usize) -> Result<Vec<f64>> {
        let lm = mat32(self.a.nrows(), k, l);
        Ok(rows_of((self.a.transpose() * lm).as_ref())
            .into_iter()
            .map(f64::from)
            .collect())
    }
}

/// One low-rank step: the start (unless `warm` carries the previous R), then `inner_iters`
/// rounds of L ← (A H Rᵀ)(R H Rᵀ)⁻¹ and R ← (LᵀL)⁻¹ Lᵀ A, each quantized at once, keeping the
/// pair of least ‖(A − L R) S‖². Returns (Lᵀ, R) quantized.
pub(crate) fn fit(
    res: &dyn Residual,
    m: usize,
    n: usize,
    k: usize,
    opts: &CalderaOptions,
    outer: usize,
    warm: Option<Quantized>,
) -> Result<(Quantized, Quantized)> {
    // R is kept quantized from the start, so every evaluated pair is a storable one.
    let mut r_q = match warm {
        Some(rq) => rq,
        None => {
            let ro = RsvdOptions {
                rank: k,
                oversample: opts.oversample,
                power_iters: opts.power_iters,
                seed: opts.seed.wrapping_add(outer as u64),
            };
            rtn(&res.start(&ro)?, k, n, opts.lr_grid)
        }
    };
    let mut l_prev: Option<(Vec<f64>, Quantized)> = None;
    let mut best: Option<(f64, Quantized, Quantized)> = None;
    let rounds = opts.inner_iters.max(1);
    for round in 0..=rounds {
        let (ahrt, rhrt) = res.ahrt_rhrt(&r_q.dequantize(), k)?;
        // ‖(A − L R) S‖² = tr(A H Aᵀ) − 2⟨L, A H Rᵀ⟩ + ⟨LᵀL, R H Rᵀ⟩; the first term is the
        // same for every candidate of this step, and only their order is used, so it is left
        // out (it costs an m·n² product).
        let err_of = |l: &[f64]| {
            let lm = mat(m, k, l);
            let ltl = lm.transpose() * &lm;
            dot(&rows_of(ltl.as_ref()), &rhrt) - 2.0 * dot(l, &ahrt)
        };
        let mut consider = |e: f64, lt: &Quantized, rq: &Quantized| {
            if best.as_ref().is_none_or(|(b, _, _)| e < *b) {
                best = Some((e, lt.clone(), rq.clone()));
            }
        };
        // (L from the previous round, this R).
        if let Some((lp, lpq)) = &l_prev {
            consider(err_of(lp), lpq, &r_q);
        }
        if round == rounds {
            break;
        }
        // L ← (A H Rᵀ)(R H Rᵀ)⁻¹, quantized (as Lᵀ, groups along m).
        let l = &mat(m, k, &ahrt) * spd_inverse(&mat(k, k, &rhrt));
        let lt_q = rtn(&f32s(&rows_of(l.transpose())), k, m, opts.lr_grid);
        let ltd = lt_q.dequantize();
        let lv: Vec<f64> = (0..m * k)
            .map(|idx| ltd[(idx % k) * m + idx / k] as f64)
            .collect();
        consider(err_of(&lv), &lt_q, &r_q);
        // R ← (LᵀL)⁻¹ Lᵀ A, quantized; Lᵀ A = (Aᵀ L)ᵀ.
        let lm = mat(m, k, &lv);
        let ltl = lm.transpose() * &lm;
        let atl = res.atl(&f32s(&lv), k)?;
        let lta = Mat::<f64>::from_fn(k, n, |t, j| atl[j * k + t]);
        r_q = rtn(
            &f32s(&rows_of((spd_inverse(&ltl) * lta).as_ref())),
            k,
            n,
            opts.lr_grid,
        );
        l_prev = Some((lv, lt_q));
    }
    let (_, lt, r) = best.expect("at least one inner round");
    Ok((lt, r))
}

/// ⟨X, Y⟩ of two equally long slices, f64.
fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lowrank::caldera::weighting;

    /// Products in f64 of row-major a (r × t) and b (t × c).
    fn mul(a: &[f64], b: &[f64], r: usize, t: usize, c: usize) -> Vec<f64> {
        let mut out = vec![0.0; r * c];
        for i in 0..r {
            for p in 0..t {
                for j in 0..c {
                    out[i * c + j] += a[i * t + p] * b[p * c + j];
                }
            }
        }
        out
    }

    fn tr(a: &[f64], r: usize, c: usize) -> Vec<f64> {
        (0..r * c).map(|i| a[(i % r) * c + i / r]).collect()
    }

    fn close(got: &[f64], want: &[f64], what: &str) {
        let scale = want.iter().fold(1e-30f64, |s, v| s.max(v.abs()));
        let worst = got
            .iter()
            .zip(want)
            .fold(0.0f64, |w, (g, x)| w.max((g - x).abs()));
        assert_eq!(got.len(), want.len(), "{what}");
        assert!(
            worst <= 2e-5 * scale,
            "{what}: off by {worst:e} of {scale:e}"
        );
    }

    /// A (m × n) with singular values 0.7^i, H = XᵀX/rows + 0.05·I.
    fn problem(m: usize, n: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let g = crate::base::rng::gaussian(m * n + 3 * n * n, seed);
        let u = Mat::<f64>::from_fn(m, m.min(n), |i, j| g[i * m.min(n) + j] as f64)
            .qr()
            .compute_thin_Q();
        let v = Mat::<f64>::from_fn(n, m.min(n), |i, j| g[m * n + i * m.min(n) + j] as f64)
            .qr()
            .compute_thin_Q();
        let a: Vec<f64> = (0..m * n)
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                (0..m.min(n))
                    .map(|t| u[(i, t)] * 0.7f64.powi(t as i32) * v[(j, t)])
                    .sum()
            })
            .collect();
        let rows = 2 * n;
        let x = &g[2 * n * n.min(m)..][..rows * n.min(g.len() / rows)];
        let x: Vec<f64> = (0..rows * n)
            .map(|i| x.get(i).copied().unwrap_or(0.5) as f64)
            .collect();
        let mut h = mul(&tr(&x, rows, n), &x, n, rows, n);
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = h[i * n + j] / rows as f64 + if i == j { 0.05 } else { 0.0 };
            }
        }
        (a, h)
    }

    /// Both places compute every product of the step as the f64 products do (f32 rounding),
    /// and their starts fit A as well as the exact rank-k SVD of A·S, on awkward shapes.
    #[test]
    fn host_and_gpu_products_agree_with_f64() {
        let gpu = crate::gpu::Gpu::new(&crate::gpu::GpuOptions::from_env().unwrap())
            .expect("GPU tests need an adapter (install mesa-vulkan-drivers for lavapipe)");
        for (m, n, k, seed) in [
            (1usize, 7usize, 1usize, 1u64),
            (67, 61, 5, 2),
            (130, 97, 12, 3),
            (5, 203, 3, 4),
        ] {
            let (a, h) = problem(m, n, seed);
            let (s, sinv) = weighting(&h, n, 0.01).unwrap();
            let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
            let a = a32.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let r: Vec<f32> = crate::base::rng::gaussian(k * n, seed + 7);
            let l: Vec<f32> = crate::base::rng::gaussian(m * k, seed + 8);
            let (r64, l64): (Vec<f64>, Vec<f64>) = (
                r.iter().map(|&v| v as f64).collect(),
                l.iter().map(|&v| v as f64).collect(),
            );
            let hrt = mul(&h, &tr(&r64, k, n), n, n, k);
            let want_ahrt = mul(&a, &hrt, m, n, k);
            let want_rhrt = mul(&r64, &hrt, k, n, k);
            let want_atl = mul(&tr(&a, m, n), &l64, n, m, k);
            let want_lr = mul(&l64, &r64, m, k, n);
            let ah = mul(&a, &h, m, n, n);
            let want_quad: f64 = ah.iter().zip(&a).map(|(x, y)| x * y).sum();
            // The best H-weighted rank-k error, from the exact SVD of A·S.
            let sm = Mat::<f64>::from_fn(n, n, |i, j| s[(i, j)]);
            let svd = (Mat::<f64>::from_fn(m, n, |i, j| a[i * n + j]) * &sm)
                .singular_values()
                .unwrap();
            let optimal: f64 = svd.iter().skip(k).map(|x| x * x).sum();
            let spaces: [(&str, Box<dyn Space>); 2] = [
                ("gpu", Box::new(GpuSpace::new(&gpu, &h, &s, &sinv).unwrap())),
                ("host", Box::new(HostSpace::new(&h, &s, &sinv))),
            ];
            for (place, sp) in spaces {
                let what = |p: &str| format!("{place} {m}x{n} k {k}: {p}");
                let res = sp.residual(&a32, m).unwrap();
                let (ahrt, rhrt) = res.ahrt_rhrt(&r, k).unwrap();
                close(&ahrt, &want_ahrt, &what("A H Rᵀ"));
                close(&rhrt, &want_rhrt, &what("R H Rᵀ"));
                close(&res.atl(&l, k).unwrap(), &want_atl, &what("Aᵀ L"));
                let lt: Vec<f32> = tr(&l64, m, k).iter().map(|&v| v as f32).collect();
                let lr: Vec<f64> = sp
                    .low_rank(&lt, &r, k, m)
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect();
                close(&lr, &want_lr, &what("L R"));
                let q = sp.quad(&a32, m).unwrap();
                assert!(
                    (q - want_quad).abs() <= 1e-5 * want_quad,
                    "{}",
                    what("tr(A H Aᵀ)")
                );
                // The start's weighted fit: L = A H R₀ᵀ (R₀ H R₀ᵀ)⁻¹, error ‖(A − L R₀) S‖².
                let ro = RsvdOptions {
                    rank: k,
                    oversample: 10,
                    power_iters: 2,
                    seed: 5,
                };
                let r0: Vec<f64> = res.start(&ro).unwrap().into_iter().map(f64::from).collect();
                let hr0 = mul(&h, &tr(&r0, k, n), n, n, k);
                let inv = spd_inverse(&Mat::<f64>::from_fn(k, k, |i, j| {
                    mul(&r0, &hr0, k, n, k)[i * k + j]
                }));
                let inv: Vec<f64> = (0..k * k).map(|i| inv[(i / k, i % k)]).collect();
                let lfit = mul(&mul(&a, &hr0, m, n, k), &inv, m, k, k);
                let d: Vec<f64> = mul(&lfit, &r0, m, k, n)
                    .iter()
                    .zip(&a)
                    .map(|(x, y)| y - x)
                    .collect();
                let dh = mul(&d, &h, m, n, n);
                let err: f64 = dh.iter().zip(&d).map(|(x, y)| x * y).sum();
                let h_damped_gap = 0.01 * (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64
                    * d.iter().map(|x| x * x).sum::<f64>();
                // S Sᵀ = H + λI, so the optimum is over the damped norm; undo the damping.
                assert!(
                    err <= (optimal - h_damped_gap).max(0.0) * 1.05 + 1e-6 * want_quad,
                    "{}: error {err:e} vs optimal {optimal:e}",
                    what("start")
                );
            }
        }
    }
}
