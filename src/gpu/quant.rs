//! Quantizers on the GPU: round-to-nearest, GPTQ/LDLQ (lazy blocks, the column loop in one
//! invocation per row, the lazy update as a GEMM), and dequantization of packed codes.
//! Conventions and CPU references: `crate::quant`.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::grid::{CLIP_STEPS, IQ4NL_LEVELS, IQ4NL_SCALE};
use crate::quant::kquant::SUPER;
use crate::quant::sparsity::Sparsity;
use crate::quant::{Grid, GridKind, PreparedHessian, Quantized};

use super::batch::Batch;
use super::buffer::GpuBuffer;
use super::context::Gpu;
use super::gemm::{gemm_region, GemmOp};
use super::matrix::GpuMatrix;
use super::operand::operand_wgsl;
use super::ops::row_grid;
use super::pipeline::{Kernel, Spec};

const COMMON: &str = include_str!("../../shaders/quant/common.wgsl");
const RTN: Kernel = Kernel {
    name: "rtn",
    template: include_str!("../../shaders/quant/rtn.wgsl"),
    expand: None,
};
const GPTQ_BLOCK: Kernel = Kernel {
    name: "gptq_block",
    template: include_str!("../../shaders/quant/gptq_block.wgsl"),
    expand: None,
};
const DEQUANT: Kernel = Kernel {
    name: "dequant",
    template: include_str!("../../shaders/quant/dequant.wgsl"),
    expand: None,
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
    /// A k grid's super-block parameters (rows × supers·params_len), as the host's
    /// `Quantized::kparams`.
    pub kparams: Option<GpuMatrix>,
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
            kparams: match &self.kparams {
                Some(k) => k.to_f32(gpu)?,
                None => Vec::new(),
            },
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
    kind: u32,
    sz_row0: u32,
    w_off: u32,
    c_off: u32,
    clip: u32,
    smax: f32,
    k_len: u32,
}

/// IQ4_NL's levels and the bits of −1/127 as WGSL (`{{LEVELS}}`), from the host's constants.
fn levels_wgsl() -> String {
    let levels: Vec<String> = IQ4NL_LEVELS.iter().map(|l| format!("{l}.0")).collect();
    format!(
        "var<private> IQ4NL_LEVELS: array<f32, 16> = array<f32, 16>({});\n\
         const IQ4NL_SCALE_BITS: u32 = {:#010x}u;",
        levels.join(", "),
        IQ4NL_SCALE.to_bits()
    )
}

/// The zero points of a grid that implies them (not stored in checkpoints): rows × groups
/// copies of [`Grid::implied_zero`]. The one place both the reader and the compressor build
/// them.
pub fn implied_zeros(gpu: &Gpu, grid: Grid, rows: usize, groups: usize) -> Result<GpuMatrix> {
    let z = grid.implied_zero().ok_or_else(|| {
        Error::InvalidArgument("an asymmetric grid stores its zero points".into())
    })?;
    GpuMatrix::from_f32(gpu, rows, groups, DType::F32, &vec![z; rows * groups])
}

/// Loop iterations of one invocation that fits one group's grid over `g` columns (min/max, the
/// clip search, the codes; a codebook code is a loop over its 16 levels).
fn grid_iterations(g: usize, grid: Grid) -> u64 {
    let steps = if grid.clip { CLIP_STEPS as u64 + 1 } else { 0 };
    let code = if grid.kind == GridKind::Iq4nl { 17 } else { 1 };
    (g as u64) * (1 + code * (1 + steps)) + steps
}

