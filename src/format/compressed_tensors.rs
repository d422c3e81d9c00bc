//! compressed-tensors `pack-quantized` (transformers, vLLM, llm-compressor): per linear module
//! `P`, `P.weight_packed` I32 [out, ⌈in·b/32⌉] (pumice's little-endian bit stream of codes,
//! unchanged, in the original column order), `P.weight_scale` F32 [out, groups] (pumice's f16
//! scales, exactly), `P.weight_zero_point` I32 [⌈out·b/32⌉, groups] (the integer zero points,
//! packed along the output dimension; asymmetric grids only), `P.weight_shape` I64 [2].
//! Value = scale · (code − zero), as pumice's: compressed-tensors' signed q and zp are pumice's
//! code and zero minus 2^(b−1), and its `symmetric: true` (zp = 0) is pumice's symmetric grid.
//!
//! Holds exactly pumice's asymmetric and symmetric grids over whole groups only: midrise grids
//! (zero (2^b−1)/2), randomized-Hadamard rotations, pruning masks, act-order (its groups follow
//! the permuted columns; compressed-tensors 0.20 dropped g_idx) and partial last groups are
//! refused by tensor. A CALDERA checkpoint's
//! factors go to a PEFT adapter in `adapter/` beside the base.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::compressed::QuantEntry;
use crate::model::Checkpoint;
use crate::quant::grid::{pack_row, packed_words};
use crate::quant::GridKind;

use super::peft;
use super::{
    hf, CompressedLayer, CompressedMatrix, Format, FormatWriter, JobInfo, Planned, Written,
};

/// Why compressed-tensors cannot hold `e` exactly (None: it can).
pub(crate) fn refusal(e: &QuantEntry) -> Option<String> {
    if e.rht.is_some() {
        return Some(
            "its codes are of a randomized-Hadamard-rotated weight, which compressed-tensors \
             cannot reproduce (compress without --rht, or export --format dense)"
                .into(),
        );
    }
    if e.kind == GridKind::Midrise {
        return Some(format!(
            "its {}-bit grid is midrise (zero {}), which compressed-tensors' integer zero points \
             cannot express (compress with --grid symmetric or asymmetric, or export --format \
             dense)",
            e.bits,
            ((1u32 << e.bits) - 1) as f32 / 2.0
        ));
    }
    if matches!(e.kind, GridKind::Iq4nl | GridKind::K | GridKind::Affine) {
        return Some(format!(
            "its grid is ggml's {}, which compressed-tensors' integer grids cannot express \
             (compress with --grid symmetric or asymmetric, or export --format dense)",
            match e.kind {
                GridKind::K => "k-quant super-blocks",
                GridKind::Affine =>
                    "affine Q4_1/Q5_1 grid (an f16 minimum, not an integer zero point)",
                _ => "IQ4_NL codebook",
            }
        ));
    }
    if e.sparsity.is_some() {
        return Some(
            "it is pruned; pack-quantized stores every code (export --format dense)".into(),
        );
    }
    if e.group_size > 0 && !e.cols.is_multiple_of(e.group_size) {
        return Some(format!(
            "its {} columns are not a multiple of the group size {} (compressed-tensors needs \
             whole groups; compress with a group size that divides every input width)",
            e.cols, e.group_size
        ));
    }
    if e.act_order {
        return Some(
            "its act-order groups follow the permuted columns, which needs a g_idx that \
             compressed-tensors 0.20 no longer reads (actorder \"group\" was removed; compress \
             without --act-order, or export --format dense)"
                .into(),
        );
    }
    if e.bits > 8 {
        return Some(format!("{} bits: pack-quantized holds 1 to 8", e.bits));
    }
    peft::refusal(e)
}

/// compressed-tensors pack-quantized.
pub struct CompressedTensors;

use hf::Scheme;

