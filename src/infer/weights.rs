//! Weights for the forward pass, read from a checkpoint: plain tensors uploaded in their
//! stored dtype, compressed weights (pumice format) uploaded packed and dequantized on the GPU,
//! CALDERA factors kept low-rank, incoherence rotations undone on the host.
//!
//! Invariant: the stored layout is checked at open (`Checkpoint`); here every value that
//! would poison the forward pass (non-finite scales, a `.perm` that is not a permutation, a
//! mask keeping the wrong count) is refused naming the tensor.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::quant::{self, GpuPacked};
use crate::gpu::{Gpu, GpuMatrix};
use crate::model::compressed::{Factor, PartKind, QuantEntry};
use crate::model::{Checkpoint, TensorRef};
use crate::quant::rht::Rht;

use super::engine::LinearWeight;

/// Upload a checkpoint tensor as a rows × cols matrix in its stored dtype.
pub(crate) fn upload(gpu: &Gpu, t: &TensorRef<'_>, rows: usize, cols: usize) -> Result<GpuMatrix> {
    GpuMatrix::from_bytes(gpu, rows, cols, t.dtype, t.bytes)
}

/// The stored pieces of one packed matrix, as bytes in their stored layout (codes U32, scales
/// and zeros F16, perm U32, the pruning mask as u32 words).
pub(crate) struct PackedPieces<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [u8],
    /// None for a grid that implies its zero points (midrise, symmetric) and k grids.
    pub zeros: Option<&'a [u8]>,
    /// A k grid's packed sub-block scales and minimums.
    pub subscales: Option<&'a [u8]>,
    pub perm: Option<&'a [u8]>,
    pub mask: Option<&'a [u32]>,
}

/// The one dequantization of a packed matrix, used by the reader (from a checkpoint) and by
/// the compressor (from memory, so later stages see what the reader will compute): upload the
/// pieces and dequantize to f32 on the GPU. `kept` is the stored codes per row.
pub(crate) fn dequantize_packed(
    gpu: &Gpu,
    rows: usize,
    cols: usize,
    grid: crate::quant::Grid,
    kept: usize,
    p: &PackedPieces<'_>,
) -> Result<GpuMatrix> {
    if let Some(k) = grid.ktype() {
        let values = dequantize_k(k, rows, cols, p)?;
        return GpuMatrix::from_f32(gpu, rows, cols, DType::F32, &values);
    }
    let groups = grid.groups(cols);
    let zeros = match p.zeros {
        Some(z) => GpuMatrix::from_bytes(gpu, rows, groups, DType::F16, z)?,
        None => quant::implied_zeros(gpu, grid, rows, groups)?,
    };
    let packed = GpuPacked {
        rows,
        cols,
        grid,
        packed: GpuMatrix::from_bytes(
            gpu,
            rows,
            crate::quant::grid::packed_words(kept, grid.bits),
            DType::F32,
            p.codes,
        )?,
        scales: GpuMatrix::from_bytes(gpu, rows, groups, DType::F16, p.scales)?,
        zeros,
        perm: p.perm.map(|b| gpu.upload(b)).transpose()?,
        sparse: p
            .mask
            .map(|m| quant::SparseIndex::upload(gpu, rows, cols.div_ceil(32), m))
            .transpose()?,
    };
    quant::dequantize(gpu, &packed)
}

