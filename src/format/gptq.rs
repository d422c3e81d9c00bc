//! GPTQ checkpoints (GPTQModel, transformers + optimum, vLLM's gptq kernels): per linear module
//! `P`, `P.qweight` I32 [in·b/32, out] (pumice's little-endian bit stream of codes along the
//! input dimension, transposed: word w of row r is `qweight[w, r]`), `P.qzeros` I32
//! [groups, out·b/32] (integer zero points packed along the output dimension; `gptq_v2` stores
//! z, the older `gptq` format z − 1), `P.scales` F16 [groups, out] (pumice's f16 scales, bit for
//! bit) and `P.g_idx` I32 [in] (the group of every input column). Value = scale · (code − zero),
//! as pumice's.
//!
//! Holds exactly pumice's asymmetric (`sym: false`) and symmetric (`sym: true`, zero 2^(b−1))
//! grids at 2, 3, 4 and 8 bits, act-order included (`desc_act`: columns back in their original
//! order, g_idx naming the group each was quantized in). Refused by tensor: midrise and ggml
//! grids, randomized-Hadamard rotations, pruning, widths that are not multiples of 32, and in
//! the v1 format a zero point of 0 (v1 stores z − 1). One quantization_config describes every
//! module, so a checkpoint mixing bits, group sizes or grids is refused (compressed-tensors and
//! GGUF hold mixes). A CALDERA checkpoint's factors go to a PEFT adapter in `adapter/`.

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

/// GPTQ (`v1`: the original `gptq` checkpoint format, zero points stored minus one; otherwise
/// `gptq_v2`).
pub struct Gptq {
    pub v1: bool,
}

/// Why GPTQ cannot hold `e` exactly (None: it can; a v1 zero point of 0 is found when writing).
pub(crate) fn refusal(e: &QuantEntry) -> Option<String> {
    if e.rht.is_some() {
        return Some(
            "its codes are of a randomized-Hadamard-rotated weight, which GPTQ cannot reproduce \
             (compress without --rht, or export --format dense)"
                .into(),
        );
    }
    match e.kind {
        GridKind::Asymmetric | GridKind::Symmetric => {}
        GridKind::Midrise => {
            return Some(format!(
                "its {}-bit grid is midrise (zero {}), which GPTQ's integer zero points cannot \
                 express (compress with --grid symmetric or asymmetric, or export --format dense)",
                e.bits,
                ((1u32 << e.bits) - 1) as f32 / 2.0
            ))
        }
        GridKind::Iq4nl | GridKind::K | GridKind::Affine => {
            return Some(
                "its grid is one of ggml's (IQ4_NL, k-quant, or the affine Q4_1/Q5_1 grid with \
                 an f16 minimum), which GPTQ's integer grids cannot express (export --format \
                 gguf or dense)"
                    .into(),
            )
        }
    }
    if e.sparsity.is_some() {
        return Some("it is pruned; GPTQ stores every code (export --format dense)".into());
    }
    if ![2, 3, 4, 8].contains(&e.bits) {
        return Some(format!("{} bits: GPTQ kernels hold 2, 3, 4 or 8", e.bits));
    }
    if !e.cols.is_multiple_of(32) || !e.rows.is_multiple_of(32) {
        return Some(format!(
            "its shape {}×{} is not a multiple of 32 on both sides (GPTQ packs 32/b codes per \
             word along both dimensions)",
            e.rows, e.cols
        ));
    }
    peft::refusal(e)
}

use hf::Scheme;