impl Scheme {
    /// The `weights` of a config group with this scheme.
    fn weights(&self) -> serde_json::Value {
        serde_json::json!({
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "strategy": if self.group_size == 0 { "channel" } else { "group" },
            "group_size": (self.group_size > 0).then_some(self.group_size),
            "actorder": null,
            "dynamic": false,
            "observer": "minmax",
        })
    }
}

impl Format for CompressedTensors {
    fn name(&self) -> &'static str {
        "compressed-tensors"
    }

    fn check(&self, ck: &Checkpoint, planned: &Planned) -> Result<()> {
        super::check_each(ck, planned, "compressed-tensors", refusal)
    }

    /// weight_packed (whole words per row), f16 scales, zero points packed along the output
    /// dimension (asymmetric grids), weight_shape, and the PEFT adapter's factors.
    fn stored_bits(&self, e: &QuantEntry) -> u64 {
        let Ok(grid) = e.grid() else {
            return e.expected_bits();
        };
        let groups = grid.groups(e.cols);
        let zeros = if grid.stores_zeros() {
            packed_words(e.rows, e.bits) * groups * 32
        } else {
            0
        };
        (e.rows * packed_words(e.cols, e.bits) * 32 + groups * e.rows * 16 + zeros + 128) as u64
            + peft::adapter_bits(e)
    }

    fn begin(
        &self,
        ck: &Checkpoint,
        dir: &Path,
        target: &Path,
        planned: &Planned,
    ) -> Result<Box<dyn FormatWriter>> {
        let entries: BTreeMap<&str, &QuantEntry> = planned
            .iter()
            .flatten()
            .map(|(n, e)| (n.as_str(), e))
            .collect();
        let model = hf::QuantModelWriter::begin(ck, dir, target, planned, |w, rows, cols| {
            let e = entries
                .get(w)
                .ok_or_else(|| Error::tensor(ck.dir(), w, "has no planned entry"))?;
            let m = hf::module_of(w);
            let b = e.bits;
            let grid = e.grid()?;
            let groups = grid.groups(cols);
            let mut t = vec![
                hf::tensor(
                    format!("{m}.weight_packed"),
                    "I32",
                    vec![rows, packed_words(cols, b)],
                ),
                hf::tensor(format!("{m}.weight_scale"), "F32", vec![rows, groups]),
            ];
            if grid.stores_zeros() {
                t.push(hf::tensor(
                    format!("{m}.weight_zero_point"),
                    "I32",
                    vec![packed_words(rows, b), groups],
                ));
            }
            t.push(hf::tensor(format!("{m}.weight_shape"), "I64", vec![2]));
            Ok(t)
        })?;
        let mut schemes: BTreeMap<Scheme, Vec<String>> = BTreeMap::new();
        for (w, e) in &entries {
            schemes
                .entry(Scheme::of(e))
                .or_default()
                .push(hf::module_of(w).to_string());
        }
        Ok(Box::new(CtWriter { model, schemes }))
    }
}

struct CtWriter {
    model: hf::QuantModelWriter,
    schemes: BTreeMap<Scheme, Vec<String>>,
}

