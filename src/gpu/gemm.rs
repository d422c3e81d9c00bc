//! General matrix multiply on the GPU: `C (+)= A · B` or `C (+)= A · Bᵀ`, with A and B stored as
//! f32, f16 or bf16 and f32 accumulation and output.
//!
//! Chunked operands: A and C are walked chunk against chunk over the rows they share. For
//! `A · B`, B's chunks are ranges of the contraction (k), so they are accumulated one after the
//! other into C; for `A · Bᵀ`, B's chunks are ranges of C's columns and write disjoint blocks.

use std::ops::Range;

use crate::error::{Error, Result};

use super::batch::Batch;
use super::context::Gpu;
use super::matrix::GpuMatrix;
use super::operand::{aligned, operand_wgsl};
use super::pipeline::{Kernel, Spec};

const KERNEL: Kernel = Kernel {
    name: "gemm",
    template: include_str!("../../shaders/linalg/gemm.wgsl"),
};

/// Output tile per workgroup: each invocation computes `tm`×4 elements, a workgroup
/// (`tm`·`wg_y`)×(4·`wg_x`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmConfig {
    pub wg_x: u32,
    pub wg_y: u32,
    pub tm: u32,
}

impl GemmConfig {
    /// Tile choice per adapter: 64×64 tiles (256 invocations) on GPUs; 32×32 on CPU adapters,
    /// whose SIMD lanes gain nothing from bigger groups and whose caches like smaller tiles.
    pub fn for_gpu(gpu: &Gpu) -> GemmConfig {
        if let Some(c) = Self::tile_override() {
            return c;
        }
        let caps = gpu.caps();
        if caps.is_cpu {
            GemmConfig {
                wg_x: 8,
                wg_y: 1,
                tm: 8,
            }
        } else if caps.max_invocations < 256 {
            GemmConfig {
                wg_x: 8,
                wg_y: 8,
                tm: 4,
            }
        } else {
            GemmConfig {
                wg_x: 16,
                wg_y: 16,
                tm: 4,
            }
        }
    }
    /// The configuration for a product of `m` rows on `gpu`: [`GemmConfig::for_gpu`], and
    /// for fewer rows than its tile (decode: one token per sequence) one row per invocation
    /// or a few — a TM-row tile would compute TM − m clamped rows for nothing — in a wider
    /// workgroup of the same size (the same kernel; measured on lavapipe at 1×4096·4096ᵀ:
    /// 8×1×8 0.68 GFLOP/s, 64×1×1 2.05). `PUMICE_GEMM_TILE` is taken as it is.
    pub fn for_product(gpu: &Gpu, m: usize) -> GemmConfig {
        let base = Self::for_gpu(gpu);
        if Self::tile_override().is_some() || m >= base.tile_m() {
            return base;
        }
        let tm = (m.max(1).next_power_of_two() as u32).min(base.tm);
        let wg_x = (base.wg_x * base.wg_y * base.tm / tm)
            .min(gpu.caps().max_invocations)
            .max(1);
        GemmConfig { wg_x, wg_y: 1, tm }
    }

    /// `PUMICE_GEMM_TILE` (used for tuning), read once per process: every product asks.
    fn tile_override() -> Option<GemmConfig> {
        static TILE: std::sync::OnceLock<Option<GemmConfig>> = std::sync::OnceLock::new();
        *TILE.get_or_init(|| {
            std::env::var("PUMICE_GEMM_TILE")
                .ok()
                .and_then(|v| Self::parse(&v))
        })
    }

