//! Quantizers on the GPU: round-to-nearest, GPTQ/LDLQ (lazy blocks, the column loop in one
//! invocation per row, the lazy update as a GEMM), and dequantization of packed codes.
//! Conventions and CPU references: `crate::quant`.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::{Grid, PreparedHessian, Quantized};

use super::batch::Batch;
use super::buffer::GpuBuffer;
use super::context::Gpu;
use super::gemm::{gemm_region, GemmOp};
use super::matrix::GpuMatrix;
use super::operand::operand_wgsl;
use super::ops::row_grid;
use super::pipeline::{Kernel, Spec};

const COMMON: &str = include_str!("../../shaders/quant_common.wgsl");
const RTN: Kernel = Kernel {
    name: "rtn",
    template: include_str!("../../shaders/rtn.wgsl"),
};
const GPTQ_BLOCK: Kernel = Kernel {
    name: "gptq_block",
    template: include_str!("../../shaders/gptq_block.wgsl"),
};
const DEQUANT: Kernel = Kernel {
    name: "dequant",
    template: include_str!("../../shaders/dequant.wgsl"),
};

/// Unpacked quantization result on the GPU: codes as u32 per weight (rows × cols, stored column
/// order), f32 scales and zeros (rows × groups, already f16-rounded).
pub struct GpuQuantized {
    pub rows: usize,
    pub cols: usize,
    pub grid: Grid,
    pub codes: GpuMatrix,
    pub scales: GpuMatrix,
    pub zeros: GpuMatrix,
    pub perm: Option<Vec<u32>>,
}

impl GpuQuantized {
    /// Read back into the host representation (codes, scales, zeros, permutation).
    pub fn download(&self, gpu: &Gpu) -> Result<Quantized> {
        let codes: Vec<u32> = self
            .codes
            .to_f32(gpu)?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        Ok(Quantized {
            rows: self.rows,
            cols: self.cols,
            grid: self.grid,
            codes,
            scales: self.scales.to_f32(gpu)?,
            zeros: self.zeros.to_f32(gpu)?,
            perm: self.perm.clone(),
        })
    }
}

