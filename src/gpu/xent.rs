//! The LM head's loss and its gradient with respect to the final hidden states, without ever
//! holding T × V logits: positions are taken in blocks of P rows (P·V·4 bytes within one
//! binding and [`XENT_BLOCK_BYTES`]); for each block the logits z = h·Wᵀ are formed (GEMM),
//! turned in place into the loss's gradient dz by shaders/grad/xent.wgsl (softmax over the
//! whole row: a block of positions holds every vocabulary column, so one pass is exact), and
//! dh = dz·W is written (GEMM). The LM head itself is frozen (its gradient is not formed).
//!
//! Objectives: cross-entropy against target ids (`IGNORE` skips a position), or KL(p_t ‖ p)
//! against a teacher whose logits are formed per block the same way from its own final
//! hidden states and head (distillation). The mean over counted positions is returned and
//! dz carries the 1/count factor.

use crate::dtype::DType;
use crate::error::Result;

use super::batch::Batch;
use super::context::Gpu;
use super::gemm::{gemm, gemm_rows, GemmOp};
use super::matrix::{rows_per_chunk, GpuMatrix};
use super::ops::{check, reduce_wg, upload_u32};
use super::pipeline::{Kernel, Spec};
use super::reduce::transpose;

const XENT: Kernel = Kernel {
    name: "xent",
    template: include_str!("../../shaders/grad/xent.wgsl"),
    expand: None,
};

/// A target id that does not count (padding, the prompt of a completion).
pub const IGNORE: u32 = u32::MAX;

/// Logit block size bound (bytes).
pub const XENT_BLOCK_BYTES: u64 = 64 << 20;