/// Loop iterations of one invocation of the GPTQ block kernel (every loop counted).
fn gptq_block_iterations(bw: usize, g: usize, grid: Grid, sparsity: Sparsity) -> u64 {
    let bw64 = bw as u64;
    // Groups whose grid is fitted inside this block: columns scanned at most max(bw, g).
    let grids = grid_iterations(g.max(bw), grid);
    let prune = match sparsity {
        Sparsity::Dense => 0,
        Sparsity::TwoFour => bw64 * 3,
        Sparsity::Unstructured(_) => bw64 + sparsity.pruned_in_block(bw) as u64 * (bw64 + 1),
    };
    // Each column's code: one step, or a pass over a codebook's 16 levels.
    let codes = if grid.kind == GridKind::Iq4nl {
        16 * bw64
    } else {
        0
    };
    bw64 + bw64 * bw64 / 2 + grids + prune + codes
}

/// Refuse a grid whose groups are too long for one invocation on this adapter.
fn check_group_budget(gpu: &Gpu, iterations: u64, g: usize) -> Result<()> {
    let budget = gpu.caps().loop_budget();
    if iterations > budget {
        return Err(Error::InvalidArgument(format!(
            "groups of {g} columns need {iterations} loop iterations in one GPU invocation, and \
             this adapter ({}) ends an invocation's loops after {} in all: use --group-size 128 \
             (or up to about {})",
            gpu.report().name,
            gpu.caps().loop_limit.unwrap_or(budget),
            g as u64 * budget / iterations.max(1)
        )));
    }
    Ok(())
}

/// Round-to-nearest quantization of `w` (rows × cols, any float dtype).
pub fn rtn(gpu: &Gpu, w: &GpuMatrix, grid: Grid) -> Result<GpuQuantized> {
    let (m, n) = (w.rows(), w.cols());
    let (g, ng) = (grid.group_len(n), grid.groups(n));
    check_k_columns(grid, n)?;
    check_group_budget(gpu, grid_iterations(grid.span(n), grid), grid.span(n))?;
    let codes = GpuMatrix::uninit(gpu, m, n)?;
    let scales = GpuMatrix::uninit(gpu, m, ng)?;
    let zeros = GpuMatrix::uninit(gpu, m, ng)?;
    let (kparams, k_len) = kparams_matrix(gpu, grid, m, n)?;
    let sbuf = single(&scales, "RTN scales")?;
    let zbuf = single(&zeros, "RTN zeros")?;
    let kbuf = single(&kparams, "RTN k-grid parameters")?;
    let spec = Spec::new()
        .set("COMMON", COMMON)
        .set("LEVELS", levels_wgsl())
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
                kind: grid.wgsl_kind(),
                sz_row0: r0 as u32,
                w_off: (w_local * n) as u32,
                c_off: ((r0 - cc.row0) * n) as u32,
                clip: grid.clip as u32,
                smax: grid.ktype().map_or(0.0, |k| k.smax_f32()),
                k_len: k_len as u32,
            };
            let wg = row_grid(
                if grid.ktype().is_some() {
                    n / SUPER
                } else {
                    ng
                },
                rows,
            );
            b.dispatch(
                pipeline.clone(),
                &params,
                &[&wc.buf, &cc.buf, sbuf, zbuf, kbuf],
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
        kparams: grid.ktype().map(|_| kparams),
    })
}

/// A k grid's rows must be whole super-blocks.
fn check_k_columns(grid: Grid, n: usize) -> Result<()> {
    if grid.ktype().is_some() && !n.is_multiple_of(SUPER) {
        return Err(Error::InvalidArgument(format!(
            "the k grid needs rows of whole {SUPER}-column super-blocks; this matrix has {n} \
             columns"
        )));
    }
    Ok(())
}

/// The k-grid parameters' matrix (rows × supers·params_len) and its row length; one column for
/// other grids (a binding must exist).
fn kparams_matrix(gpu: &Gpu, grid: Grid, m: usize, n: usize) -> Result<(GpuMatrix, usize)> {
    let len = grid.ktype().map_or(1, |k| n / SUPER * k.params_len());
    Ok((GpuMatrix::zeros(gpu, m, len)?, len))
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
    kind: u32,
    w_off: u32,
    s_row0: u32,
    e_row0: u32,
    clip: u32,
    sparse: u32,
    prune: u32,
    smax: f32,
    k_len: u32,
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
    sparse_gptq(gpu, w, rows, cols, prep, grid, block, Sparsity::Dense)
}

