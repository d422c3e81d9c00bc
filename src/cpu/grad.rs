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

/// What [`lm_head_loss`] scores the logits against (as `gpu::xent::Objective`).
pub enum Scored<'a> {
    /// Target ids per position (`u32::MAX`: ignored).
    Targets(&'a [u32]),
    /// The teacher's final hidden states (t × d) and head (v × d).
    Teacher {
        hidden: &'a [f64],
        head: &'a [f64],
        d: usize,
    },
}

/// Row r of x · wᵀ (x: rows × d, w: v × d).
fn logits_row(x: &[f64], w: &[f64], r: usize, d: usize, v: usize) -> Vec<f64> {
    (0..v)
        .map(|j| (0..d).map(|c| x[r * d + c] * w[j * d + c]).sum())
        .collect()
}

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    z.iter().map(|x| x - lse).collect()
}

/// The mean loss of logits h·wᵀ (h: t × d, w: v × d) and its gradient with respect to h.
pub fn lm_head_loss(
    h: &[f64],
    w: &[f64],
    t: usize,
    d: usize,
    v: usize,
    obj: &Scored<'_>,
) -> (f64, Vec<f64>) {
    let (loss, dh, _) = lm_head_loss_grads(h, w, t, d, v, obj);
    (loss, dh)
}

/// [`lm_head_loss`] with the gradient with respect to the head w as well: (loss, dh, dw).
pub fn lm_head_loss_grads(
    h: &[f64],
    w: &[f64],
    t: usize,
    d: usize,
    v: usize,
    obj: &Scored<'_>,
) -> (f64, Vec<f64>, Vec<f64>) {
    let mut dh = vec![0.0; t * d];
    let mut dw = vec![0.0; v * d];
    let counted: Vec<bool> = (0..t)
        .map(|r| match obj {
            Scored::Targets(ids) => ids[r] != u32::MAX,
            Scored::Teacher { .. } => true,
        })
        .collect();
    let count = counted.iter().filter(|&&c| c).count();
    if count == 0 {
        return (0.0, dh, dw);
    }
    let mut total = 0.0;
    for r in (0..t).filter(|&r| counted[r]) {
        let lp = log_softmax(&logits_row(h, w, r, d, v));
        let mut dz: Vec<f64> = lp.iter().map(|l| l.exp()).collect();
        match obj {
            Scored::Targets(ids) => {
                let y = ids[r] as usize;
                total -= lp[y];
                dz[y] -= 1.0;
            }
            Scored::Teacher {
                hidden,
                head,
                d: dt,
            } => {
                let lt = log_softmax(&logits_row(hidden, head, r, *dt, v));
                for j in 0..v {
                    let pt = lt[j].exp();
                    total += pt * (lt[j] - lp[j]);
                    dz[j] -= pt;
                }
            }
        }
        for j in 0..v {
            for c in 0..d {
                dh[r * d + c] += dz[j] * w[j * d + c] / count as f64;
                dw[j * d + c] += dz[j] * h[r * d + c] / count as f64;
            }
        }
    }
    (total / count as f64, dh, dw)
}

/// Causal GQA attention of a prefill batch in f64: q [nseq·t, heads·d], k/v [nseq·t, kv·d];
/// query i attends to keys j ≤ i (and j > i − window when window > 0). Returns (o, P) with the
/// probabilities P per (sequence, head, i, j) for the backward.
#[allow(clippy::too_many_arguments)]
fn attention_probs(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    nseq: usize,
    t: usize,
    heads: usize,
    kv: usize,
    d: usize,
    window: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut o = vec![0.0; nseq * t * heads * d];
    let mut probs = vec![0.0; nseq * heads * t * t];
    let scale = 1.0 / (d as f64).sqrt();
    for b in 0..nseq {
        for h in 0..heads {
            let kh = h / (heads / kv);
            for i in 0..t {
                let lo = if window > 0 && i + 1 > window {
                    i + 1 - window
                } else {
                    0
                };
                let qi = &q[((b * t + i) * heads + h) * d..][..d];
                let s: Vec<f64> = (lo..=i)
                    .map(|j| {
                        let kj = &k[((b * t + j) * kv + kh) * d..][..d];
                        qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f64>() * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (jj, sj) in s.iter().enumerate() {
                    let j = lo + jj;
                    let pr = (sj - m).exp() / z;
                    probs[((b * heads + h) * t + i) * t + j] = pr;
                    let vj = &v[((b * t + j) * kv + kh) * d..][..d];
                    for c in 0..d {
                        o[((b * t + i) * heads + h) * d + c] += pr * vj[c];
                    }
                }
            }
        }
    }
    (o, probs)
}

/// [`attention_probs`]'s output alone.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    nseq: usize,
    t: usize,
    heads: usize,
    kv: usize,
    d: usize,
    window: usize,
) -> Vec<f64> {
    attention_probs(q, k, v, nseq, t, heads, kv, d, window).0
}

/// (dq, dk, dv) of [`attention`] for the output gradient `dout`: dV = Pᵀ dO, dP = dO Vᵀ,
/// dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = scale·dS K, dK = scale·dSᵀ Q (summed over the heads
/// sharing a kv head).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    nseq: usize,
    t: usize,
    heads: usize,
    kv: usize,
    d: usize,
    window: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (_, probs) = attention_probs(q, k, v, nseq, t, heads, kv, d, window);
    let scale = 1.0 / (d as f64).sqrt();
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..nseq {
        for h in 0..heads {
            let kh = h / (heads / kv);
            for i in 0..t {
                let qi = ((b * t + i) * heads + h) * d;
                let pr = |j: usize| probs[((b * heads + h) * t + i) * t + j];
                let dp: Vec<f64> = (0..t)
                    .map(|j| {
                        let vj = ((b * t + j) * kv + kh) * d;
                        (0..d).map(|c| dout[qi + c] * v[vj + c]).sum()
                    })
                    .collect();
                let rowsum: f64 = (0..t).map(|j| pr(j) * dp[j]).sum();
                for (j, &dpj) in dp.iter().enumerate() {
                    let p = pr(j);
                    if p == 0.0 {
                        continue;
                    }
                    let kj = ((b * t + j) * kv + kh) * d;
                    let ds = p * (dpj - rowsum);
                    for c in 0..d {
                        dq[qi + c] += scale * ds * k[kj + c];
                        dk[kj + c] += scale * ds * q[qi + c];
                        dv[kj + c] += p * dout[qi + c];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}
