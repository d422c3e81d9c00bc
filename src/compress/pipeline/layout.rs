//! The stored form of compressed weights: host packing, the tensors each matrix is stored
//! as (planned before writing, so the safetensors header is written first), plain copies.

use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::{Gpu, GpuMatrix};
use crate::model::compressed::{PlannedTensor, QuantEntry, RhtSeeds, StreamingWriter};
use crate::model::Checkpoint;
use crate::quant::grid::{pack_row, packed_words};
use crate::quant::sparsity::PRUNED;
use crate::quant::{Grid, Quantized};

use super::options::*;

/// The stored pieces of one compressed weight.
pub(crate) struct Packed {
    pub(crate) qweight: Vec<u8>,
    pub(crate) scales: Vec<u8>,
    pub(crate) zeros: Option<Vec<u8>>,
    pub(crate) perm: Option<Vec<u8>>,
    /// Pruned: the kept-weight mask (rows × ⌈cols/32⌉) and the kept count per row.
    pub(crate) mask: Option<Vec<u32>>,
    pub(crate) kept: usize,
    /// CALDERA factors Lᵀ and R, each packed like a backbone.
    pub(crate) factors: Option<Box<(Packed, Packed)>>,
}

pub(crate) fn pack(q: &Quantized) -> Result<Packed> {
    let (codes, mask, kept) = if q.codes.contains(&PRUNED) {
        let kept = q.codes[..q.cols].iter().filter(|&&c| c != PRUNED).count();
        let (mask, codes) =
            crate::quant::sparsity::pack_sparse(&q.codes, q.rows, q.cols, q.grid.bits, kept)?;
        (codes, Some(mask), kept)
    } else {
        let words = packed_words(q.cols, q.grid.bits);
        let mut codes = Vec::with_capacity(q.rows * words);
        for r in 0..q.rows {
            pack_row(
                &q.codes[r * q.cols..(r + 1) * q.cols],
                q.grid.bits,
                &mut codes,
            );
        }
        (codes, None, q.cols)
    };
    Ok(Packed {
        mask,
        kept,
        qweight: bytemuck::cast_slice(&codes).to_vec(),
        scales: DType::F16.encode_f32(&q.scales),
        zeros: (!q.grid.symmetric).then(|| DType::F16.encode_f32(&q.zeros)),
        perm: q.perm.as_ref().map(|p| bytemuck::cast_slice(p).to_vec()),
        factors: None,
    })
}

/// The f32 weight the reader will reconstruct from `p`, dequantized on the GPU by the
/// reader's own function.
pub(crate) fn dequantize_in_memory(gpu: &Gpu, p: &Packed, q: &Quantized) -> Result<GpuMatrix> {
    let pieces = crate::infer::weights::PackedPieces {
        codes: &p.qweight,
        scales: &p.scales,
        zeros: p.zeros.as_deref(),
        perm: p.perm.as_deref(),
        mask: p.mask.as_deref(),
    };
    crate::infer::weights::dequantize_packed(gpu, q.rows, q.cols, q.grid, p.kept, &pieces)
}

/// Stored bits of all compressed linear weights under `opts` (what the manifest's `linear`
/// accounting will say), computed from shapes and recipes before compressing.
pub fn planned_linear_bits(ck: &Checkpoint, opts: &CompressOptions) -> Result<u64> {
    let mut total = 0;
    for (l, spec) in ck.arch().layers.iter().enumerate() {
        let r = opts.recipe(l);
        for lin in &spec.linears {
            let (m, n) = (lin.out_features, lin.in_features);
            let rank = if r.method == Method::Caldera {
                r.caldera.rank_for(&r.grid, m, n)?
            } else {
                0
            };
            let kept = r.sparsity.kept_per_row(n, opts.gptq.block);
            let e = QuantEntry {
                method: r.method.name().into(),
                bits: r.grid.bits,
                group_size: r.grid.group_size,
                symmetric: r.grid.symmetric,
                act_order: opts.gptq.act_order && r.method == Method::Gptq,
                rows: m,
                cols: n,
                stored_bits: 0,
                relative_error: None,
                damp: None,
                rank,
                lr_bits: if rank > 0 { r.caldera.lr_bits } else { 0 },
                lr_group_size: if rank > 0 { r.caldera.lr_group_size } else { 0 },
                rht: opts.rht.then_some(RhtSeeds { rows: 0, cols: 0 }),
                sparsity: (kept < n).then(|| r.sparsity.name()).flatten(),
                kept_per_row: kept,
            };
            total += e.expected_bits();
        }
    }
    Ok(total)
}

/// The stored tensors of one linear weight: `(layer, name, rows, cols) → tensors`.
pub(crate) type LinearPlan<'a> =
    dyn FnMut(usize, &str, usize, usize) -> Result<Vec<PlannedTensor>> + 'a;