/// The scheme every planned entry of the model in `dir` shares, or an error naming the first
/// that differs.
fn scheme(dir: &Path, planned: &Planned) -> Result<Scheme> {
    let mut it = planned.iter().flatten();
    let Some((_, first)) = it.next() else {
        return Err(Error::InvalidArgument(format!(
            "{}: no linear weight to write",
            dir.display()
        )));
    };
    let s = Scheme::of(first);
    for (name, e) in it {
        if Scheme::of(e) != s {
            return Err(Error::tensor(
                dir,
                name,
                format!(
                    "cannot be written to GPTQ exactly: its {}-bit {} grid in groups of {} differs \
                     from the first weight's {}-bit {} grid in groups of {}, and one GPTQ \
                     quantization_config describes every module (export --format \
                     compressed-tensors or gguf, which hold mixes)",
                    e.bits,
                    e.kind.name(),
                    e.group_size,
                    s.bits,
                    first.kind.name(),
                    s.group_size
                ),
            ));
        }
    }
    Ok(s)
}

impl Format for Gptq {
    fn name(&self) -> &'static str {
        if self.v1 {
            "gptq-v1"
        } else {
            "gptq"
        }
    }

    /// qweight, qzeros (packed along the output dimension, symmetric grids too), f16 scales,
    /// g_idx, and the PEFT adapter's factors.
    fn stored_bits(&self, e: &QuantEntry) -> u64 {
        let Ok(grid) = e.grid() else {
            return e.expected_bits();
        };
        let groups = grid.groups(e.cols);
        let words = e.rows * packed_words(e.cols, e.bits) + groups * packed_words(e.rows, e.bits);
        (words * 32 + groups * e.rows * 16 + e.cols * 32) as u64 + peft::adapter_bits(e)
    }

    fn check(&self, ck: &Checkpoint, planned: &Planned) -> Result<()> {
        super::check_each(ck, planned, "GPTQ", refusal)?;
        scheme(ck.dir(), planned).map(|_| ())
    }

    fn begin(
        &self,
        ck: &Checkpoint,
        dir: &Path,
        target: &Path,
        planned: &Planned,
    ) -> Result<Box<dyn FormatWriter>> {
        let scheme = scheme(ck.dir(), planned)?;
        let b = scheme.bits as usize;
        let model = hf::QuantModelWriter::begin(ck, dir, target, planned, |w, rows, cols| {
            let m = hf::module_of(w);
            let groups = match scheme.group_size {
                0 => 1,
                g => cols.div_ceil(g),
            };
            Ok(vec![
                hf::tensor(format!("{m}.qweight"), "I32", vec![cols * b / 32, rows]),
                hf::tensor(format!("{m}.qzeros"), "I32", vec![groups, rows * b / 32]),
                hf::tensor(format!("{m}.scales"), "F16", vec![groups, rows]),
                hf::tensor(format!("{m}.g_idx"), "I32", vec![cols]),
            ])
        })?;
        Ok(Box::new(GptqWriter {
            v1: self.v1,
            scheme,
            desc_act: planned.iter().flatten().any(|(_, e)| e.act_order),
            model,
        }))
    }
}

struct GptqWriter {
    v1: bool,
    scheme: Scheme,
    desc_act: bool,
    model: hf::QuantModelWriter,
}

