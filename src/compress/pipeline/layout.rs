//! The compressed form of weights: host packing, the reader's dequantization of what was
//! packed, and the entries planned from the recipe (from which a format plans its output
//! before the first layer is compressed).

use crate::dtype::DType;
use crate::error::Result;
use crate::format::PackedMatrix;
use crate::gpu::{Gpu, GpuMatrix};
use crate::model::compressed::{QuantEntry, RhtSeeds};
use crate::model::Checkpoint;
use crate::quant::grid::{pack_row, packed_words};
use crate::quant::sparsity::PRUNED;
use crate::quant::Quantized;

use super::options::*;

/// Pack a quantized matrix into its stored form.
pub(crate) fn pack(q: &Quantized) -> Result<PackedMatrix> {
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
    if let Some(k) = q.grid.ktype() {
        let (dd, words) = crate::quant::kquant::pack_stored(k, &q.kparams, q.rows, q.cols);
        return Ok(PackedMatrix {
            mask,
            kept,
            codes: bytemuck::cast_slice(&codes).to_vec(),
            scales: DType::F16.encode_f32(&dd),
            zeros: None,
            subscales: Some(bytemuck::cast_slice(&words).to_vec()),
            perm: q.perm.as_ref().map(|p| bytemuck::cast_slice(p).to_vec()),
            factors: None,
        });
    }
    Ok(PackedMatrix {
        mask,
        kept,
        codes: bytemuck::cast_slice(&codes).to_vec(),
        subscales: None,
        scales: DType::F16.encode_f32(&q.scales),
        zeros: q
            .grid
            .stores_zeros()
            .then(|| DType::F16.encode_f32(&q.zeros)),
        perm: q.perm.as_ref().map(|p| bytemuck::cast_slice(p).to_vec()),
        factors: None,
    })
}

/// The f32 weight the reader will reconstruct from `p`, dequantized on the GPU by the
/// reader's own function.
pub(crate) fn dequantize_in_memory(
    gpu: &Gpu,
    p: &PackedMatrix,
    q: &Quantized,
) -> Result<GpuMatrix> {
    let pieces = crate::infer::weights::PackedPieces {
        codes: &p.codes,
        scales: &p.scales,
        zeros: p.zeros.as_deref(),
        subscales: p.subscales.as_deref(),
        perm: p.perm.as_deref(),
        mask: p.mask.as_deref(),
    };
    crate::infer::weights::dequantize_packed(gpu, q.rows, q.cols, q.grid, p.kept, &pieces)
}

/// The manifest entry every linear weight will have under `opts` (its stored layout follows;
/// `stored_bits`, errors and damping are known only after compressing), layer by layer.
pub(crate) fn planned_entries(
    ck: &Checkpoint,
    opts: &CompressOptions,
) -> Result<Vec<Vec<(String, QuantEntry)>>> {
    let mut layers = Vec::new();
    for (l, spec) in ck.arch().layers.iter().enumerate() {
        let r = opts.recipe(l);
        let mut entries = Vec::new();
        for lin in &spec.linears {
            let (m, n) = (lin.out_features, lin.in_features);
            let grid = r.grid.for_cols(n);
            let rank = if r.method == Method::Caldera {
                r.caldera.rank_for(&grid, m, n)?
            } else {
                0
            };
            let kept = r.sparsity.kept_per_row(n, opts.gptq.block);
            let e = QuantEntry {
                method: r.method.name().into(),
                bits: grid.bits,
                group_size: grid.group_size,
                kind: grid.kind,
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
            entries.push((lin.weight.name.clone(), e));
        }
        layers.push(entries);
    }
    Ok(layers)
}

/// Stored bits of all compressed linear weights under `opts` (what the manifest's `linear`
/// accounting will say), computed from shapes and recipes before compressing.
pub fn planned_linear_bits(ck: &Checkpoint, opts: &CompressOptions) -> Result<u64> {
    Ok(planned_entries(ck, opts)?
        .iter()
        .flatten()
        .map(|(_, e)| e.expected_bits())
        .sum())
}