fn single<'m>(m: &'m GpuMatrix, what: &str) -> Result<&'m GpuBuffer> {
    match m.chunks() {
        [c] => Ok(&c.buf),
        _ => Err(Error::TooLarge {
            what: format!("{what} ({:?})", m.shape()),
            bytes: (m.rows() * m.cols() * 4) as u64,
            limit: 0,
        }),
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RtnParams {
    rows: u32,
    n: u32,
    g: u32,
    ng: u32,
    maxq: f32,
    symmetric: u32,
    sz_row0: u32,
    w_off: u32,
    c_off: u32,
    clip: u32,
    _pad: [u32; 2],
}

/// The zero points of a symmetric grid (not stored in checkpoints): rows × groups copies of
/// [`Grid::symmetric_zero`]. The one place both the reader and the compressor build them.
pub fn symmetric_zeros(gpu: &Gpu, grid: Grid, rows: usize, groups: usize) -> Result<GpuMatrix> {
    GpuMatrix::from_f32(
        gpu,
        rows,
        groups,
        DType::F32,
        &vec![grid.symmetric_zero(); rows * groups],
    )
}

/// Round-to-nearest quantization of `w` (rows × cols, any float dtype).
pub fn rtn(gpu: &Gpu, w: &GpuMatrix, grid: Grid) -> Result<GpuQuantized> {
    let (m, n) = (w.rows(), w.cols());
    let (g, ng) = (grid.group_len(n), grid.groups(n));
    let codes = GpuMatrix::uninit(gpu, m, n)?;
    let scales = GpuMatrix::uninit(gpu, m, ng)?;
    let zeros = GpuMatrix::uninit(gpu, m, ng)?;
    let sbuf = single(&scales, "RTN scales")?;
    let zbuf = single(&zeros, "RTN zeros")?;
    let spec = Spec::new()
        .set("COMMON", COMMON)
        .set("OPERANDS", operand_wgsl("w", 1, w.dtype(), false));
    let pipeline = gpu.pipeline(&RTN, &spec)?;
    let mut b = Batch::new(gpu);
    for cc in codes.chunks() {
        for (wc, w_local, rows, r0) in w.segments(cc.row0..cc.row0 + cc.rows) {
            let params = RtnParams {
                rows: rows as u32,
                n: n as u32,
                g: g as u32,
                ng: ng as u32,
                maxq: grid.maxq() as f32,
                symmetric: grid.symmetric as u32,
                sz_row0: r0 as u32,
                w_off: (w_local * n) as u32,
                c_off: ((r0 - cc.row0) * n) as u32,
                clip: grid.clip as u32,
                _pad: [0; 2],
            };
            let wg = row_grid(ng, rows);
            b.dispatch(
                pipeline.clone(),
                &params,
                &[&wc.buf, &cc.buf, sbuf, zbuf],
                wg,
            )?;
        }
    }
    b.submit()?;
    Ok(GpuQuantized {
        rows: m,
        cols: n,
        grid,
        codes,
        scales,
        zeros,
        perm: None,
    })
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GptqParams {
    rows: u32,
    n: u32,
    i1: u32,
    bw: u32,
    g: u32,
    ng: u32,
    maxq: f32,
    symmetric: u32,
    w_off: u32,
    s_row0: u32,
    e_row0: u32,
    clip: u32,
}

/// GPTQ/LDLQ of `w` (rows × cols, any float dtype) with a prepared Hessian. Columns go in
/// `prep.perm` order in lazy blocks of `block`; everything runs in one submission.
pub fn gptq(
    gpu: &Gpu,
    w: &[f32],
    rows: usize,
    cols: usize,
    prep: &PreparedHessian,
    grid: Grid,
    block: usize,
) -> Result<GpuQuantized> {
    let (m, n) = (rows, cols);
    if prep.n != n || w.len() != m * n {
        return Err(Error::Shape(format!(
            "gptq: W {m}×{n} ({} values), Hessian {}",
            w.len(),
            prep.n
        )));
    }
    let (g, ng) = (grid.group_len(n), grid.groups(n));
    // Working copy in processing order, dead inputs zeroed.
    let mut wk = vec![0.0f32; m * n];
    let dead: std::collections::HashSet<usize> = prep.dead.iter().copied().collect();
    for r in 0..m {
        for j in 0..n {
            let src = prep.perm.as_ref().map_or(j, |p| p[j] as usize);
            wk[r * n + j] = if dead.contains(&src) {
                0.0
            } else {
                w[r * n + src]
            };
        }
    }
    let wm = GpuMatrix::from_f32(gpu, m, n, DType::F32, &wk)?;
    let codes = GpuMatrix::uninit(gpu, m, n)?;
    let scales = GpuMatrix::uninit(gpu, m, ng)?;
    let zeros = GpuMatrix::uninit(gpu, m, ng)?;
    let pipeline = gpu.pipeline(&GPTQ_BLOCK, &Spec::new().set("COMMON", COMMON))?;
    let block = block.max(1);
    let u = &prep.u;
    let mut b = Batch::new(gpu);
    // Per-block operands stay alive until the batch is submitted.
    let mut keep: Vec<GpuMatrix> = Vec::new();
    let mut i1 = 0;
    while i1 < n {
        let i2 = (i1 + block).min(n);
        let bw = i2 - i1;
        let diag: Vec<f32> = (0..bw * bw)
            .map(|k| u[(i1 + k / bw) * n + i1 + k % bw] as f32)
            .collect();
        let ud = GpuMatrix::from_f32(gpu, bw, bw, DType::F32, &diag)?;
        let e = GpuMatrix::uninit(gpu, m, bw)?;
        for (rows, parts) in GpuMatrix::common_segments(&[&wm, &codes, &scales, &zeros, &e], 0..m) {
            let [(wc, w_local), (cc, _), (sc, s_local), (zc, _), (ec, e_local)] = parts[..] else {
                unreachable!("five matrices in, five parts out")
            };
            let params = GptqParams {
                rows: rows.len() as u32,
                n: n as u32,
                i1: i1 as u32,
                bw: bw as u32,
                g: g as u32,
                ng: ng as u32,
                maxq: grid.maxq() as f32,
                symmetric: grid.symmetric as u32,
                w_off: (w_local * n) as u32,
                s_row0: s_local as u32,
                e_row0: e_local as u32,
                clip: grid.clip as u32,
            };
            b.dispatch(
                pipeline.clone(),
                &params,
                &[
                    &wc.buf,
                    &ud.chunks()[0].buf,
                    &cc.buf,
                    &sc.buf,
                    &zc.buf,
                    &ec.buf,
                ],
                [rows.len().div_ceil(64) as u32, 1, 1],
            )?;
        }
        if i2 < n {
            let tail: Vec<f32> = (0..bw * (n - i2))
                .map(|k| u[(i1 + k / (n - i2)) * n + i2 + k % (n - i2)] as f32)
                .collect();
            let ut = GpuMatrix::from_f32(gpu, bw, n - i2, DType::F32, &tail)?;
            gemm_region(&mut b, &e, 0..m, &ut, GemmOp::NN, &wm, 0, i2, true)?;
            keep.push(ut);
        }
        keep.push(ud);
        keep.push(e);
        i1 = i2;
    }
    b.submit()?;
    drop(keep);
    Ok(GpuQuantized {
        rows: m,
        cols: n,
        grid,
        codes,
        scales,
        zeros,
        perm: prep.perm.clone(),
    })
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DequantParams {
    rows: u32,
    n: u32,
    words: u32,
    bits: u32,
    g: u32,
    ng: u32,
    c_off: u32,
    o_off: u32,
    sz_row0: u32,
    has_perm: u32,
    _pad: [u32; 2],
}

/// Packed codes (rows × words u32, stored as a 4-byte matrix), scales and zeros (rows × groups,
/// f16 or f32) and an optional permutation, ready to dequantize on the GPU.
pub struct PackedWeight {
    pub rows: usize,
    pub cols: usize,
    pub grid: Grid,
    pub packed: GpuMatrix,
    pub scales: GpuMatrix,
    pub zeros: GpuMatrix,
    pub perm: Option<GpuBuffer>,
}

/// Dequantize into a new f32 matrix (original column order).
pub fn dequantize(gpu: &Gpu, w: &PackedWeight) -> Result<GpuMatrix> {
    let (m, n) = (w.rows, w.cols);
    let words = w.packed.cols();
    let (g, ng) = (w.grid.group_len(n), w.grid.groups(n));
    let out = GpuMatrix::uninit(gpu, m, n)?;
    let spec = Spec::new().set(
        "OPERANDS",
        format!(
            "{}{}",
            operand_wgsl("s", 2, w.scales.dtype(), false),
            operand_wgsl("z", 3, w.zeros.dtype(), false)
        ),
    );
    let pipeline = gpu.pipeline(&DEQUANT, &spec)?;
    // A dummy binding when there is no permutation (bindings must exist).
    let dummy;
    let perm = match &w.perm {
        Some(p) => p,
        None => {
            dummy = gpu.storage(16, true)?;
            &dummy
        }
    };
    let mut b = Batch::new(gpu);
    for (rows, parts) in GpuMatrix::common_segments(&[&out, &w.packed, &w.scales, &w.zeros], 0..m) {
        let [(oc, o_local), (cc, c_local), (sc, s_local), (zc, _)] = parts[..] else {
            unreachable!("four matrices in, four parts out")
        };
        let nr = rows.len();
        let params = DequantParams {
            rows: nr as u32,
            n: n as u32,
            words: words as u32,
            bits: w.grid.bits,
            g: g as u32,
            ng: ng as u32,
            c_off: (c_local * words) as u32,
            o_off: (o_local * n) as u32,
            sz_row0: s_local as u32,
            has_perm: w.perm.is_some() as u32,
            _pad: [0; 2],
        };
        let wg = row_grid(n, nr);
        b.dispatch(
            pipeline.clone(),
            &params,
            &[&cc.buf, &sc.buf, &zc.buf, perm, &oc.buf],
            wg,
        )?;
    }
    b.submit()?;
    Ok(out)
}
