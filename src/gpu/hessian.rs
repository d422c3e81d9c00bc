//! Accumulating H = Σ XᵀX over many batches of activations on the GPU.
//!
//! H is held as two f32 matrices (hi, lo) forming a compensated sum (see shaders/linalg/hessian.wgsl);
//! [`HessianAccumulator::read`] returns hi + lo in f64 with the lower triangle mirrored. Each
//! dispatch covers at most [`ROWS_PER_DISPATCH`] rows of X, which bounds the run time of one
//! dispatch (watchdogs) and keeps the per-dispatch f32 sums short.

use crate::dtype::DType;
use crate::error::{Error, Result};

use super::batch::Batch;
use super::context::Gpu;
use super::matrix::GpuMatrix;
use super::operand::{aligned, operand_wgsl};
use super::pipeline::{Kernel, Spec};

const KERNEL: Kernel = Kernel {
    name: "hessian",
    template: include_str!("../../shaders/linalg/hessian.wgsl"),
};

/// Rows of X summed in plain f32 before a compensated merge.
const BLOCK: u32 = 32;
/// Rows of X one dispatch walks.
pub const ROWS_PER_DISPATCH: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct HessianParams {
    f: u32,
    t: u32,
    x_off: u32,
    h_row0: u32,
    h_rows: u32,
    one_a: f32,
    one_b: f32,
    _pad: u32,
}

/// Running XᵀX for one linear layer's input (features = the layer's input width).
pub struct HessianAccumulator {
    features: usize,
    hi: GpuMatrix,
    lo: GpuMatrix,
    rows_seen: u64,
}

impl HessianAccumulator {
    pub fn new(gpu: &Gpu, features: usize) -> Result<Self> {
        if features == 0 {
            return Err(Error::Shape("Hessian of zero features".into()));
        }
        Ok(HessianAccumulator {
            features,
            hi: GpuMatrix::zeros(gpu, features, features)?,
            lo: GpuMatrix::zeros(gpu, features, features)?,
            rows_seen: 0,
        })
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// Rows (tokens) accumulated so far.
    pub fn rows_seen(&self) -> u64 {
        self.rows_seen
    }

    /// Record `H += XᵀX` for a batch X of shape [tokens, features] into `batch`.
    pub fn accumulate(&mut self, batch: &mut Batch<'_>, x: &GpuMatrix) -> Result<()> {
        let f = self.features;
        if x.cols() != f {
            return Err(Error::Shape(format!(
                "activations have {} features, the Hessian {f}",
                x.cols()
            )));
        }
        let gpu = batch.gpu();
        let (wg_x, wg_y) = if gpu.caps().is_cpu {
            (8u32, 8u32)
        } else {
            (16, 16)
        };
        let tile = 4 * wg_x as usize;
        for xc in x.chunks() {
            let mut t0 = 0;
            while t0 < xc.rows {
                let t = (xc.rows - t0).min(ROWS_PER_DISPATCH);
                let x_off = t0 * f;
                let spec = Spec::new()
                    .set(
                        "OPERANDS",
                        operand_wgsl("x", 1, x.dtype(), aligned(x_off, f)),
                    )
                    .set("WG_X", wg_x)
                    .set("WG_Y", wg_y)
                    .set("BLOCK", BLOCK);
                let pipeline = gpu.pipeline(&KERNEL, &spec)?;
                for (hc, lc) in self.hi.chunks().iter().zip(self.lo.chunks()) {
                    let params = HessianParams {
                        f: f as u32,
                        t: t as u32,
                        x_off: x_off as u32,
                        h_row0: hc.row0 as u32,
                        h_rows: hc.rows as u32,
                        one_a: 1.0,
                        one_b: 1.0,
                        _pad: 0,
                    };
                    let wg = [
                        f.div_ceil(tile) as u32,
                        hc.rows.div_ceil(4 * wg_y as usize) as u32,
                        1,
                    ];
                    batch.dispatch(pipeline.clone(), &params, &[&xc.buf, &hc.buf, &lc.buf], wg)?;
                }
                t0 += t;
            }
        }
        self.rows_seen += x.rows() as u64;
        Ok(())
    }

    /// Convenience: upload host activations (f32, row-major [tokens, features]) and accumulate.
    pub fn accumulate_host(&mut self, gpu: &Gpu, x: &[f32]) -> Result<()> {
        let f = self.features;
        if !x.len().is_multiple_of(f) {
            return Err(Error::Shape(format!(
                "{} values are not rows of {f} features",
                x.len()
            )));
        }
        let xm = GpuMatrix::from_f32(gpu, x.len() / f, f, DType::F32, x)?;
        let mut batch = Batch::new(gpu);
        self.accumulate(&mut batch, &xm)?;
        batch.submit()
    }

    /// The full symmetric H = Σ XᵀX (not divided by the row count), row-major, in f64.
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<f64>> {
        let f = self.features;
        let hi = self.hi.to_f32(gpu)?;
        let lo = self.lo.to_f32(gpu)?;
        let mut h = vec![0.0f64; f * f];
        for i in 0..f {
            for j in i..f {
                let v = hi[i * f + j] as f64 + lo[i * f + j] as f64;
                h[i * f + j] = v;
                h[j * f + i] = v;
            }
        }
        Ok(h)
    }
}
