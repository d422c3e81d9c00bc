//! Rotary position embedding (rotate_half layout) and its gradient, the inverse rotation:
//! host-computed cos/sin tables and the in-place kernel (shaders/nn/rope.wgsl). Re-exported by
//! [`super::ops`].

use std::ops::Range;

use crate::error::Result;

use super::batch::Batch;
use super::buffer::GpuBuffer;
use super::context::Gpu;
use super::matrix::GpuMatrix;
use super::ops::{check, row_grid, ROWS_Y};
use super::pipeline::{Kernel, Spec};

const ROPE: Kernel = Kernel {
    name: "rope",
    template: include_str!("../../shaders/nn/rope.wgsl"),
    expand: None,
};

/// cos/sin tables for RoPE, computed on the host.
pub struct RopeTable {
    cos: GpuBuffer,
    sin: GpuBuffer,
    positions: usize,
    half: usize,
}

impl RopeTable {
    /// Tables for positions `0..positions` from per-pair inverse frequencies (length d/2).
    ///
    /// The angle is formed as transformers forms it — f32 position times f32 inverse
    /// frequency, rounded to f32 — and its cosine and sine are taken in f64.
    pub fn new(gpu: &Gpu, inv_freq: &[f32], positions: usize) -> Result<RopeTable> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(RopeTable {
            cos: gpu.upload(bytemuck::cast_slice(&cos))?,
            sin: gpu.upload(bytemuck::cast_slice(&sin))?,
            positions,
            half,
        })
    }

    pub fn positions(&self) -> usize {
        self.positions
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    rows: u32,
    heads: u32,
    half: u32,
    row_off: u32,
    x_off: u32,
    max_pos: u32,
    _pad: [u32; 2],
}

/// Rotate rows `rows` of `x` ([.., heads · d]) in place; `positions[r]` is the position of global
/// row r.
pub fn rope(
    batch: &mut Batch<'_>,
    x: &GpuMatrix,
    rows: Range<usize>,
    heads: usize,
    positions: &GpuBuffer,
    table: &RopeTable,
) -> Result<()> {
    rope_signed(batch, x, rows, heads, positions, table, false)
}

/// The gradient of [`rope`]: dy rotated back in place (the inverse rotation, its transpose).
pub fn rope_backward(
    batch: &mut Batch<'_>,
    dy: &GpuMatrix,
    rows: Range<usize>,
    heads: usize,
    positions: &GpuBuffer,
    table: &RopeTable,
) -> Result<()> {
    rope_signed(batch, dy, rows, heads, positions, table, true)
}

fn rope_signed(
    batch: &mut Batch<'_>,
    x: &GpuMatrix,
    rows: Range<usize>,
    heads: usize,
    positions: &GpuBuffer,
    table: &RopeTable,
    inverse: bool,
) -> Result<()> {
    let half = table.half;
    check(
        x.cols() == heads * 2 * half
            && rows.end <= x.rows()
            && positions.len() >= 4 * rows.end as u64,
        || {
            format!(
                "rope: x {:?} rows {rows:?}, {heads} heads of {}",
                x.shape(),
                2 * half
            )
        },
    )?;
    let gpu = batch.gpu();
    let sign = if inverse { "-1.0" } else { "1.0" };
    let pipeline = gpu.pipeline(&ROPE, &Spec::new().set("SIGN", sign))?;
    for (c, local0, n, global0) in x.segments(rows) {
        let mut r = 0;
        while r < n {
            let m = (n - r).min(ROWS_Y * ROWS_Y);
            let params = RopeParams {
                rows: m as u32,
                heads: heads as u32,
                half: half as u32,
                row_off: (global0 + r) as u32,
                x_off: ((local0 + r) * x.cols()) as u32,
                max_pos: table.positions as u32,
                _pad: [0; 2],
            };
            let wg = row_grid(heads * half, m);
            batch.dispatch(
                pipeline.clone(),
                &params,
                &[positions, &table.cos, &table.sin, &c.buf],
                wg,
            )?;
            r += m;
        }
    }
    Ok(())
}