/// [`gptq`] and its weighted error under the damped Hessian the columns were processed with,
/// tr((W − Q)(H + λI)(W − Q)ᵀ), without forming it: GPTQ's scaled column errors E satisfy
/// W − Q = E·U with (H + λI)⁻¹ = UᵀU, so the trace is ‖E‖²_F (summed in f64 from the error
/// blocks the lazy updates use). Inputs marked dead in `prep` count with the diagonal 1 they
/// were given.
pub fn gptq_with_error(
    gpu: &Gpu,
    w: &[f32],
    rows: usize,
    cols: usize,
    prep: &PreparedHessian,
    grid: Grid,
    block: usize,
) -> Result<(GpuQuantized, f64)> {
    let mut err = 0.0;
    let q = gptq_impl(
        gpu,
        w,
        rows,
        cols,
        prep,
        grid,
        block,
        Sparsity::Dense,
        Some(&mut err),
    )?;
    Ok((q, err))
}

/// GPTQ with SparseGPT pruning (see `quant::sparsity`); pruned weights get code `PRUNED`.
/// Needs the natural column order and lazy blocks of at most 128 columns.
#[allow(clippy::too_many_arguments)]
pub fn sparse_gptq(
    gpu: &Gpu,
    w: &[f32],
    rows: usize,
    cols: usize,
    prep: &PreparedHessian,
    grid: Grid,
    block: usize,
    sparsity: Sparsity,
) -> Result<GpuQuantized> {
    gptq_impl(gpu, w, rows, cols, prep, grid, block, sparsity, None)
}

