//! Gradients of the linear layers a fine-tune runs through, composed from the GEMM (whose
//! f64-reference tests cover every product): y = x·Wᵀ with W frozen in any stored dtype
//! (quantized weights are dequantized into W first, as the forward does), and the low-rank
//! term y += s·(x·Aᵀ)·Bᵀ that both LoRA (A: r × n, B: m × r, s = α/r) and CALDERA's factors
//! (A = R, B = L, s = 1) add. Transposed operands (dyᵀ, duᵀ) are formed by the transpose
//! kernel, so each function submits its own work in order.

use crate::error::Result;

use super::batch::Batch;
use super::context::Gpu;
use super::gemm::{gemm, gemm_scaled, GemmOp};
use super::matrix::GpuMatrix;
use super::ops::check;
use super::reduce::transpose;

/// dx (+)= dy·W for y = x·Wᵀ (dy: T × m, W: m × n, dx: T × n f32).
pub fn linear_backward_input(
    gpu: &Gpu,
    dy: &GpuMatrix,
    w: &GpuMatrix,
    dx: &GpuMatrix,
    accumulate: bool,
) -> Result<()> {
    let mut b = Batch::new(gpu);
    gemm(&mut b, dy, w, GemmOp::NN, dx, accumulate)?;
    b.submit()
}

/// dW (+)= dyᵀ·x for y = x·Wᵀ (a trainable dense weight; dW: m × n f32).
pub fn linear_backward_weight(
    gpu: &Gpu,
    x: &GpuMatrix,
    dy: &GpuMatrix,
    dw: &GpuMatrix,
    accumulate: bool,
) -> Result<()> {
    let dyt = transpose(gpu, dy)?;
    let mut b = Batch::new(gpu);
    gemm(&mut b, &dyt, x, GemmOp::NN, dw, accumulate)?;
    b.submit()
}

/// The low-rank term's forward: u = x·Aᵀ (T × r, returned: the backward needs it) and
/// y += s·u·Bᵀ.
pub fn low_rank_forward(
    gpu: &Gpu,
    x: &GpuMatrix,
    a: &GpuMatrix,
    b: &GpuMatrix,
    s: f32,
    y: &GpuMatrix,
) -> Result<GpuMatrix> {
    let u = GpuMatrix::uninit(gpu, x.rows(), a.rows())?;
    let mut batch = Batch::new(gpu);
    gemm(&mut batch, x, a, GemmOp::NT, &u, false)?;
    gemm_scaled(&mut batch, &u, b, GemmOp::NT, y, true, s)?;
    batch.submit()?;
    Ok(u)
}

/// Gradients of y += s·(x·Aᵀ)·Bᵀ given u = x·Aᵀ: dA += duᵀ·x and dB += s·dyᵀ·u with
/// du = s·dy·B, and dx += du·A when `dx` is given (A: r × n, B: m × r, all f32 but A and B,
/// which may be any dtype).
#[allow(clippy::too_many_arguments)]
pub fn low_rank_backward(
    gpu: &Gpu,
    x: &GpuMatrix,
    a: &GpuMatrix,
    b: &GpuMatrix,
    s: f32,
    u: &GpuMatrix,
    dy: &GpuMatrix,
    da: &GpuMatrix,
    db: &GpuMatrix,
    dx: Option<&GpuMatrix>,
) -> Result<()> {
    let (t, n, m, r) = (x.rows(), x.cols(), b.rows(), a.rows());
    check(
        a.cols() == n
            && b.cols() == r
            && u.shape() == [t, r]
            && dy.shape() == [t, m]
            && da.shape() == [r, n]
            && db.shape() == [m, r]
            && dx.is_none_or(|d| d.shape() == [t, n]),
        || {
            format!(
                "low_rank_backward: x {:?}, A {:?}, B {:?}, u {:?}, dy {:?}",
                x.shape(),
                a.shape(),
                b.shape(),
                u.shape(),
                dy.shape()
            )
        },
    )?;
    let du = GpuMatrix::uninit(gpu, t, r)?;
    let mut batch = Batch::new(gpu);
    gemm_scaled(&mut batch, dy, b, GemmOp::NN, &du, false, s)?;
    if let Some(dx) = dx {
        gemm(&mut batch, &du, a, GemmOp::NN, dx, true)?;
    }
    batch.submit()?;
    let (dyt, dut) = (transpose(gpu, dy)?, transpose(gpu, &du)?);
    let mut batch = Batch::new(gpu);
    gemm_scaled(&mut batch, &dyt, u, GemmOp::NN, db, true, s)?;
    gemm(&mut batch, &dut, x, GemmOp::NN, da, true)?;
    batch.submit()
}