    /// `WGXxWGYxTM`, e.g. `8x1x8` (the `PUMICE_GEMM_TILE` override used for tuning).
    pub fn parse(s: &str) -> Option<GemmConfig> {
        let v: Vec<u32> = s
            .split('x')
            .map(|p| p.trim().parse().ok())
            .collect::<Option<_>>()?;
        match v[..] {
            [wg_x, wg_y, tm] if wg_x > 0 && wg_y > 0 && (1..=16).contains(&tm) => {
                Some(GemmConfig { wg_x, wg_y, tm })
            }
            _ => None,
        }
    }
    fn tile_m(&self) -> usize {
        (self.tm * self.wg_y) as usize
    }
    fn tile_n(&self) -> usize {
        4 * self.wg_x as usize
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct GemmParams {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
}

/// Which product to form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmOp {
    /// C = A · B, B stored [k, n].
    NN,
    /// C = A · Bᵀ, B stored [n, k] (a linear layer's weight).
    NT,
}

impl GemmOp {
    /// Columns of op(B), i.e. of C.
    pub fn out_cols(self, b: &GpuMatrix) -> usize {
        match self {
            GemmOp::NN => b.cols(),
            GemmOp::NT => b.rows(),
        }
    }
}

/// Record `C (+)= A · op(B)` into `batch`. C must be f32 with shape [A.rows, n].
pub fn gemm(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    accumulate: bool,
) -> Result<()> {
    if c.rows() != a.rows() || c.cols() != op.out_cols(b) {
        return Err(Error::Shape(format!(
            "gemm {op:?}: A {:?}, B {:?}, C {:?}",
            a.shape(),
            b.shape(),
            c.shape()
        )));
    }
    gemm_rows(batch, a, 0..a.rows(), b, op, c, 0, accumulate)
}

/// Record `C[c_row0 + i] (+)= A[a_rows.start + i] · op(B)` for `i < a_rows.len()`: a product
/// over a range of A's rows written at an offset in C (e.g. new tokens into a KV cache, or the
/// LM head over a block of positions). C must be f32.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rows(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    a_rows: Range<usize>,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    c_row0: usize,
    accumulate: bool,
) -> Result<()> {
    if c.cols() != op.out_cols(b) {
        return Err(Error::Shape(format!(
            "gemm_rows: C has {} columns, op(B) {}",
            c.cols(),
            op.out_cols(b)
        )));
    }
    gemm_region(batch, a, a_rows, b, op, c, c_row0, 0, accumulate)
}