#[allow(clippy::too_many_arguments)]
fn gptq_impl(
    gpu: &Gpu,
    w: &[f32],
    rows: usize,
    cols: usize,
    prep: &PreparedHessian,
    grid: Grid,
    block: usize,
    sparsity: Sparsity,
    error: Option<&mut f64>,
) -> Result<GpuQuantized> {
    let (m, n) = (rows, cols);
    if sparsity != Sparsity::Dense && (prep.perm.is_some() || block > 128) {
        return Err(Error::InvalidArgument(
            "pruning needs the natural column order (no --act-order) and blocks of at most 128 columns"
                .into(),
        ));
    }
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
    check_k_columns(grid, n)?;
    let codes = GpuMatrix::uninit(gpu, m, n)?;
    let scales = GpuMatrix::uninit(gpu, m, ng)?;
    let zeros = GpuMatrix::uninit(gpu, m, ng)?;
    let (kparams, k_len) = kparams_matrix(gpu, grid, m, n)?;
    let span = grid.span(n);
    let pipeline = gpu.pipeline(
        &GPTQ_BLOCK,
        &Spec::new()
            .set("COMMON", COMMON)
            .set("LEVELS", levels_wgsl()),
    )?;
    // The block's diagonal of U (block² f32) is one binding. Lazy blocks only batch updates
    // (the result does not depend on their size) except for unstructured pruning, whose masks
    // are chosen per block: shrink the block when the binding limit demands it, keeping it a
    // multiple of 4 for 2:4, and refuse for unstructured pruning.
    let max_block = ((gpu.caps().max_binding / 4) as f64).sqrt().floor() as usize;
    let mut block = block.max(1);
    if block > max_block {
        if let Sparsity::Unstructured(_) = sparsity {
            return Err(Error::TooLarge {
                what: format!("a GPTQ block of {block}² f32 for unstructured pruning"),
                bytes: (block * block * 4) as u64,
                limit: gpu.caps().max_binding,
            });
        }
        block = if max_block >= 4 {
            max_block / 4 * 4
        } else {
            max_block.max(1)
        };
    }
    // Blocks small enough for the adapter's loop budget (the triangular update costs bw²/2).
    let budget = gpu.caps().loop_budget();
    while block > 4
        && !matches!(sparsity, Sparsity::Unstructured(_))
        && gptq_block_iterations(block, span, grid, sparsity) > budget
    {
        block = (block / 2).max(4) / 4 * 4;
    }
    check_group_budget(
        gpu,
        gptq_block_iterations(block.min(n), span, grid, sparsity),
        span,
    )?;
    let u = &prep.u;
    let mut b = Batch::new(gpu);
    // Per-block operands stay alive until the batch is submitted.
    let mut keep: Vec<GpuMatrix> = Vec::new();
    // Each block's error columns (read back for the weighted error when asked).
    let mut errors: Vec<GpuMatrix> = Vec::new();
    let mut i1 = 0;
    while i1 < n {
        let i2 = (i1 + block).min(n);
        let bw = i2 - i1;
        let diag: Vec<f32> = (0..bw * bw)
            .map(|k| u[(i1 + k / bw) * n + i1 + k % bw] as f32)
            .collect();
        let ud = GpuMatrix::from_f32(gpu, bw, bw, DType::F32, &diag)?;
        let e = GpuMatrix::uninit(gpu, m, bw)?;
        for (rows, parts) in
            GpuMatrix::common_segments(&[&wm, &codes, &scales, &zeros, &e, &kparams], 0..m)
        {
            let [(wc, w_local), (cc, _), (sc, s_local), (zc, _), (ec, e_local), (kc, k_local)] =
                parts[..]
            else {
                unreachable!("six matrices in, six parts out")
            };
            if k_local != s_local {
                // The kernel indexes both from s_row0; they are chunked alike in practice
                // (a k grid's parameters are a few floats per 256 weights).
                return Err(Error::TooLarge {
                    what: format!("k-grid parameters of a {m}×{n} matrix"),
                    bytes: (m * k_len * 4) as u64,
                    limit: gpu.caps().max_binding,
                });
            }
            let params = GptqParams {
                rows: rows.len() as u32,
                n: n as u32,
                i1: i1 as u32,
                bw: bw as u32,
                g: g as u32,
                ng: ng as u32,
                maxq: grid.maxq() as f32,
                kind: grid.wgsl_kind(),
                w_off: (w_local * n) as u32,
                s_row0: s_local as u32,
                e_row0: e_local as u32,
                clip: grid.clip as u32,
                sparse: match sparsity {
                    Sparsity::Dense => 0,
                    Sparsity::TwoFour => 1,
                    Sparsity::Unstructured(_) => 2,
                },
                prune: sparsity.pruned_in_block(bw) as u32,
                smax: grid.ktype().map_or(0.0, |k| k.smax_f32()),
                k_len: k_len as u32,
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
                    &kc.buf,
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
        errors.push(e);
        i1 = i2;
    }
    b.submit()?;
    drop(keep);
    if let Some(total) = error {
        *total = 0.0;
        for e in &errors {
            *total += e
                .to_f32(gpu)?
                .iter()
                .map(|&v| v as f64 * v as f64)
                .sum::<f64>();
        }
    }
    drop(errors);
    Ok(GpuQuantized {
        rows: m,
        cols: n,
        grid,
        codes,
        scales,
        zeros,
        perm: prep.perm.clone(),
        kparams: grid.ktype().map(|_| kparams),
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
    m_off: u32,
    kind: u32,
}

/// Packed codes (rows × words u32, stored as a 4-byte matrix), scales and zeros (rows × groups,
/// f16 or f32) and an optional permutation, ready to dequantize on the GPU.
pub struct GpuPacked {
    pub rows: usize,
    pub cols: usize,
    pub grid: Grid,
    pub packed: GpuMatrix,
    pub scales: GpuMatrix,
    pub zeros: GpuMatrix,
    pub perm: Option<GpuBuffer>,
    /// Pruned matrices: which weights are kept (`packed` holds only their codes).
    pub sparse: Option<SparseIndex>,
}

/// Where the kept weights of a pruned matrix are: `mask` (rows × ⌈n/32⌉ u32, bit j of a row
/// set when weight j is kept) and `prefix` (same shape: kept weights before each mask word).
pub struct SparseIndex {
    pub mask: GpuMatrix,
    pub prefix: GpuMatrix,
}

impl SparseIndex {
    /// Upload a mask (rows × words u32, as stored) and the prefix counts computed from it.
    pub fn upload(gpu: &Gpu, rows: usize, words: usize, mask: &[u32]) -> Result<SparseIndex> {
        let mut prefix = vec![0u32; mask.len()];
        for r in 0..rows {
            let mut c = 0;
            for w in 0..words {
                prefix[r * words + w] = c;
                c += mask[r * words + w].count_ones();
            }
        }
        let up = |v: &[u32]| {
            GpuMatrix::from_bytes(gpu, rows, words, DType::F32, bytemuck::cast_slice(v))
        };
        Ok(SparseIndex {
            mask: up(mask)?,
            prefix: up(&prefix)?,
        })
    }
}

/// Dequantize into a new f32 matrix (original column order).
pub fn dequantize(gpu: &Gpu, w: &GpuPacked) -> Result<GpuMatrix> {
    let (m, n) = (w.rows, w.cols);
    let words = w.packed.cols();
    let (g, ng) = (w.grid.group_len(n), w.grid.groups(n));
    let out = GpuMatrix::uninit(gpu, m, n)?;
    let (decl, body) = if w.sparse.is_some() {
        (
            "@group(0) @binding(6) var<storage, read> mask: array<u32>;\n\
             @group(0) @binding(7) var<storage, read> prefix: array<u32>;",
            "    let mw = (p.n + 31u) / 32u;\n\
             \x20   let mword = mask[p.m_off + r * mw + j / 32u];\n\
             \x20   if ((mword & (1u << (j % 32u))) == 0u) {\n\
             \x20       out[p.o_off + r * p.n + j] = 0.0;\n\
             \x20       return;\n\
             \x20   }\n\
             \x20   k = prefix[p.m_off + r * mw + j / 32u] + countOneBits(mword & ((1u << (j % 32u)) - 1u));",
        )
    } else {
        ("", "")
    };
    let spec = Spec::new()
        .set(
            "OPERANDS",
            format!(
                "{}{}",
                operand_wgsl("s", 2, w.scales.dtype(), false),
                operand_wgsl("z", 3, w.zeros.dtype(), false)
            ),
        )
        .set("SPARSE_DECL", decl)
        .set("SPARSE_BODY", body)
        .set("LEVELS", levels_wgsl());
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
    let mut mats = vec![&out, &w.packed, &w.scales, &w.zeros];
    if let Some(sp) = &w.sparse {
        mats.push(&sp.mask);
        mats.push(&sp.prefix);
    }
    for (rows, parts) in GpuMatrix::common_segments(&mats, 0..m) {
        let (oc, o_local) = parts[0];
        let (cc, c_local) = parts[1];
        let (sc, s_local) = parts[2];
        let (zc, _) = parts[3];
        let m_local = parts.get(4).map_or(0, |p| p.1);
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
            m_off: (m_local * n.div_ceil(32)) as u32,
            kind: w.grid.wgsl_kind(),
        };
        let wg = row_grid(n, nr);
        let mut bufs = vec![&cc.buf, &sc.buf, &zc.buf, perm, &oc.buf];
        if parts.len() == 6 {
            bufs.push(&parts[4].0.buf);
            bufs.push(&parts[5].0.buf);
        }
        b.dispatch(pipeline.clone(), &params, &bufs, wg)?;
    }
    b.submit()?;
    Ok(out)
}