/// Plan of every stored tensor, in the checkpoint's order; `linear(layer, name, rows, cols)`
/// gives the stored tensors of one linear weight.
pub(crate) fn plan_with(
    ck: &Checkpoint,
    linear: &mut LinearPlan<'_>,
) -> Result<Vec<PlannedTensor>> {
    let linear_layer: std::collections::HashMap<&str, usize> = ck
        .arch()
        .layers
        .iter()
        .enumerate()
        .flat_map(|(l, spec)| {
            spec.linears
                .iter()
                .map(move |lin| (lin.weight.name.as_str(), l))
        })
        .collect();
    let mut out = Vec::new();
    for spec in ck.arch().tensors() {
        if let Some(&l) = linear_layer.get(spec.name.as_str()) {
            out.extend(linear(l, &spec.name, spec.shape[0], spec.shape[1])?);
        } else {
            let t = ck.tensor(&spec.name)?;
            out.push(PlannedTensor {
                name: spec.name.clone(),
                dtype: t.dtype.safetensors_name().into(),
                shape: t.shape.to_vec(),
                bytes: t.bytes.len(),
            });
        }
    }
    Ok(out)
}

/// The plan under `opts` (known before compressing).
pub(crate) fn plan(ck: &Checkpoint, opts: &CompressOptions) -> Result<Vec<PlannedTensor>> {
    plan_with(ck, &mut |l, name, m, n| {
        let r = opts.recipe(l);
        let act_order = opts.gptq.act_order && r.method == Method::Gptq;
        let kept = r.sparsity.kept_per_row(n, opts.gptq.block);
        let mut out = Vec::new();
        plan_packed(&mut out, name, m, n, &r.grid, act_order, kept);
        if r.method == Method::Caldera {
            let k = r.caldera.rank_for(&r.grid, m, n)?;
            if k > 0 {
                let lg = r.caldera.lr_grid()?;
                plan_packed(&mut out, &format!("{name}.L"), k, m, &lg, false, m);
                plan_packed(&mut out, &format!("{name}.R"), k, n, &lg, false, n);
            }
        }
        Ok(out)
    })
}

/// The stored tensors of one linear weight as its manifest entry describes them (the layout
/// from `QuantEntry::stored_parts`).
pub(crate) fn plan_entry(name: &str, e: &QuantEntry) -> Result<Vec<PlannedTensor>> {
    let parts = e
        .stored_parts()
        .map_err(|msg| crate::Error::InvalidArgument(format!("{name}: {msg}")))?;
    Ok(parts
        .into_iter()
        .map(|(suffix, dtype, shape)| PlannedTensor {
            name: format!("{name}.{suffix}"),
            dtype: dtype.into(),
            bytes: shape.iter().product::<usize>()
                * crate::model::compressed::stored_element_bytes(dtype),
            shape,
        })
        .collect())
}

/// The data of `p`'s stored tensors, in the order [`plan_packed`] lists them.
pub(crate) fn packed_blobs(name: &str, p: Packed, out: &mut Vec<(String, Vec<u8>)>) {
    out.push((format!("{name}.qweight"), p.qweight));
    out.push((format!("{name}.scales"), p.scales));
    if let Some(z) = p.zeros {
        out.push((format!("{name}.zeros"), z));
    }
    if let Some(m) = p.mask {
        out.push((format!("{name}.mask"), bytemuck::cast_slice(&m).to_vec()));
    }
    if let Some(pm) = p.perm {
        out.push((format!("{name}.perm"), pm));
    }
    if let Some(f) = p.factors {
        let (l, r) = *f;
        packed_blobs(&format!("{name}.L"), l, out);
        packed_blobs(&format!("{name}.R"), r, out);
    }
}

/// Header entries of one packed matrix (`PREFIX.qweight`, `.scales`, `.zeros`, `.perm`).
pub(crate) fn plan_packed(
    out: &mut Vec<PlannedTensor>,
    prefix: &str,
    rows: usize,
    cols: usize,
    grid: &Grid,
    act_order: bool,
    kept: usize,
) {
    let groups = grid.groups(cols);
    let words = packed_words(kept, grid.bits);
    out.push(PlannedTensor {
        name: format!("{prefix}.qweight"),
        dtype: "U32".into(),
        shape: vec![rows, words],
        bytes: rows * words * 4,
    });
    out.push(PlannedTensor {
        name: format!("{prefix}.scales"),
        dtype: "F16".into(),
        shape: vec![rows, groups],
        bytes: rows * groups * 2,
    });
    if !grid.symmetric {
        out.push(PlannedTensor {
            name: format!("{prefix}.zeros"),
            dtype: "F16".into(),
            shape: vec![rows, groups],
            bytes: rows * groups * 2,
        });
    }
    if kept < cols {
        let mw = cols.div_ceil(32);
        out.push(PlannedTensor {
            name: format!("{prefix}.mask"),
            dtype: "U32".into(),
            shape: vec![rows, mw],
            bytes: rows * mw * 4,
        });
    }
    if act_order {
        out.push(PlannedTensor {
            name: format!("{prefix}.perm"),
            dtype: "U32".into(),
            shape: vec![cols],
            bytes: cols * 4,
        });
    }
}

pub(crate) fn copy_plain(wr: &mut StreamingWriter, ck: &Checkpoint, name: &str) -> Result<()> {
    let t = ck.tensor(name)?;
    wr.write(name, t.bytes)?;
    ck.release(name);
    Ok(())
}
