//! Randomized SVD against exact spectra, CholeskyQR orthonormalization on ill-conditioned
//! inputs, and the transpose kernel against the CPU.

mod common;

use common::{gpu, gpu_limited, random};
use pumice::gpu::{ops, GpuMatrix};
use pumice::lowrank::rsvd::{gaussian, orthonormalize};
use pumice::lowrank::{rsvd_host, RsvdOptions};
use pumice::DType;

/// A random m × r matrix with orthonormal columns (f64, row-major).
fn orthonormal(m: usize, r: usize, seed: u64) -> Vec<f64> {
    let g = gaussian(m * r, seed);
    let a = faer::Mat::<f64>::from_fn(m, r, |i, j| g[i * r + j] as f64);
    let q = a.qr().compute_thin_Q();
    (0..m * r).map(|idx| q[(idx / r, idx % r)]).collect()
}

/// A = U diag(sigma) Vᵀ with random orthonormal U (m × r), V (n × r).
fn with_spectrum(m: usize, n: usize, sigma: &[f64], seed: u64) -> Vec<f32> {
    let r = sigma.len();
    let u = orthonormal(m, r, seed);
    let v = orthonormal(n, r, seed + 1);
    let mut a = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            a[i * n + j] = (0..r)
                .map(|t| u[i * r + t] * sigma[t] * v[j * r + t])
                .sum::<f64>() as f32;
        }
    }
    a
}

#[test]
fn transpose_matches_cpu() {
    for (g, m, n) in [
        (gpu(), 1, 1),
        (gpu(), 7, 13),
        (gpu(), 100, 37),
        (gpu_limited(1024), 53, 29),
    ] {
        let x = random(m * n, 5, 0.0);
        for dt in [DType::F32, DType::BF16] {
            let xm = GpuMatrix::from_f32(&g, m, n, dt, &x).unwrap();
            let xv = xm.to_f32(&g).unwrap();
            let t = ops::transpose(&g, &xm).unwrap();
            assert_eq!(t.shape(), [n, m]);
            let tv = t.to_f32(&g).unwrap();
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(tv[j * m + i], xv[i * n + j]);
                }
            }
        }
    }
}

#[test]
fn cholesky_qr_handles_ill_conditioning() {
    let g = gpu();
    let (m, l) = (400, 12);
    // Columns with singular values from 1 down to 1e-6 (κ = 10⁶).
    let sigma: Vec<f64> = (0..l)
        .map(|i| 10f64.powf(-6.0 * i as f64 / (l - 1) as f64))
        .collect();
    let y = with_spectrum(m, l, &sigma, 3);
    let ym = GpuMatrix::from_f32(&g, m, l, DType::F32, &y).unwrap();
    let q = orthonormalize(&g, &ym).unwrap().to_f32(&g).unwrap();
    let mut worst = 0.0f64;
    for a in 0..l {
        for b in 0..l {
            let d: f64 = (0..m)
                .map(|i| q[i * l + a] as f64 * q[i * l + b] as f64)
                .sum();
            worst = worst.max((d - if a == b { 1.0 } else { 0.0 }).abs());
        }
    }
    assert!(worst < 1e-5, "‖QᵀQ − I‖max = {worst:.2e}");
}

#[test]
fn rsvd_recovers_known_spectra() {
    let g = gpu();
    let (m, n) = (300, 200);
    // Geometric decay, and a spectrum with a gap after the 8th value.
    let decay: Vec<f64> = (0..60).map(|i| 10.0 * 0.8f64.powi(i)).collect();
    let gap: Vec<f64> = (0..60)
        .map(|i| {
            if i < 8 {
                5.0 - 0.3 * i as f64
            } else {
                0.01 / (1 + i) as f64
            }
        })
        .collect();
    for (name, sigma) in [("decay", decay), ("gap", gap)] {
        let a = with_spectrum(m, n, &sigma, 11);
        let k = 8;
        let svd = rsvd_host(
            &g,
            &a,
            m,
            n,
            &RsvdOptions {
                rank: k,
                oversample: 8,
                power_iters: 2,
                seed: 1,
            },
        )
        .unwrap();
        for (i, (&got, &want)) in svd.s.iter().zip(&sigma).enumerate() {
            let rel = (got - want).abs() / want;
            assert!(rel < 2e-3, "{name}: σ{i} {got} vs {want} (rel {rel:.2e})");
        }
        // ‖A − U S Vᵀ‖_F against the optimum sqrt(Σ_{i≥k} σ_i²).
        let mut err = 0.0f64;
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|t| svd.u[i * k + t] * svd.s[t] * svd.v[j * k + t])
                    .sum();
                err += (a[i * n + j] as f64 - r).powi(2);
            }
        }
        let opt: f64 = sigma[k..].iter().map(|s| s * s).sum();
        assert!(
            err.sqrt() <= 1.02 * opt.sqrt() + 1e-4,
            "{name}: error {:.4e} vs optimal {:.4e}",
            err.sqrt(),
            opt.sqrt()
        );
    }
}
