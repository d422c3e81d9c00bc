//! Host side of the backward kernels (shaders/grad/) and the optimizer: RMSNorm's input and
//! weight gradients, SwiGLU's, RoPE's (the inverse rotation, in `ops::rope_backward`), one
//! AdamW step and the sum of squares behind gradient-norm clipping. Each records dispatches
//! into a [`Batch`] and walks the row chunks of its operands; activations and gradients are
//! f32, weights any dtype. f64 references: [`crate::cpu::grad`].

use crate::error::Result;

use super::batch::Batch;
use super::buffer::GpuBuffer;
use super::context::Gpu;
use super::matrix::GpuMatrix;
use super::operand::operand_wgsl;
use super::ops::{check, flat_grid, reduce_wg, ROWS_Y};
use super::pipeline::{Kernel, Spec};

const RMSNORM_GRAD: Kernel = Kernel {
    name: "rmsnorm_grad",
    template: include_str!("../../shaders/grad/rmsnorm_grad.wgsl"),
    expand: None,
};
const RMSNORM_WGRAD: Kernel = Kernel {
    name: "rmsnorm_wgrad",
    template: include_str!("../../shaders/grad/rmsnorm_wgrad.wgsl"),
    expand: None,
};
const SWIGLU_GRAD: Kernel = Kernel {
    name: "swiglu_grad",
    template: include_str!("../../shaders/grad/swiglu_grad.wgsl"),
    expand: None,
};
const ADAMW: Kernel = Kernel {
    name: "adamw",
    template: include_str!("../../shaders/grad/adamw.wgsl"),
    expand: None,
};
const SUMSQ: Kernel = Kernel {
    name: "sumsq",
    template: include_str!("../../shaders/grad/sumsq.wgsl"),
    expand: None,
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormGradParams {
    rows: u32,
    h: u32,
    eps: f32,
    x_off: u32,
    dy_off: u32,
    dx_off: u32,
    row0: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct WGradParams {
    rows: u32,
    h: u32,
    x_off: u32,
    dy_off: u32,
    row0: u32,
    _pad: [u32; 3],
}

/// Gradients of `y = rmsnorm(x) ⊙ w` (x, dy: rows × h f32; w: 1 × h, any dtype): dx is written
/// (`accumulate` false) or added to (true; the residual stream's gradient), and dw (1 × h f32)
/// gains Σ_rows dy ⊙ x · r.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward(
    batch: &mut Batch<'_>,
    x: &GpuMatrix,
    w: &GpuMatrix,
    dy: &GpuMatrix,
    eps: f32,
    dx: &GpuMatrix,
    accumulate: bool,
    dw: &GpuMatrix,
) -> Result<()> {
    let (rows, h) = (x.rows(), x.cols());
    check(
        [x, dy, dx, dw]
            .iter()
            .all(|m| m.dtype() == crate::dtype::DType::F32)
            && w.shape() == [1, h]
            && dy.shape() == [rows, h]
            && dx.shape() == [rows, h]
            && dw.shape() == [1, h],
        || {
            format!(
                "rms_norm_backward: x {:?}, w {:?}, dy {:?}, dx {:?}, dw {:?}",
                x.shape(),
                w.shape(),
                dy.shape(),
                dx.shape(),
                dw.shape()
            )
        },
    )?;
    let gpu = batch.gpu();
    // r per row, for the weight gradient.
    let r = gpu.storage(4 * rows.max(1) as u64, false)?;
    let spec = Spec::new()
        .set("OPERANDS", operand_wgsl("w", 3, w.dtype(), false))
        .set("WG", reduce_wg(gpu))
        .set("ACC", accumulate as u32);
    let pipeline = gpu.pipeline(&RMSNORM_GRAD, &spec)?;
    let segments = GpuMatrix::common_segments(&[x, dy, dx], 0..rows);
    for (range, parts) in &segments {
        let (xc, x0) = parts[0];
        let (dyc, dy0) = parts[1];
        let (dxc, dx0) = parts[2];
        let n = range.len();
        let params = NormGradParams {
            rows: n as u32,
            h: h as u32,
            eps,
            x_off: (x0 * h) as u32,
            dy_off: (dy0 * h) as u32,
            dx_off: (dx0 * h) as u32,
            row0: range.start as u32,
            _pad: 0,
        };
        batch.dispatch(
            pipeline.clone(),
            &params,
            &[&xc.buf, &dyc.buf, &w.chunks()[0].buf, &dxc.buf, &r],
            [n.min(ROWS_Y) as u32, n.div_ceil(ROWS_Y) as u32, 1],
        )?;
    }
    let pipeline = gpu.pipeline(&RMSNORM_WGRAD, &Spec::new())?;
    for (range, parts) in GpuMatrix::common_segments(&[x, dy], 0..rows) {
        let ((xc, x0), (dyc, dy0)) = (parts[0], parts[1]);
        let params = WGradParams {
            rows: range.len() as u32,
            h: h as u32,
            x_off: (x0 * h) as u32,
            dy_off: (dy0 * h) as u32,
            row0: range.start as u32,
            _pad: [0; 3],
        };
        batch.dispatch(
            pipeline.clone(),
            &params,
            &[&xc.buf, &dyc.buf, &r, &dw.chunks()[0].buf],
            [h.div_ceil(64) as u32, 1, 1],
        )?;
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SwiGluGradParams {
    n: u32,
    g_off: u32,
    u_off: u32,
    dy_off: u32,
    dg_off: u32,
    du_off: u32,
    _pad: [u32; 2],
}

/// Gradients of `y = silu(g) ⊙ u`: dg and du (written) from dy; all f32 of one shape.
pub fn swiglu_backward(
    batch: &mut Batch<'_>,
    g: &GpuMatrix,
    u: &GpuMatrix,
    dy: &GpuMatrix,
    dg: &GpuMatrix,
    du: &GpuMatrix,
) -> Result<()> {
    let shape = g.shape();
    check([u, dy, dg, du].iter().all(|m| m.shape() == shape), || {
        format!(
            "swiglu_backward: g {:?}, u {:?}, dy {:?}, dg {:?}, du {:?}",
            shape,
            u.shape(),
            dy.shape(),
            dg.shape(),
            du.shape()
        )
    })?;
    let gpu = batch.gpu();
    let pipeline = gpu.pipeline(&SWIGLU_GRAD, &Spec::new())?;
    let cols = shape[1];
    for (range, parts) in GpuMatrix::common_segments(&[g, u, dy, dg, du], 0..shape[0]) {
        let off = |i: usize| (parts[i].1 * cols) as u32;
        let n = range.len() * cols;
        let params = SwiGluGradParams {
            n: n as u32,
            g_off: off(0),
            u_off: off(1),
            dy_off: off(2),
            dg_off: off(3),
            du_off: off(4),
            _pad: [0; 2],
        };
        let bufs: Vec<&GpuBuffer> = parts.iter().map(|(c, _)| &c.buf).collect();
        batch.dispatch(pipeline.clone(), &params, &bufs, flat_grid(gpu, n))?;
    }
    Ok(())
}

/// AdamW hyper-parameters (torch.optim.AdamW's meaning).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamParams {
    n: u32,
    g_off: u32,
    t_off: u32,
    m_off: u32,
    v_off: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    scale: f32,
    bc1: f32,
    bc2: f32,
    _pad: u32,
}

/// Step `t` (1-based) of AdamW on `theta` with moments `m`, `v` (all f32, one shape), the
/// gradient multiplied by `scale` first (clipping, accumulation averaging).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    batch: &mut Batch<'_>,
    opt: &AdamW,
    t: u32,
    scale: f32,
    grad: &GpuMatrix,
    theta: &GpuMatrix,
    m: &GpuMatrix,
    v: &GpuMatrix,
) -> Result<()> {
    let shape = theta.shape();
    check(
        t >= 1 && [grad, m, v].iter().all(|x| x.shape() == shape),
        || {
            format!(
                "adamw_step {t}: grad {:?}, theta {:?}, m {:?}, v {:?}",
                grad.shape(),
                shape,
                m.shape(),
                v.shape()
            )
        },
    )?;
    let gpu = batch.gpu();
    let pipeline = gpu.pipeline(&ADAMW, &Spec::new())?;
    let bc = |b: f32| (1.0 - (b as f64).powi(t as i32)) as f32;
    let cols = shape[1];
    for (range, parts) in GpuMatrix::common_segments(&[grad, theta, m, v], 0..shape[0]) {
        let off = |i: usize| (parts[i].1 * cols) as u32;
        let n = range.len() * cols;
        let params = AdamParams {
            n: n as u32,
            g_off: off(0),
            t_off: off(1),
            m_off: off(2),
            v_off: off(3),
            lr: opt.lr,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            wd: opt.weight_decay,
            scale,
            bc1: bc(opt.beta1),
            bc2: bc(opt.beta2),
            _pad: 0,
        };
        let bufs: Vec<&GpuBuffer> = parts.iter().map(|(c, _)| &c.buf).collect();
        batch.dispatch(pipeline.clone(), &params, &bufs, flat_grid(gpu, n))?;
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SumSqParams {
    n: u32,
    off: u32,
    out_off: u32,
    _pad: u32,
}

/// Σ x² over f32 matrices (f32 partial sums per workgroup, added in f64 on the host): the
/// squared global norm for gradient clipping. Submits and waits.
pub fn sum_squares(gpu: &Gpu, mats: &[&GpuMatrix]) -> Result<f64> {
    let chunks: usize = mats.iter().map(|m| m.chunks().len()).sum();
    if chunks == 0 {
        return Ok(0.0);
    }
    // Up to 64 partial sums per chunk, all in one binding.
    let fit = (gpu.caps().max_binding / 4) as usize / chunks;
    check(fit >= 1, || {
        format!("sum_squares: {chunks} chunks do not fit one binding")
    })?;
    let groups_max = fit.min(64);
    let out = gpu.storage((4 * groups_max * chunks) as u64, true)?;
    let wg = reduce_wg(gpu);
    let pipeline = gpu.pipeline(&SUMSQ, &Spec::new().set("WG", wg))?;
    let mut batch = Batch::new(gpu);
    let mut slot = 0;
    for m in mats {
        for c in m.chunks() {
            let n = c.rows * m.cols();
            let groups = n.div_ceil(wg as usize).clamp(1, groups_max);
            let params = SumSqParams {
                n: n as u32,
                off: 0,
                out_off: (slot * groups_max) as u32,
                _pad: 0,
            };
            batch.dispatch(
                pipeline.clone(),
                &params,
                &[&c.buf, &out],
                [groups as u32, 1, 1],
            )?;
            slot += 1;
        }
    }
    batch.submit()?;
    let bytes = gpu.read_bytes(&out, 0, (4 * groups_max * slot) as u64)?;
    Ok(bytemuck::cast_slice::<u8, f32>(&bytes)
        .iter()
        .map(|&v| v as f64)
        .sum())
}