/// The tensors of one module, in the planned order.
fn module_tensors(m: &CompressedMatrix) -> Result<Vec<(String, Vec<u8>)>> {
    let e = &m.entry;
    let (rows, cols, b) = (e.rows, e.cols, e.bits);
    let grid = e.grid()?;
    let module = hf::module_of(&m.weight);
    let codes = m.data.codes(rows, cols, b);
    let (scales, zeros) = m.data.scales_zeros(&grid, rows, cols);
    let groups = grid.groups(cols);
    let mut packed: Vec<u32> = Vec::with_capacity(rows * packed_words(cols, b));
    let mut row = vec![0u32; cols];
    for r in 0..rows {
        for (c, x) in row.iter_mut().enumerate() {
            *x = codes[r * cols + c].unwrap_or(0);
        }
        pack_row(&row, b, &mut packed);
    }
    // Zero points packed along the output dimension: column by column of groups.
    let zw = packed_words(rows, b);
    let mut zp = vec![0u32; zw * groups];
    let mut col = Vec::with_capacity(zw);
    let mut zs = vec![0u32; rows];
    for gi in 0..groups {
        for (r, z) in zs.iter_mut().enumerate() {
            *z = zeros[r * groups + gi] as u32;
        }
        col.clear();
        pack_row(&zs, b, &mut col);
        for (w, &v) in col.iter().enumerate() {
            zp[w * groups + gi] = v;
        }
    }
    let mut out = vec![
        (
            format!("{module}.weight_packed"),
            bytemuck::cast_slice(&packed).to_vec(),
        ),
        (
            format!("{module}.weight_scale"),
            bytemuck::cast_slice(&scales).to_vec(),
        ),
    ];
    if grid.stores_zeros() {
        out.push((
            format!("{module}.weight_zero_point"),
            bytemuck::cast_slice(&zp).to_vec(),
        ));
    }
    out.push((
        format!("{module}.weight_shape"),
        [rows as i64, cols as i64]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    ));
    Ok(out)
}

impl FormatWriter for CtWriter {
    fn layer(&mut self, ck: &Checkpoint, s: &CompressedLayer) -> Result<()> {
        self.model.layer(ck, s, module_tensors, |_| true)
    }

    fn finish(self: Box<Self>, ck: &Checkpoint, job: JobInfo) -> Result<Written> {
        let CtWriter { model, schemes } = *self;
        let one = schemes.len() == 1;
        let groups: serde_json::Map<String, serde_json::Value> = schemes
            .iter()
            .enumerate()
            .map(|(i, (scheme, modules))| {
                let targets = if one {
                    serde_json::json!(["Linear"])
                } else {
                    serde_json::json!(modules)
                };
                (
                    format!("group_{i}"),
                    serde_json::json!({
                        "targets": targets,
                        "weights": scheme.weights(),
                        "input_activations": null,
                        "output_activations": null,
                        "format": "pack-quantized",
                    }),
                )
            })
            .collect();
        // transformers' lm_head is a Linear even when tied to the embedding: never quantized.
        let ignore = ["lm_head"];
        let qc = serde_json::json!({
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignore,
            "kv_cache_scheme": null,
            "sparsity_config": {},
            "global_compression_ratio": null,
            "version": "0.20.1",
        });
        model.finish(ck, &job, qc, &[])
    }
}

/// Whether `dir` is a compressed-tensors output (its config names the method).
pub fn is_output(dir: &Path) -> bool {
    hf::quant_method(dir).as_deref() == Some("compressed-tensors")
}

/// Summarize the compressed-tensors output `dir` for `pumice inspect`.
pub fn summary(dir: &Path) -> Result<hf::QuantSummary> {
    hf::summary(
        dir,
        "compressed-tensors pack-quantized",
        |qc, cfg_path| {
            let groups = qc["config_groups"]
                .as_object()
                .ok_or_else(|| Error::config(cfg_path, "no quantization_config.config_groups"))?;
            Ok(groups
                .values()
                .map(|g| {
                    let w = &g["weights"];
                    hf::SchemeSummary {
                        bits: w["num_bits"].as_u64().unwrap_or(0),
                        group_size: w["group_size"].as_u64(),
                        symmetric: w["symmetric"].as_bool().unwrap_or(false),
                        targets: g["targets"].as_array().map_or(0, |t| t.len()),
                    }
                })
                .collect())
        },
        |name, shape, bytes| {
            if name.ends_with(".weight_shape") {
                let v: Vec<i64> = bytemuck::pod_collect_to_vec(bytes);
                hf::Stored::LinearShape(v.iter().map(|&d| d.max(0) as u64).product())
            } else if [".weight_packed", ".weight_scale", ".weight_zero_point"]
                .iter()
                .any(|s| name.ends_with(s))
            {
                hf::Stored::LinearPart
            } else {
                hf::Stored::Plain(shape.iter().product::<usize>() as u64)
            }
        },
    )
}