/// Like [`gemm_rows`], writing the product into the columns `c_col0..c_col0 + n` of C (C may
/// be wider than op(B)); e.g. GPTQ's lazy update of the columns after a block.
#[allow(clippy::too_many_arguments)]
pub fn gemm_region(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    a_rows: Range<usize>,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    c_row0: usize,
    c_col0: usize,
    accumulate: bool,
) -> Result<()> {
    let k = a.cols();
    let (kb, n) = match op {
        GemmOp::NN => (b.rows(), b.cols()),
        GemmOp::NT => (b.cols(), b.rows()),
    };
    let m = a_rows.len();
    let ldc = c.cols();
    if kb != k || c_col0 + n > ldc || a_rows.end > a.rows() || c_row0 + m > c.rows() {
        return Err(Error::Shape(format!(
            "gemm {op:?}: A {:?} rows {a_rows:?}, B {:?}, C {:?} from row {c_row0}",
            a.shape(),
            b.shape(),
            c.shape()
        )));
    }
    if c.dtype() != crate::dtype::DType::F32 {
        return Err(Error::Shape(format!(
            "gemm output must be f32, not {}",
            c.dtype()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(Error::Shape(
            "gemm with an empty contraction (k = 0)".into(),
        ));
    }
    let gpu = batch.gpu();
    let cfg = GemmConfig::for_product(gpu, m);
    let max_wg = gpu.caps().max_workgroups_per_dim as usize;
    let rows_per_dispatch = max_wg * cfg.tile_m();
    let cols_per_dispatch = max_wg * cfg.tile_n();
    // Contraction per dispatch within the loop budget: k/4 steps of (1 + TM) iterations, a
    // tail of < 4, and the TM-row set-up and store loops (5 each).
    let tm = cfg.tm as u64;
    let k_span =
        ((gpu.caps().loop_budget().saturating_sub(16 * tm + 8) / (1 + tm)) * 4).max(4) as usize;
    // Row i of A (in a_rows) goes to row i + shift of C.
    let shift = c_row0 as isize - a_rows.start as isize;

    for ac in a.chunks() {
        let ar0 = ac.row0.max(a_rows.start);
        let ar1 = (ac.row0 + ac.rows).min(a_rows.end);
        for cc in c.chunks() {
            // The A rows of this chunk pair, in A's coordinates.
            let r0 = ar0.max((cc.row0 as isize - shift).max(0) as usize);
            let r1 = ar1.min(((cc.row0 + cc.rows) as isize - shift).max(0) as usize);
            if r0 >= r1 {
                continue;
            }
            for (bi, bc) in b.chunks().iter().enumerate() {
                // (first column of C, columns, first k, contraction length, accumulate)
                let (col0, ncols, k0, kc, acc) = match op {
                    GemmOp::NT => (bc.row0, bc.rows, 0, k, accumulate),
                    GemmOp::NN => (0, n, bc.row0, bc.rows, accumulate || bi > 0),
                };
                let mut rs = r0;
                while rs < r1 {
                    let rn = (r1 - rs).min(rows_per_dispatch);
                    let c_local = (rs as isize + shift) as usize - cc.row0;
                    let mut cs = 0;
                    while cs < ncols {
                        let cn = (ncols - cs).min(cols_per_dispatch);
                        let mut ks = 0;
                        while ks < kc {
                            let kn = (kc - ks).min(k_span);
                            let a_off = (rs - ac.row0) * k + k0 + ks;
                            let b_off = match op {
                                GemmOp::NT => cs * k + ks,
                                GemmOp::NN => cs + ks * b.cols(),
                            };
                            let params = GemmParams {
                                m: rn as u32,
                                n: cn as u32,
                                k: kn as u32,
                                lda: k as u32,
                                ldb: b.cols() as u32,
                                ldc: ldc as u32,
                                a_off: a_off as u32,
                                b_off: b_off as u32,
                                c_off: (c_local * ldc + c_col0 + col0 + cs) as u32,
                                accumulate: (acc || ks > 0) as u32,
                                _pad0: 0,
                                _pad1: 0,
                            };
                            let a_al = aligned(a_off, k);
                            let b_al = aligned(b_off, b.cols());
                            let spec = Spec::new()
                                .set(
                                    "OPERANDS",
                                    format!(
                                        "{}{}",
                                        operand_wgsl("a", 1, a.dtype(), a_al),
                                        operand_wgsl("b", 2, b.dtype(), b_al)
                                    ),
                                )
                                .set("WG_X", cfg.wg_x)
                                .set("WG_Y", cfg.wg_y)
                                .set("TM", cfg.tm)
                                .set("B_T", op == GemmOp::NT);
                            let pipeline = gpu.pipeline(&KERNEL, &spec)?;
                            let wg = [
                                cn.div_ceil(cfg.tile_n()) as u32,
                                rn.div_ceil(cfg.tile_m()) as u32,
                                1,
                            ];
                            batch.dispatch(pipeline, &params, &[&ac.buf, &bc.buf, &cc.buf], wg)?;
                            ks += kn;
                        }
                        cs += cn;
                    }
                    rs += rn;
                }
            }
        }
    }
    Ok(())
}

/// `A · op(B)` into a new f32 matrix, submitted at once.
pub fn matmul(gpu: &Gpu, a: &GpuMatrix, b: &GpuMatrix, op: GemmOp) -> Result<GpuMatrix> {
    let c = GpuMatrix::uninit(gpu, a.rows(), op.out_cols(b))?;
    let mut batch = Batch::new(gpu);
    gemm(&mut batch, a, b, op, &c, false)?;
    batch.submit()?;
    Ok(c)
}
