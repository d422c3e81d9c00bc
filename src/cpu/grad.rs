//! f64 references of the backward kernels (`gpu::grad`, `gpu::ops::rope_backward`) and of the
//! forwards they differentiate, on f64 inputs so that finite differences of the forward check
//! the gradient itself.

/// RMSNorm of each row of `x` ([rows, h]) times `w`, f64.
pub fn rms_norm(x: &[f64], w: &[f64], h: usize, eps: f64) -> Vec<f64> {
    x.chunks(h)
        .flat_map(|row| {
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
            row.iter()
                .zip(w)
                .map(move |(v, g)| g * v * inv)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// (dx, dw) of [`rms_norm`] for the output gradient dy.
pub fn rms_norm_backward(
    x: &[f64],
    w: &[f64],
    dy: &[f64],
    h: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; h];
    for (r, row) in x.chunks(h).enumerate() {
        let d = &dy[r * h..(r + 1) * h];
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
        let s: f64 = (0..h).map(|c| w[c] * d[c] * row[c]).sum();
        for c in 0..h {
            dx[r * h + c] = inv * w[c] * d[c] - row[c] * inv.powi(3) * s / h as f64;
            dw[c] += d[c] * row[c] * inv;
        }
    }
    (dx, dw)
}

/// silu(g) ⊙ u, f64.
pub fn swiglu(g: &[f64], u: &[f64]) -> Vec<f64> {
    g.iter()
        .zip(u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// (dg, du) of [`swiglu`].
pub fn swiglu_backward(g: &[f64], u: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let sig = |g: f64| 1.0 / (1.0 + (-g).exp());
    let dg = (0..g.len())
        .map(|i| dy[i] * u[i] * sig(g[i]) * (1.0 + g[i] * (1.0 - sig(g[i]))))
        .collect();
    let du = (0..g.len()).map(|i| dy[i] * g[i] * sig(g[i])).collect();
    (dg, du)
}

/// RoPE (rotate_half layout) of rows of `heads · 2·half` values, f64; `inverse` rotates by −θ.
pub fn rope(
    x: &[f64],
    heads: usize,
    inv_freq: &[f32],
    positions: &[u32],
    inverse: bool,
) -> Vec<f64> {
    let half = inv_freq.len();
    let d = 2 * half;
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut out = x.to_vec();
    for (r, &pos) in positions.iter().enumerate() {
        for hh in 0..heads {
            let b = r * heads * d + hh * d;
            for i in 0..half {
                // The angle as the table forms it (f32 product), its cosine and sine in f64.
                let a = (pos as f32 * inv_freq[i]) as f64;
                let (c, s) = (a.cos(), sign * a.sin());
                let (x1, x2) = (x[b + i], x[b + i + half]);
                out[b + i] = x1 * c - x2 * s;
                out[b + i + half] = x2 * c + x1 * s;
            }
        }
    }
    out
}

/// The gradient of [`rope`] (forward): dy rotated back.
pub fn rope_backward(dy: &[f64], heads: usize, inv_freq: &[f32], positions: &[u32]) -> Vec<f64> {
    rope(dy, heads, inv_freq, positions, true)
}

/// One AdamW step (torch.optim.AdamW) in f64: returns (θ, m, v) after step `t` with the
/// gradient scaled by `scale`.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    theta: &[f64],
    m: &[f64],
    v: &[f64],
    grad: &[f64],
    t: u32,
    scale: f64,
    (lr, b1, b2, eps, wd): (f64, f64, f64, f64, f64),
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bc1, bc2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
    let mut out = (theta.to_vec(), m.to_vec(), v.to_vec());
    for i in 0..theta.len() {
        let g = scale * grad[i];
        out.1[i] = b1 * m[i] + (1.0 - b1) * g;
        out.2[i] = b2 * v[i] + (1.0 - b2) * g * g;
        out.0[i] =
            theta[i] - lr * wd * theta[i] - lr * (out.1[i] / bc1) / ((out.2[i] / bc2).sqrt() + eps);
    }
    out
}

/// Central finite differences of a scalar function: ∂f/∂x_i for every i (step `eps` relative
/// to max(1, |x_i|)).
pub fn finite_differences(x: &[f64], eps: f64, f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = eps * x[i].abs().max(1.0);
            let keep = x[i];
            x[i] = keep + h;
            let up = f(&x);
            x[i] = keep - h;
            let down = f(&x);
            x[i] = keep;
            (up - down) / (2.0 * h)
        })
        .collect()
}