/// A k grid's values on the host, in ggml's f32 operations (a = d·sc, b = dmin·m, a·q − b),
/// so they equal llama.cpp's and gguf-py's bit for bit whatever a GPU compiler would fuse.
fn dequantize_k(
    k: crate::quant::kquant::KType,
    rows: usize,
    cols: usize,
    p: &PackedPieces<'_>,
) -> Result<Vec<f32>> {
    let subs = p
        .subscales
        .ok_or_else(|| Error::Shape("a k grid without sub-block scales".into()))?;
    let mut dd = Vec::new();
    DType::F16.decode_f32(p.scales, &mut dd);
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(subs);
    let codes: Vec<u32> = bytemuck::pod_collect_to_vec(p.codes);
    let (a, b) = crate::quant::kquant::effective_stored(k, &dd, &words, rows, cols);
    let perm: Option<Vec<u32>> = p.perm.map(bytemuck::pod_collect_to_vec);
    let cw = crate::quant::grid::packed_words(cols, k.bits);
    let ng = cols / k.sub;
    let mut out = vec![0.0f32; rows * cols];
    for r in 0..rows {
        let row = &codes[r * cw..(r + 1) * cw];
        for j in 0..cols {
            let q = crate::quant::grid::unpack(row, j, k.bits);
            let gi = r * ng + j / k.sub;
            let col = perm.as_ref().map_or(j, |p| p[j] as usize);
            out[r * cols + col] = k.value(q, a[gi], b[gi]);
        }
    }
    Ok(out)
}

/// Read one stored matrix of weight `weight` (the backbone or a CALDERA factor, its parts as
/// the entry's layout lists them) from a checkpoint, refusing values that would poison the
/// forward pass, and dequantize it.
pub(crate) fn dequantize_stored(
    gpu: &Gpu,
    ck: &Checkpoint,
    weight: &str,
    q: &QuantEntry,
    factor: Factor,
) -> Result<GpuMatrix> {
    let parts = q
        .stored_parts()
        .map_err(|msg| Error::tensor(ck.dir(), weight, msg))?;
    let name_of = |kind: PartKind| {
        parts
            .iter()
            .find(|p| p.factor == factor && p.kind == kind)
            .map(|p| p.name(weight))
    };
    let (rows, cols, grid, kept) = match (factor, q.lr_grid()?) {
        (Factor::Backbone, _) => {
            let kept = if q.sparsity.is_some() {
                q.kept_per_row
            } else {
                q.cols
            };
            (q.rows, q.cols, q.grid()?, kept)
        }
        (Factor::L, Some(lg)) => (q.rank, q.rows, lg, q.rows),
        (Factor::R, Some(lg)) => (q.rank, q.cols, lg, q.cols),
        (_, None) => {
            return Err(Error::tensor(ck.dir(), weight, "has no low-rank factors"));
        }
    };
    let codes_name = name_of(PartKind::Codes)
        .ok_or_else(|| Error::tensor(ck.dir(), weight, "its layout lists no codes"))?;
    let (codes, _, _) = ck.raw(&codes_name)?;
    let scales_name = name_of(PartKind::Scales)
        .ok_or_else(|| Error::tensor(ck.dir(), weight, "its layout lists no scales"))?;
    let scales = ck.tensor(&scales_name)?;
    check_finite(&scales)?;
    let zeros = match name_of(PartKind::Zeros) {
        Some(n) => {
            let z = ck.tensor(&n)?;
            check_finite(&z)?;
            Some(z)
        }
        None => None,
    };
    let perm = match name_of(PartKind::Perm) {
        Some(n) => {
            let (bytes, _, _) = ck.raw(&n)?;
            check_permutation(bytes, cols).map_err(|msg| Error::tensor(ck.dir(), &n, msg))?;
            Some(bytes)
        }
        None => None,
    };
    let mask = match name_of(PartKind::Mask) {
        Some(n) => {
            let mw = cols.div_ceil(32);
            let (bytes, _, _) = ck.raw(&n)?;
            let mask: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(r) = (0..rows).find(|&r| {
                mask[r * mw..(r + 1) * mw]
                    .iter()
                    .map(|w| w.count_ones() as usize)
                    .sum::<usize>()
                    != kept
            }) {
                return Err(Error::tensor(
                    ck.dir(),
                    &n,
                    format!("row {r} does not keep {kept} weights"),
                ));
            }
            Some(mask)
        }
        None => None,
    };
    let subscales = match name_of(PartKind::SubScales) {
        Some(n) => Some(ck.raw(&n)?.0),
        None => None,
    };
    let pieces = PackedPieces {
        codes,
        scales: scales.bytes,
        zeros: zeros.as_ref().map(|z| z.bytes),
        subscales,
        perm,
        mask: mask.as_deref(),
    };
    dequantize_packed(gpu, rows, cols, grid, kept, &pieces)
}