/// What the logits are scored against.
pub enum Objective<'a> {
    /// Next-token ids, one per position (or [`IGNORE`]).
    Targets(&'a [u32]),
    /// A teacher's final hidden states (T × d_t, f32) and LM head (V × d_t).
    Teacher {
        hidden: &'a GpuMatrix,
        head: &'a GpuMatrix,
    },
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct XentParams {
    rows: u32,
    v: u32,
    z_off: u32,
    t_off: u32,
    row0: u32,
    wg_base: u32,
    scale: f32,
    _pad: u32,
}

/// Positions per logit block for a vocabulary of `v`.
pub fn block_rows(gpu: &Gpu, v: usize, t: usize) -> Result<usize> {
    let by_binding = rows_per_chunk(gpu, v, DType::F32, "the logits")?;
    let by_budget = (XENT_BLOCK_BYTES / (4 * v.max(1) as u64)).max(1) as usize;
    Ok(by_binding.min(by_budget).min(t.max(1)))
}

/// The mean loss over counted positions; `dh` (T × d, f32) receives its gradient with respect
/// to `h` (T × d, f32) through `head` (V × d, any dtype). `rows` forces the block size (tests).
pub fn lm_head_loss_backward(
    gpu: &Gpu,
    h: &GpuMatrix,
    head: &GpuMatrix,
    objective: &Objective<'_>,
    dh: &GpuMatrix,
    rows: Option<usize>,
) -> Result<f64> {
    lm_head_loss_backward_trainable(gpu, h, head, objective, dh, None, rows)
}

/// [`lm_head_loss_backward`] for a trainable head: `dhead` (V × d, f32) also gains the loss's
/// gradient with respect to the head, dzᵀ·h summed block by block.
pub fn lm_head_loss_backward_trainable(
    gpu: &Gpu,
    h: &GpuMatrix,
    head: &GpuMatrix,
    objective: &Objective<'_>,
    dh: &GpuMatrix,
    dhead: Option<&GpuMatrix>,
    rows: Option<usize>,
) -> Result<f64> {
    let (t, d, v) = (h.rows(), h.cols(), head.rows());
    check(
        head.cols() == d
            && dh.shape() == [t, d]
            && h.dtype() == DType::F32
            && dhead.is_none_or(|g| g.shape() == [v, d] && g.dtype() == DType::F32),
        || {
            format!(
                "lm_head_loss_backward: h {:?}, head {:?}, dh {:?}",
                h.shape(),
                head.shape(),
                dh.shape()
            )
        },
    )?;
    let (targets, count) = match objective {
        Objective::Targets(ids) => {
            check(ids.len() == t, || {
                format!(
                    "lm_head_loss_backward: {} targets for {t} positions",
                    ids.len()
                )
            })?;
            check(ids.iter().all(|&i| i == IGNORE || (i as usize) < v), || {
                format!("lm_head_loss_backward: a target is outside the vocabulary of {v}")
            })?;
            (ids.to_vec(), ids.iter().filter(|&&i| i != IGNORE).count())
        }
        Objective::Teacher { hidden, head: th } => {
            check(
                hidden.rows() == t && th.rows() == v && th.cols() == hidden.cols(),
                || {
                    format!(
                        "lm_head_loss_backward: teacher hidden {:?} and head {:?} for {t} \
                         positions of a vocabulary of {v}",
                        hidden.shape(),
                        th.shape()
                    )
                },
            )?;
            (vec![0; t], t)
        }
    };
    if t == 0 || count == 0 {
        for c in dh.chunks() {
            gpu.clear(&c.buf);
        }
        return Ok(0.0);
    }
    let kl = matches!(objective, Objective::Teacher { .. });
    let p = rows.unwrap_or(block_rows(gpu, v, t)?).clamp(1, t);
    let z = GpuMatrix::uninit(gpu, p, v)?;
    let zt = if kl {
        Some(GpuMatrix::uninit(gpu, p, v)?)
    } else {
        None
    };
    check(z.chunks().len() == 1, || {
        format!("lm_head_loss_backward: a block of {p} × {v} logits exceeds one binding")
    })?;
    let ids = upload_u32(gpu, &targets)?;
    let loss = gpu.storage(4 * t as u64, true)?;
    let wg = reduce_wg(gpu);
    let pipeline = gpu.pipeline(&XENT, &Spec::new().set("WG", wg).set("KL", kl))?;
    let max = gpu.caps().max_workgroups_per_dim as usize;
    let mut r0 = 0;
    while r0 < t {
        let n = p.min(t - r0);
        // The head's gradient takes dzᵀ of exactly the block's rows.
        let short;
        let z = if n < p && dhead.is_some() {
            short = GpuMatrix::uninit(gpu, n, v)?;
            &short
        } else {
            &z
        };
        let mut b = Batch::new(gpu);
        gemm_rows(&mut b, h, r0..r0 + n, head, GemmOp::NT, z, 0, false)?;
        if let (Objective::Teacher { hidden, head: th }, Some(zt)) = (objective, &zt) {
            gemm_rows(&mut b, hidden, r0..r0 + n, th, GemmOp::NT, zt, 0, false)?;
        }
        let zc = &z.chunks()[0].buf;
        let tc = zt.as_ref().map(|m| &m.chunks()[0].buf).unwrap_or(zc);
        let mut w = 0;
        while w < n {
            let k = (n - w).min(max);
            let params = XentParams {
                rows: n as u32,
                v: v as u32,
                z_off: 0,
                t_off: 0,
                row0: r0 as u32,
                wg_base: w as u32,
                scale: 1.0 / count as f32,
                _pad: 0,
            };
            // The teacher binding is read only in KL mode; CE binds the targets' buffer there.
            let tb = if kl { tc } else { &ids };
            b.dispatch(
                pipeline.clone(),
                &params,
                &[&ids, tb, zc, &loss],
                [k as u32, 1, 1],
            )?;
            w += k;
        }
        if let Some(dw) = dhead {
            // dW += dzᵀ · h[r0..r0+n].
            b.submit()?;
            let hb = h.copy_rows(gpu, r0..r0 + n)?;
            let zt = transpose(gpu, z)?;
            b = Batch::new(gpu);
            gemm(&mut b, &zt, &hb, GemmOp::NN, dw, true)?;
        }
        // dh[r0..r0+n] = dz · W.
        gemm_rows(&mut b, z, 0..n, head, GemmOp::NN, dh, r0, false)?;
        b.submit()?;
        r0 += n;
    }
    let bytes = gpu.read_bytes(&loss, 0, 4 * t as u64)?;
    let sum: f64 = bytemuck::cast_slice::<u8, f32>(&bytes)
        .iter()
        .map(|&l| l as f64)
        .sum();
    Ok(sum / count as f64)
}
