//! Reductions over rows: per-row logit statistics (NLL, KL, argmaxes: evaluation never reads
//! logits back), top-k index sets (LSAQ importance), and the transpose. Re-exported by
//! [`super::ops`].

use crate::error::{Error, Result};

use super::batch::Batch;
use super::buffer::GpuBuffer;
use super::context::Gpu;
use super::matrix::GpuMatrix;
use super::operand::operand_wgsl;
use super::ops::{check, reduce_wg, ROWS_Y};
use super::pipeline::{Kernel, Spec};

const TRANSPOSE: Kernel = Kernel {
    name: "transpose",
    template: include_str!("../../shaders/reduce/transpose.wgsl"),
    expand: None,
};
const TOPK: Kernel = Kernel {
    name: "topk",
    template: include_str!("../../shaders/reduce/topk.wgsl"),
    expand: None,
};
const VOTE: Kernel = Kernel {
    name: "vote",
    template: include_str!("../../shaders/reduce/vote.wgsl"),
    expand: None,
};
const LOGITS: Kernel = Kernel {
    name: "logits",
    template: include_str!("../../shaders/reduce/logits.wgsl"),
    expand: None,
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LogitParams {
    rows: u32,
    v: u32,
    z_off: u32,
    row_base: u32,
    wg_base: u32,
    _pad: [u32; 3],
}

/// Per-row statistics of logits `z` ([rows, vocab]): writes 4 floats per row into `out`
/// (from `out_row0`): NLL of `targets[out_row0 + r]`, KL(softmax(z_ref) ‖ softmax(z)) when
/// `z_ref` is given (else 0), argmax z, argmax z_ref (else argmax z).
pub fn logit_stats(
    batch: &mut Batch<'_>,
    z: &GpuMatrix,
    z_ref: Option<&GpuMatrix>,
    targets: &GpuBuffer,
    out: &GpuBuffer,
    out_row0: usize,
) -> Result<()> {
    if let Some(r) = z_ref {
        check(r.shape() == z.shape() && r.same_layout(z), || {
            format!("logit_stats: {:?} vs ref {:?}", z.shape(), r.shape())
        })?;
    }
    check(
        out.len() >= 16 * (out_row0 + z.rows()) as u64
            && targets.len() >= 4 * (out_row0 + z.rows()) as u64,
        || "logit_stats: output or targets too short".into(),
    )?;
    let gpu = batch.gpu();
    // Each invocation scans v / WG logits twice, then two tree reductions.
    let wg = reduce_wg(gpu) as u64;
    let iterations = 2 * (z.cols() as u64).div_ceil(wg) + 2 * 32;
    check(iterations <= gpu.caps().loop_budget(), || {
        format!(
            "logit_stats: a vocabulary of {} needs {iterations} loop iterations per invocation, \
             more than this adapter runs ({})",
            z.cols(),
            gpu.caps().loop_budget()
        )
    })?;
    let spec = Spec::new()
        .set("WG", reduce_wg(gpu))
        .set("KL", z_ref.is_some());
    let pipeline = gpu.pipeline(&LOGITS, &spec)?;
    let max = gpu.caps().max_workgroups_per_dim as usize;
    for (i, zc) in z.chunks().iter().enumerate() {
        let rc = z_ref.map(|r| &r.chunks()[i].buf).unwrap_or(&zc.buf);
        let mut r = 0;
        while r < zc.rows {
            let n = (zc.rows - r).min(max);
            let params = LogitParams {
                rows: zc.rows as u32,
                v: z.cols() as u32,
                z_off: 0,
                row_base: (out_row0 + zc.row0) as u32,
                wg_base: r as u32,
                _pad: [0; 3],
            };
            batch.dispatch(
                pipeline.clone(),
                &params,
                &[&zc.buf, rc, targets, out],
                [n as u32, 1, 1],
            )?;
            r += n;
        }
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct VoteParams {
    rows: u32,
    v: u32,
    wg_base: u32,
    _pad: u32,
}

/// One exit's vote (Edge-LLM): `out = max(out, log_softmax(z))` per element, or
/// `out = log_softmax(z)` when `first`. After every exit, `out` holds log max_e softmax(z_e):
/// logits whose softmax is the renormalized vote ([`logit_stats`] and sampling read it as
/// they read a model's logits). `z` and `out` have the same shape and chunk layout.
pub fn vote(batch: &mut Batch<'_>, z: &GpuMatrix, out: &GpuMatrix, first: bool) -> Result<()> {
    check(
        z.shape() == out.shape()
            && z.same_layout(out)
            && z.dtype() == crate::dtype::DType::F32
            && out.dtype() == crate::dtype::DType::F32,
        || {
            format!(
                "vote: {:?} {} vs {:?} {} (same shape and layout, f32)",
                z.shape(),
                z.dtype(),
                out.shape(),
                out.dtype()
            )
        },
    )?;
    let gpu = batch.gpu();
    let wg = reduce_wg(gpu) as u64;
    let iterations = 2 * (z.cols() as u64).div_ceil(wg) + 32;
    check(iterations <= gpu.caps().loop_budget(), || {
        format!(
            "vote: a vocabulary of {} needs {iterations} loop iterations per invocation, more \
             than this adapter runs ({})",
            z.cols(),
            gpu.caps().loop_budget()
        )
    })?;
    let spec = Spec::new().set("WG", reduce_wg(gpu)).set("FIRST", first);
    let pipeline = gpu.pipeline(&VOTE, &spec)?;
    let max = gpu.caps().max_workgroups_per_dim as usize;
    for (zc, oc) in z.chunks().iter().zip(out.chunks()) {
        let mut r = 0;
        while r < zc.rows {
            let n = (zc.rows - r).min(max);
            let params = VoteParams {
                rows: zc.rows as u32,
                v: z.cols() as u32,
                wg_base: r as u32,
                _pad: 0,
            };
            batch.dispatch(
                pipeline.clone(),
                &params,
                &[&zc.buf, &oc.buf],
                [n as u32, 1, 1],
            )?;
            r += n;
        }
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TransposeParams {
    m: u32,
    n: u32,
    in_row0: u32,
    in_rows: u32,
    out_row0: u32,
    out_rows: u32,
    _pad: [u32; 2],
}

/// `xᵀ` as a new f32 matrix (x may be chunked and of any dtype).
pub fn transpose(gpu: &Gpu, x: &GpuMatrix) -> Result<GpuMatrix> {
    let (m, n) = (x.rows(), x.cols());
    let out = GpuMatrix::uninit(gpu, n, m)?;
    let spec = Spec::new().set("OPERANDS", operand_wgsl("x", 1, x.dtype(), false));
    let pipeline = gpu.pipeline(&TRANSPOSE, &spec)?;
    let max = gpu.caps().max_workgroups_per_dim as usize * 16;
    if m > max || n > max {
        return Err(Error::Shape(format!(
            "transpose of {m}×{n} exceeds {max} rows or columns per dispatch"
        )));
    }
    let mut b = Batch::new(gpu);
    for ic in x.chunks() {
        for oc in out.chunks() {
            let params = TransposeParams {
                m: m as u32,
                n: n as u32,
                in_row0: ic.row0 as u32,
                in_rows: ic.rows as u32,
                out_row0: oc.row0 as u32,
                out_rows: oc.rows as u32,
                _pad: [0; 2],
            };
            let wg = [oc.rows.div_ceil(16) as u32, ic.rows.div_ceil(16) as u32, 1];
            b.dispatch(pipeline.clone(), &params, &[&ic.buf, &oc.buf], wg)?;
        }
    }
    b.submit()?;
    Ok(out)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TopkParams {
    rows: u32,
    v: u32,
    row_base: u32,
    c_begin: u32,
    c_end: u32,
    _pad: [u32; 3],
}

/// Largest k supported by [`top_k`].
pub const MAX_TOP_K: usize = 64;

/// Indices of the `k` largest entries of each row of `z` (descending; ties to the lower
/// index), written as k u32 per row to `out` starting at row `out_row0`.
pub fn top_k(
    batch: &mut Batch<'_>,
    z: &GpuMatrix,
    k: usize,
    out: &GpuBuffer,
    out_row0: usize,
) -> Result<()> {
    check((1..=MAX_TOP_K).contains(&k) && k <= z.cols(), || {
        format!(
            "top_k: k = {k} must be within 1..={MAX_TOP_K} and at most the row length {}",
            z.cols()
        )
    })?;
    check(out.len() >= (4 * k * (out_row0 + z.rows())) as u64, || {
        "top_k: output too short".into()
    })?;
    let gpu = batch.gpu();
    let pipeline = gpu.pipeline(&TOPK, &Spec::new().set("K", k))?;
    // Columns per dispatch within the loop budget: each column costs at most k + 2 iterations
    // (the scan and an insertion shifting k entries); loading and storing cost 2k.
    let span =
        (gpu.caps().loop_budget().saturating_sub(2 * k as u64) / (k as u64 + 2)).max(1) as usize;
    for zc in z.chunks() {
        let groups = zc.rows.div_ceil(64);
        let wg = [groups.min(ROWS_Y) as u32, groups.div_ceil(ROWS_Y) as u32, 1];
        let mut c0 = 0;
        while c0 < z.cols() {
            let c1 = (c0 + span).min(z.cols());
            let params = TopkParams {
                rows: zc.rows as u32,
                v: z.cols() as u32,
                row_base: (out_row0 + zc.row0) as u32,
                c_begin: c0 as u32,
                c_end: c1 as u32,
                _pad: [0; 3],
            };
            batch.dispatch(pipeline.clone(), &params, &[&zc.buf, out], wg)?;
            c0 = c1;
        }
    }
    Ok(())
}