fn u16s(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The tensors of one module, in the planned order: qweight, qzeros, scales, g_idx.
fn module_tensors(m: &CompressedMatrix, v1: bool) -> Result<Vec<(String, Vec<u8>)>> {
    let e = &m.entry;
    let (rows, cols, b) = (e.rows, e.cols, e.bits);
    let grid = e.grid()?;
    let module = hf::module_of(&m.weight);
    let groups = grid.groups(cols);
    let g = grid.group_len(cols);
    let stored = m.data.codes(rows, cols, b);
    // Stored column j is original column perm[j] (act-order); GPTQ keeps the original order
    // and names each column's group in g_idx.
    let perm: Vec<usize> = match m.data.perm.as_deref() {
        Some(p) => p
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect(),
        None => (0..cols).collect(),
    };
    let mut g_idx = vec![0i32; cols];
    for (j, &c) in perm.iter().enumerate() {
        g_idx[c] = (j / g) as i32;
    }
    let words = cols * b as usize / 32;
    let mut qweight = vec![0u32; words * rows];
    let (mut row, mut packed) = (vec![0u32; cols], Vec::with_capacity(words));
    for r in 0..rows {
        for (j, &c) in perm.iter().enumerate() {
            row[c] = stored[r * cols + j].unwrap_or(0);
        }
        packed.clear();
        pack_row(&row, b, &mut packed);
        for (w, &v) in packed.iter().enumerate() {
            qweight[w * rows + r] = v;
        }
    }
    // Zero points per group, packed along the output dimension; v1 stores z − 1.
    let (_, zeros) = m.data.scales_zeros(&grid, rows, cols);
    let mut qzeros = Vec::with_capacity(groups * rows * b as usize / 32);
    let mut zs = vec![0u32; rows];
    for gi in 0..groups {
        for (r, z) in zs.iter_mut().enumerate() {
            let zero = zeros[r * groups + gi] as u32;
            *z = match (v1, zero) {
                (false, z) => z,
                (true, 0) => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: cannot be written to GPTQ v1 exactly: row {r}, group {gi} has zero \
                         point 0, and v1 stores z − 1 (export --format gptq for gptq_v2, or \
                         compress with --grid symmetric)",
                        m.weight
                    )))
                }
                (true, z) => z - 1,
            };
        }
        pack_row(&zs, b, &mut qzeros);
    }
    // pumice's f16 scales, rows × groups, as [groups, rows] (bits unchanged).
    let s = u16s(&m.data.scales);
    let mut scales = vec![0u16; groups * rows];
    for r in 0..rows {
        for gi in 0..groups {
            scales[gi * rows + r] = s[r * groups + gi];
        }
    }
    Ok(vec![
        (
            format!("{module}.qweight"),
            bytemuck::cast_slice(&qweight).to_vec(),
        ),
        (
            format!("{module}.qzeros"),
            bytemuck::cast_slice(&qzeros).to_vec(),
        ),
        (
            format!("{module}.scales"),
            bytemuck::cast_slice(&scales).to_vec(),
        ),
        (
            format!("{module}.g_idx"),
            bytemuck::cast_slice(&g_idx).to_vec(),
        ),
    ])
}

impl FormatWriter for GptqWriter {
    fn layer(&mut self, ck: &Checkpoint, s: &CompressedLayer) -> Result<()> {
        let v1 = self.v1;
        // g_idx is the column order, not stored weight information.
        self.model.layer(
            ck,
            s,
            |m| module_tensors(m, v1),
            |name| !name.ends_with(".g_idx"),
        )
    }

    fn finish(self: Box<Self>, ck: &Checkpoint, job: JobInfo) -> Result<Written> {
        let GptqWriter {
            v1,
            scheme,
            desc_act,
            model,
        } = *self;
        let qc = serde_json::json!({
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": if scheme.group_size == 0 { -1 } else { scheme.group_size as i64 },
            "desc_act": desc_act,
            "sym": scheme.symmetric,
            "checkpoint_format": if v1 { "gptq" } else { "gptq_v2" },
            "format": if v1 { "gptq" } else { "gptq_v2" },
            "static_groups": false,
            "true_sequential": true,
            "lm_head": false,
            "damp_percent": 0.01,
            "pack_dtype": "int32",
        });
        model.finish(ck, &job, qc, &["quantize_config.json"])
    }
}

/// Whether `dir` is a GPTQ output (its config names the method).
pub fn is_output(dir: &Path) -> bool {
    hf::quant_method(dir).as_deref() == Some("gptq")
}