/// A permutation of `cols` columns: every column exactly once (a repeated column would
/// silently drop another one's weights).
fn check_permutation(bytes: &[u8], cols: usize) -> std::result::Result<(), String> {
    let mut seen = vec![false; cols];
    for p in bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
    {
        if p >= cols {
            return Err(format!("column {p} is out of range"));
        }
        if seen[p] {
            return Err(format!("column {p} appears twice: not a permutation"));
        }
        seen[p] = true;
    }
    Ok(())
}

/// A compressed weight ready for the forward pass: the dequantized backbone, plus the
/// dequantized factors of a CALDERA weight, with any incoherence rotation undone.
pub(crate) fn dequantize_weight(
    gpu: &Gpu,
    ck: &Checkpoint,
    name: &str,
    q: &QuantEntry,
) -> Result<LinearWeight> {
    let backbone = dequantize_stored(gpu, ck, name, q, Factor::Backbone)?;
    let w = match q.rank {
        0 => LinearWeight::Dense(backbone),
        _ => LinearWeight::LowRank {
            q: backbone,
            lt: dequantize_stored(gpu, ck, name, q, Factor::L)?,
            r: dequantize_stored(gpu, ck, name, q, Factor::R)?,
        },
    };
    match q.rht {
        Some(seeds) => unrotate_linear(
            gpu,
            w,
            &Rht::new(q.rows, seeds.rows),
            &Rht::new(q.cols, seeds.cols),
        ),
        None => Ok(w),
    }
}

/// Undo incoherence processing: a weight quantized as W_r = T_m W T_nᵀ becomes
/// W = T_mᵀ W_r T_n; for Q + L·R the factors transform on their own (L = T_mᵀ L_r,
/// R = R_r T_n), so the low-rank form is kept.
pub(crate) fn unrotate_linear(
    gpu: &Gpu,
    w: LinearWeight,
    tm: &Rht,
    tn: &Rht,
) -> Result<LinearWeight> {
    let dense = |x: &GpuMatrix| -> Result<GpuMatrix> {
        let v = crate::quant::rht::unrotate_weight(&x.to_f32(gpu)?, x.rows(), x.cols(), tm, tn);
        GpuMatrix::from_f32(gpu, x.rows(), x.cols(), DType::F32, &v)
    };
    let rows_t = |x: &GpuMatrix, t: &Rht| -> Result<GpuMatrix> {
        let mut v: Vec<f64> = x.to_f32(gpu)?.into_iter().map(f64::from).collect();
        crate::quant::rht::rows(&mut v, t, true);
        GpuMatrix::from_f32(
            gpu,
            x.rows(),
            x.cols(),
            DType::F32,
            &v.iter().map(|&a| a as f32).collect::<Vec<_>>(),
        )
    };
    Ok(match w {
        LinearWeight::Dense(q) => LinearWeight::Dense(dense(&q)?),
        LinearWeight::LowRank { q, lt, r } => LinearWeight::LowRank {
            q: dense(&q)?,
            lt: rows_t(&lt, tm)?,
            r: rows_t(&r, tn)?,
        },
    })
}

pub(crate) fn check_finite(t: &TensorRef<'_>) -> Result<()> {
    match t.first_non_finite() {
        None => Ok(()),
        Some(i) => Err(Error::Tensor {
            path: t.file.to_path_buf(),
            tensor: t.name.to_string(),
            msg: format!("element {i} is not finite (weights must be finite)"),
        }),
    }
}