/// Summarize the GPTQ output `dir` for `pumice inspect`.
pub fn summary(dir: &Path) -> Result<hf::QuantSummary> {
    let (bits, modules) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0usize));
    let mut s = hf::summary(
        dir,
        "GPTQ",
        |qc, cfg_path| {
            let b = qc["bits"]
                .as_u64()
                .filter(|b| (1..=8).contains(b))
                .ok_or_else(|| Error::config(cfg_path, "quantization_config.bits is not 1..8"))?;
            bits.set(b);
            Ok(vec![hf::SchemeSummary {
                bits: b,
                group_size: qc["group_size"].as_u64(),
                symmetric: qc["sym"].as_bool().unwrap_or(false),
                targets: 0,
            }])
        },
        |name, shape, _| {
            if name.ends_with(".qweight") && shape.len() == 2 {
                // [in·b/32, out]
                modules.set(modules.get() + 1);
                hf::Stored::LinearCodes(shape[0] as u64 * 32 / bits.get() * shape[1] as u64)
            } else if name.ends_with(".qzeros") || name.ends_with(".scales") {
                hf::Stored::LinearPart
            } else if name.ends_with(".g_idx") {
                hf::Stored::Index
            } else {
                hf::Stored::Plain(shape.iter().product::<usize>() as u64)
            }
        },
    )?;
    s.schemes[0].targets = modules.get();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::PackedMatrix;
    use crate::quant::grid::unpack;
    use half::f16;

    const ROWS: usize = 32;
    const COLS: usize = 96;

    fn entry(bits: u32, group_size: usize, kind: GridKind, act_order: bool) -> QuantEntry {
        QuantEntry {
            method: "gptq".into(),
            bits,
            group_size,
            kind,
            act_order,
            rows: ROWS,
            cols: COLS,
            stored_bits: 0,
            relative_error: None,
            damp: None,
            rank: 0,
            lr_bits: 0,
            lr_group_size: 0,
            rht: None,
            sparsity: None,
            kept_per_row: COLS,
        }
    }

    fn code(r: usize, j: usize, bits: u32) -> u32 {
        ((r * 7 + j * 3 + r * j) % (1 << bits)) as u32
    }

    /// A matrix whose stored code (r, j) is code(r, j), scale of (r, g) 0.25·(1 + r + 3g) and
    /// zero (r + g) mod 2^b (so some zeros are 0); act-order stores the columns reversed.
    fn matrix(e: &QuantEntry) -> CompressedMatrix {
        let grid = e.grid().unwrap();
        let groups = grid.groups(COLS);
        let mut codes = Vec::new();
        for r in 0..ROWS {
            let row: Vec<u32> = (0..COLS).map(|j| code(r, j, e.bits)).collect();
            pack_row(&row, e.bits, &mut codes);
        }
        let f16s = |f: &dyn Fn(usize, usize) -> f32| -> Vec<u8> {
            (0..ROWS * groups)
                .flat_map(|i| f16::from_f32(f(i / groups, i % groups)).to_le_bytes())
                .collect()
        };
        let scales = f16s(&|r, g| 0.25 * (1 + r + 3 * g) as f32);
        let zeros = grid
            .stores_zeros()
            .then(|| f16s(&|r, g| ((r + g) % (1 << e.bits)) as f32));
        let perm = e.act_order.then(|| {
            (0..COLS as u32)
                .rev()
                .flat_map(|c| c.to_le_bytes())
                .collect()
        });
        CompressedMatrix {
            weight: "model.layers.0.mlp.up_proj.weight".into(),
            entry: e.clone(),
            data: PackedMatrix {
                codes: bytemuck::cast_slice(&codes).to_vec(),
                scales,
                zeros,
                perm,
                kept: COLS,
                ..Default::default()
            },
        }
    }

    fn i32s(b: &[u8]) -> Vec<u32> {
        bytemuck::pod_collect_to_vec(b)
    }

    #[test]
    fn layout_is_gptqs_transposed_stream_with_groups_by_column() {
        for (bits, g, kind, act) in [
            (4, 32, GridKind::Asymmetric, false),
            (3, 32, GridKind::Asymmetric, true),
            (2, 0, GridKind::Asymmetric, false),
            (8, 64, GridKind::Symmetric, false),
        ] {
            let e = entry(bits, g, kind, act);
            let m = matrix(&e);
            let t = module_tensors(&m, false).unwrap();
            let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
            let p = "model.layers.0.mlp.up_proj";
            assert_eq!(
                names,
                [
                    format!("{p}.qweight"),
                    format!("{p}.qzeros"),
                    format!("{p}.scales"),
                    format!("{p}.g_idx")
                ]
            );
            let (qweight, qzeros, g_idx) = (i32s(&t[0].1), i32s(&t[1].1), i32s(&t[3].1));
            let scales: Vec<u16> = bytemuck::pod_collect_to_vec(&t[2].1);
            let words = COLS * bits as usize / 32;
            let gl = if g == 0 { COLS } else { g };
            let groups = COLS.div_ceil(gl);
            assert_eq!(qweight.len(), words * ROWS);
            assert_eq!(scales.len(), groups * ROWS);
            let (grid_scales, grid_zeros) = m.data.scales_zeros(&e.grid().unwrap(), ROWS, COLS);
            for r in 0..ROWS {
                // Column r of qweight is row r's stream, columns in original order.
                let col: Vec<u32> = (0..words).map(|w| qweight[w * ROWS + r]).collect();
                for (c, &group) in g_idx.iter().enumerate() {
                    let j = if act { COLS - 1 - c } else { c };
                    assert_eq!(unpack(&col, c, bits), code(r, j, bits), "{bits} r{r} c{c}");
                    assert_eq!(group as usize, j / gl);
                }
                for gi in 0..groups {
                    let zrow = &qzeros[gi * ROWS * bits as usize / 32..];
                    assert_eq!(
                        unpack(zrow, r, bits) as f32,
                        grid_zeros[r * groups + gi],
                        "zero {bits} r{r} g{gi}"
                    );
                    assert_eq!(
                        f16::from_bits(scales[gi * ROWS + r]).to_f32(),
                        grid_scales[r * groups + gi]
                    );
                }
            }
        }
    }

    #[test]
    fn v1_stores_zero_minus_one_and_refuses_a_zero_of_zero() {
        let e = entry(4, 32, GridKind::Asymmetric, false);
        let err = module_tensors(&matrix(&e), true).unwrap_err().to_string();
        assert!(
            err.contains("up_proj.weight") && err.contains("zero point 0") && err.contains("v1"),
            "{err}"
        );
        // Symmetric: zero 8 is stored as 7 in v1, 8 in v2.
        let e = entry(4, 32, GridKind::Symmetric, false);
        let v1 = i32s(&module_tensors(&matrix(&e), true).unwrap()[1].1);
        let v2 = i32s(&module_tensors(&matrix(&e), false).unwrap()[1].1);
        assert!(v1.iter().all(|&w| w == 0x7777_7777), "{v1:x?}");
        assert!(v2.iter().all(|&w| w == 0x8888_8888), "{v2:x?}");
    }

    #[test]
    fn one_scheme_for_the_whole_model_and_grids_it_cannot_hold_are_refused() {
        let dir = Path::new("/m");
        let a = entry(4, 32, GridKind::Asymmetric, false);
        let mut b = a.clone();
        b.bits = 3;
        let planned = vec![vec![("w0".to_string(), a.clone()), ("w1".to_string(), b)]];
        let err = scheme(dir, &planned).unwrap_err().to_string();
        assert!(err.contains("w1") && err.contains("one GPTQ"), "{err}");
        assert!(scheme(dir, &[vec![("w0".to_string(), a.clone())]]).is_ok());
        assert!(refusal(&a).is_none());
        for (e, want) in [
            (entry(3, 32, GridKind::Midrise, false), "midrise"),
            (entry(4, 32, GridKind::K, false), "ggml"),
            (entry(5, 32, GridKind::Asymmetric, false), "5 bits"),
            (
                QuantEntry {
                    cols: 80,
                    ..a.clone()
                },
                "multiple of 32",
            ),
            (
                QuantEntry {
                    sparsity: Some("2:4".into()),
                    ..a.clone()
                },
                "pruned",
            ),
        ] {
            let why = refusal(&e).unwrap_or_default();
            assert!(why.contains(want), "{want}: {why}");
        }
    }
}
