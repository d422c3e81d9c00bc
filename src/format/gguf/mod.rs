//! GGUF for llama.cpp (and Ollama, LM Studio, transformers' GGUF loader): the whole model in one
//! file `model.gguf` — architecture metadata (llama or qwen2; RoPE and its scaling), the
//! tokenizer, every linear weight in a ggml block type that holds pumice's values exactly, the
//! embeddings and LM head in their source dtype, norms and biases in f32 — and CALDERA's L·R in
//! a GGUF LoRA adapter `adapter.gguf` (`llama-cli --lora`).
//!
//! Exact carriers of pumice's grids (the codes are not re-rounded): a symmetric grid's value
//! s·(q − 2^(b−1)) is ggml's own d·q' with d = s, q' = q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1]
//! (4 bits: Q4_0 exactly, 8 bits: Q8_0 exactly); an asymmetric grid's s·(q − z) is d·q' with
//! d = s, q' = q − z ∈ [−maxq, maxq]; a midrise grid's s·(q − maxq/2) is d·q' with d = s/2,
//! q' = 2q − maxq ∈ [−maxq, maxq]. Q4_0 stores q' + 8 ∈ [0, 15] and so holds symmetric grids of
//! up to 4 bits and the others of up to 3; Q8_0 holds q' ∈ [−128, 127]. Groups of 32 or more
//! repeat their scale in every 32-block. A pruned weight is q' = 0.
//! Not representable (refused by tensor): randomized-Hadamard rotations, act-order (GGUF has
//! no column permutation). Widths that are not whole 32-blocks are stored as f32 (exact).
//! llama.cpp's q/k row order for the llama architecture is applied (rows and adapter B alike).

pub mod file;
mod tokenizer;

use std::collections::HashMap;
use std::path::Path;

use half::f16;

use crate::error::{Error, Result};
use crate::model::compressed::{Accounting, QuantEntry};
use crate::model::config::{Family, RopeScaling};
use crate::model::{Checkpoint, LinearKind};
use crate::quant::GridKind;

use super::{weights::factors, CompressedLayer, CompressedMatrix, Format, FormatWriter};
use super::{JobInfo, Planned, Written};
use file::{GgmlType, GgufWriter, TensorInfo, Value};

/// The model file inside the output directory.
pub const MODEL_FILE: &str = "model.gguf";
/// The LoRA adapter holding CALDERA's factors.
pub const ADAPTER_FILE: &str = "adapter.gguf";

/// GGUF, with every linear weight in `linear` (None: the smallest exact type per weight).
pub struct Gguf {
    pub linear: Option<GgmlType>,
    /// The LoRA adapter's float dtype (f32: exact).
    pub lora: crate::DType,
}

/// The ggml types that hold `e`'s values exactly, smallest first, or why none does.
pub(crate) fn exact_types(e: &QuantEntry) -> std::result::Result<Vec<GgmlType>, String> {
    if e.rht.is_some() {
        return Err(
            "its codes are of a randomized-Hadamard-rotated weight, which no ggml type \
                    reproduces (compress without --rht, or export --format dense)"
                .into(),
        );
    }
    if e.act_order {
        return Err(
            "act-order stores columns permuted and GGUF has no permutation (compress \
                    without --act-order, or export --format dense)"
                .into(),
        );
    }
    if e.bits > 8 {
        return Err(format!("{} bits", e.bits));
    }
    let mut t = Vec::new();
    if e.kind == GridKind::K {
        if e.cols.is_multiple_of(crate::quant::kquant::SUPER) && e.sparsity.is_none() {
            match e.bits {
                2 => t.push(GgmlType::Q2K),
                3 => t.push(GgmlType::Q3K),
                4 => t.push(GgmlType::Q4K),
                6 => t.push(GgmlType::Q6K),
                _ => {}
            }
        }
    } else if e.kind == GridKind::Iq4nl {
        // IQ4_NL has no level at 0 for a pruned weight.
        if e.cols.is_multiple_of(32) && e.sparsity.is_none() {
            t.push(GgmlType::Iq4Nl);
        }
    } else if e.cols.is_multiple_of(32) {
        let (lo, hi) = level_range(e.kind, e.bits);
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            let (tlo, thi) = if ty == GgmlType::Q4_0 {
                (-8, 7)
            } else {
                (-128, 127)
            };
            if tlo <= lo && hi <= thi {
                t.push(ty);
            }
        }
    }
    t.push(GgmlType::F32);
    Ok(t)
}

/// The range of the integer q' (value = d·q') a grid's codes become (module docs).
fn level_range(kind: GridKind, bits: u32) -> (i32, i32) {
    let maxq = (1i32 << bits) - 1;
    match kind {
        GridKind::Symmetric => (-(1 << (bits - 1)), (1 << (bits - 1)) - 1),
        GridKind::Asymmetric | GridKind::Midrise => (-maxq, maxq),
        // The codebook's indices are stored as they are; k grids have their own blocks.
        GridKind::Iq4nl | GridKind::K => (0, 15),
    }
}

/// A code's integer q' and the block scale d for scale s (module docs).
fn ggml_level(kind: GridKind, code: u32, s: f32, z: f32, maxq: i32) -> (i32, f32) {
    match kind {
        GridKind::Midrise => (2 * code as i32 - maxq, s / 2.0),
        GridKind::Asymmetric | GridKind::Symmetric => (code as i32 - z as i32, s),
        GridKind::Iq4nl | GridKind::K => (code as i32, s),
    }
}

fn arch_name(ck: &Checkpoint) -> &'static str {
    match ck.config().family {
        Family::Qwen2 => "qwen2",
        Family::Llama | Family::Mistral => "llama",
    }
}

/// llama.cpp's row order for q and k of the llama architecture (rotary pairs interleaved):
/// GGUF row h·d + 2i + j is HF row h·d + j·d/2 + i.
fn row_order(ck: &Checkpoint, kind: LinearKind, rows: usize) -> Vec<usize> {
    let c = ck.config();
    let heads = match kind {
        LinearKind::QProj => c.num_heads,
        LinearKind::KProj => c.num_kv_heads,
        _ => 0,
    };
    if heads == 0 || c.family == Family::Qwen2 {
        return (0..rows).collect();
    }
    let d = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                order.push(h * d + j * (d / 2) + i);
            }
        }
    }
    order
}

fn gguf_name(kind: LinearKind) -> &'static str {
    match kind {
        LinearKind::QProj => "attn_q",
        LinearKind::KProj => "attn_k",
        LinearKind::VProj => "attn_v",
        LinearKind::OProj => "attn_output",
        LinearKind::GateProj => "ffn_gate",
        LinearKind::UpProj => "ffn_up",
        LinearKind::DownProj => "ffn_down",
    }
}

/// Encode a k grid's backbone as Q4_K or Q2_K (ggml's block layouts), rows in `order`: the
/// stored d, dmin and sub-block scales and minimums, the codes as they are.
fn encode_k(m: &CompressedMatrix, ty: GgmlType, order: &[usize]) -> Result<Vec<u8>> {
    use crate::quant::kquant::{unpack_stored, SUPER};
    let e = &m.entry;
    let (rows, cols) = (e.rows, e.cols);
    let grid = e.grid()?;
    let bad = |msg: &str| Error::Shape(format!("{}: {msg}", m.weight));
    let k = grid.ktype().ok_or_else(|| bad("not a k grid"))?;
    let want = match ty {
        GgmlType::Q4K => 4,
        GgmlType::Q2K => 2,
        GgmlType::Q3K => 3,
        GgmlType::Q6K => 6,
        _ => return Err(bad("not a k-quant type")),
    };
    if k.bits != want {
        return Err(bad("its k grid is not this type's"));
    }
    let codes = m.data.codes(rows, cols, e.bits);
    let mut dd = Vec::new();
    crate::DType::F16.decode_f32(&m.data.scales, &mut dd);
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(
        m.data
            .subscales
            .as_deref()
            .ok_or_else(|| bad("no sub-block scales"))?,
    );
    let supers = unpack_stored(k, &dd, &words, rows, cols);
    let nsb = cols / SUPER;
    let mut out = Vec::with_capacity(rows * ty.row_bytes(cols).unwrap_or(0));
    for &r in order {
        for sb in 0..nsb {
            let p = &supers[r * nsb + sb];
            let q = |j: usize| -> Result<u8> {
                codes[r * cols + sb * SUPER + j]
                    .map(|c| c as u8)
                    .ok_or_else(|| bad("a pruned weight has no k-quant level"))
            };
            let d = f16::from_f32(p.d).to_le_bytes();
            let dmin = f16::from_f32(p.dmin).to_le_bytes();
            if ty == GgmlType::Q3K {
                // hmask: byte l bit s holds the high bit of value s·32 + l.
                for l in 0..32 {
                    let mut b = 0u8;
                    for s in 0..8 {
                        b |= (q(s * 32 + l)? >> 2) << s;
                    }
                    out.push(b);
                }
                // qs: as Q2_K's, the low two bits.
                for c in 0..2 {
                    for l in 0..32 {
                        let mut b = 0u8;
                        for s in 0..4 {
                            b |= (q(c * 128 + s * 32 + l)? & 3) << (2 * s);
                        }
                        out.push(b);
                    }
                }
                // scales: the 16 6-bit (sc + 32) as low nibbles (8 bytes, j and j + 8) and
                // high two bits (4 bytes, 2·s bits of byte i for j = 4·s + i).
                let s6 = &p.sc;
                for i in 0..8 {
                    out.push(((s6[i] & 15) | ((s6[i + 8] & 15) << 4)) as u8);
                }
                for i in 0..4 {
                    let mut b = 0u32;
                    for s in 0..4 {
                        b |= (s6[4 * s + i] >> 4) << (2 * s);
                    }
                    out.push(b as u8);
                }
                out.extend(d);
                continue;
            }
            if ty == GgmlType::Q6K {
                // ql: byte c·64 + l, nibble h holds the low four bits of value c·128 + h·64 + l.
                for c in 0..2 {
                    for l in 0..64 {
                        out.push((q(c * 128 + l)? & 15) | ((q(c * 128 + 64 + l)? & 15) << 4));
                    }
                }
                // qh: byte c·32 + l, bits 2·s hold the high two bits of value c·128 + s·32 + l.
                for c in 0..2 {
                    for l in 0..32 {
                        let mut b = 0u8;
                        for s in 0..4 {
                            b |= (q(c * 128 + s * 32 + l)? >> 4) << (2 * s);
                        }
                        out.push(b);
                    }
                }
                // scales: int8 (stored offset by 128).
                for j in 0..16 {
                    out.push((p.sc[j] as i32 - 128) as i8 as u8);
                }
                out.extend(d);
                continue;
            }
            if ty == GgmlType::Q4K {
                out.extend(d);
                out.extend(dmin);
                let (sc, mn) = (&p.sc, &p.m);
                for i in 0..4 {
                    out.push((sc[i] | ((sc[4 + i] >> 4) << 6)) as u8);
                }
                for i in 0..4 {
                    out.push((mn[i] | ((mn[4 + i] >> 4) << 6)) as u8);
                }
                for i in 0..4 {
                    out.push(((sc[4 + i] & 15) | ((mn[4 + i] & 15) << 4)) as u8);
                }
                // Four chunks of 64 values: low nibbles the first 32, high nibbles the rest.
                for c in 0..4 {
                    for l in 0..32 {
                        out.push(q(c * 64 + l)? | (q(c * 64 + 32 + l)? << 4));
                    }
                }
            } else {
                for j in 0..16 {
                    out.push((p.sc[j] | (p.m[j] << 4)) as u8);
                }
                // Two chunks of 128 values: byte l holds values s·32 + l at bits 2s.
                for c in 0..2 {
                    for l in 0..32 {
                        let mut b = 0u8;
                        for s in 0..4 {
                            b |= q(c * 128 + s * 32 + l)? << (2 * s);
                        }
                        out.push(b);
                    }
                }
                out.extend(d);
                out.extend(dmin);
            }
        }
    }
    Ok(out)
}

/// Encode `m`'s backbone as `ty`, rows in `order`.
fn encode(m: &CompressedMatrix, ty: GgmlType, order: &[usize]) -> Result<Vec<u8>> {
    let e = &m.entry;
    let (rows, cols) = (e.rows, e.cols);
    if matches!(
        ty,
        GgmlType::Q4K | GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q6K
    ) {
        return encode_k(m, ty, order);
    }
    if ty == GgmlType::F32 {
        let v = m.backbone()?;
        let mut out = Vec::with_capacity(rows * cols * 4);
        for &r in order {
            out.extend(bytemuck::cast_slice(&v[r * cols..(r + 1) * cols]));
        }
        return Ok(out);
    }
    let grid = e.grid()?;
    let codes = m.data.codes(rows, cols, e.bits);
    let (scales, zeros) = m.data.scales_zeros(&grid, rows, cols);
    let groups = grid.groups(cols);
    let g = grid.group_len(cols);
    let maxq = grid.maxq() as i32;
    let bad = |msg: String| Error::Shape(format!("{}: {msg}", m.weight));
    let mut out = Vec::with_capacity(rows * ty.row_bytes(cols).unwrap_or(0));
    let mut q = [0i32; 32];
    for &r in order {
        for b in 0..cols / 32 {
            let gi = r * groups + (b * 32) / g;
            let (s, z) = (scales[gi], zeros[gi]);
            let d = ggml_level(grid.kind, 0, s, z, maxq).1;
            let dh = f16::from_f32(d);
            if dh.to_f32() != d {
                return Err(bad(format!("scale {s} has no exact f16 block scale")));
            }
            for (k, x) in q.iter_mut().enumerate() {
                *x = match codes[r * cols + b * 32 + k] {
                    None => 0,
                    Some(c) => ggml_level(grid.kind, c, s, z, maxq).0,
                };
            }
            out.extend(dh.to_le_bytes());
            match ty {
                GgmlType::Q8_0 => out.extend(q.iter().map(|&x| x as i8 as u8)),
                GgmlType::Q4_0 => {
                    if let Some(x) = q.iter().find(|&&x| !(-8..=7).contains(&x)) {
                        return Err(bad(format!("value {x} does not fit Q4_0")));
                    }
                    out.extend((0..16).map(|j| ((q[j] + 8) | ((q[j + 16] + 8) << 4)) as u8));
                }
                // Codebook indices, packed as Q4_0's nibbles (a pruned weight has none: the
                // grid never prunes).
                GgmlType::Iq4Nl => {
                    if grid.kind != GridKind::Iq4nl
                        || codes[r * cols + b * 32..][..32].contains(&None)
                    {
                        return Err(bad("IQ4_NL holds only iq4nl codes".into()));
                    }
                    out.extend((0..16).map(|j| (q[j] | (q[j + 16] << 4)) as u8));
                }
                _ => unreachable!("float types return above"),
            }
        }
    }
    Ok(out)
}

impl Gguf {
    fn linear_type(&self, e: &QuantEntry) -> std::result::Result<GgmlType, String> {
        let exact = exact_types(e)?;
        match self.linear {
            None => Ok(exact[0]),
            Some(t) if exact.contains(&t) => Ok(t),
            Some(t) => Err(format!(
                "{} cannot hold its {}-bit {} grid exactly over {} columns (exact: {})",
                t.name(),
                e.bits,
                e.kind.name(),
                e.cols,
                exact
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

fn float_type(d: crate::DType) -> GgmlType {
    match d {
        crate::DType::F32 => GgmlType::F32,
        crate::DType::F16 => GgmlType::F16,
        crate::DType::BF16 => GgmlType::BF16,
    }
}

/// The model's metadata: architecture, RoPE, tokenizer.
fn metadata(ck: &Checkpoint, types: &[GgmlType]) -> Result<Vec<(String, Value)>> {
    let c = ck.config();
    let a = arch_name(ck);
    // The source model's directory name (a compressed checkpoint records its source), so
    // `compress --format gguf` and `export` of the same compression write the same file.
    let source = ck
        .manifest()
        .map(|m| std::path::PathBuf::from(&m.source.path))
        .unwrap_or_else(|| ck.dir().to_path_buf());
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let file_type = match types.first() {
        Some(GgmlType::Q8_0) => 7,
        Some(GgmlType::Q4_0) => 2,
        Some(GgmlType::Iq4Nl) => 25,
        Some(GgmlType::Q4K) => 14,
        Some(GgmlType::Q2K) => 10,
        Some(GgmlType::Q3K) => 11,
        Some(GgmlType::Q6K) => 18,
        _ => 0,
    };
    let k = |s: &str| format!("{a}.{s}");
    let mut kv = vec![
        ("general.architecture".to_string(), Value::Str(a.into())),
        ("general.name".to_string(), Value::Str(name)),
        ("general.file_type".to_string(), Value::U32(file_type)),
        (
            k("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("block_count"), Value::U32(c.num_layers as u32)),
        (
            k("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (k("attention.head_count"), Value::U32(c.num_heads as u32)),
        (
            k("attention.head_count_kv"),
            Value::U32(c.num_kv_heads as u32),
        ),
        (k("attention.key_length"), Value::U32(c.head_dim as u32)),
        (k("attention.value_length"), Value::U32(c.head_dim as u32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope.theta as f32)),
        (k("rope.dimension_count"), Value::U32(c.head_dim as u32)),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
    ];
    if let RopeScaling::Linear { factor } = c.rope.scaling {
        kv.push((k("rope.scaling.type"), Value::Str("linear".into())));
        kv.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    kv.extend(tokenizer::metadata(ck.dir(), c)?);
    Ok(kv)
}

/// Llama 3.1's per-frequency RoPE divisors (`rope_freqs.weight`, as llama.cpp applies them).
fn rope_freqs(ck: &Checkpoint) -> Option<Vec<f32>> {
    let c = ck.config();
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = c.rope.scaling
    else {
        return None;
    };
    let old = original_max_position_embeddings as f64;
    let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
    let d = c.head_dim;
    Some(
        (0..d / 2)
            .map(|i| {
                let freq = 1.0 / c.rope.theta.powf((2 * i) as f64 / d as f64);
                let wl = 2.0 * std::f64::consts::PI / freq;
                (if wl < high_wl {
                    1.0
                } else if wl > low_wl {
                    factor
                } else {
                    let smooth =
                        (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }) as f32
            })
            .collect(),
    )
}

impl Format for Gguf {
    fn name(&self) -> &'static str {
        "gguf"
    }

    fn check(&self, ck: &Checkpoint, planned: &Planned) -> Result<()> {
        super::check_each(ck, planned, "GGUF", |e| self.linear_type(e).err())?;
        metadata(ck, &[])?;
        Ok(())
    }

    fn begin(
        &self,
        ck: &Checkpoint,
        dir: &Path,
        _target: &Path,
        planned: &Planned,
    ) -> Result<Box<dyn FormatWriter>> {
        let arch = ck.arch();
        let types: HashMap<String, GgmlType> = planned
            .iter()
            .flatten()
            .map(|(n, e)| {
                self.linear_type(e)
                    .map(|t| (n.clone(), t))
                    .map_err(|why| Error::tensor(ck.dir(), n, why))
            })
            .collect::<Result<_>>()?;
        let type_of = |w: &str| {
            types
                .get(w)
                .copied()
                .ok_or_else(|| Error::tensor(ck.dir(), w, "has no planned entry"))
        };
        let plain = |name: &str, gname: String| -> Result<TensorInfo> {
            let t = ck.tensor(name)?;
            let ty = plain_type(&t);
            Ok(TensorInfo {
                name: gname,
                ne: t.shape.iter().rev().copied().collect(),
                ty,
            })
        };
        let mut plan = vec![plain(&arch.embed_tokens.name, "token_embd.weight".into())?];
        let freqs = rope_freqs(ck);
        if let Some(f) = &freqs {
            plan.push(TensorInfo {
                name: "rope_freqs.weight".into(),
                ne: vec![f.len()],
                ty: GgmlType::F32,
            });
        }
        for (l, spec) in arch.layers.iter().enumerate() {
            let p = |s: &str| format!("blk.{l}.{s}");
            plan.push(plain(&spec.input_norm.name, p("attn_norm.weight"))?);
            for lin in &spec.linears {
                if lin.kind == LinearKind::GateProj {
                    plan.push(plain(&spec.post_attention_norm.name, p("ffn_norm.weight"))?);
                }
                let ty = type_of(&lin.weight.name)?;
                plan.push(TensorInfo {
                    name: p(&format!("{}.weight", gguf_name(lin.kind))),
                    ne: vec![lin.in_features, lin.out_features],
                    ty,
                });
                if let Some(b) = &lin.bias {
                    plan.push(TensorInfo {
                        name: p(&format!("{}.bias", gguf_name(lin.kind))),
                        ne: vec![b.shape[0]],
                        ty: GgmlType::F32,
                    });
                }
            }
        }
        plan.push(plain(&arch.final_norm.name, "output_norm.weight".into())?);
        if let Some(h) = &arch.lm_head {
            plan.push(plain(&h.name, "output.weight".into())?);
        }
        let path = dir.join(MODEL_FILE);
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for t in types.values() {
            *counts.entry(t.id()).or_default() += 1;
        }
        let common = [
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::Iq4Nl,
            GgmlType::Q2K,
            GgmlType::Q3K,
            GgmlType::Q4K,
            GgmlType::Q6K,
            GgmlType::F32,
        ]
        .into_iter()
        .max_by_key(|t| counts.get(&t.id()).copied().unwrap_or(0));
        let kv = metadata(ck, common.as_slice())?;
        let mut writer = GgufWriter::create(&path, &kv, plan)?;
        write_plain(
            &mut writer,
            ck,
            &arch.embed_tokens.name,
            "token_embd.weight",
        )?;
        if let Some(f) = &freqs {
            writer.write("rope_freqs.weight", bytemuck::cast_slice(f))?;
        }
        let lora = lora_plan(ck, planned, float_type(self.lora))?
            .map(|(plan, rank)| {
                let kv = vec![
                    ("general.type".to_string(), Value::Str("adapter".into())),
                    (
                        "general.architecture".to_string(),
                        Value::Str(arch_name(ck).into()),
                    ),
                    ("adapter.type".to_string(), Value::Str("lora".into())),
                    ("adapter.lora.alpha".to_string(), Value::F32(rank as f32)),
                ];
                GgufWriter::create(&dir.join(ADAPTER_FILE), &kv, plan).map(|w| (w, rank))
            })
            .transpose()?;
        Ok(Box::new(GgufOut {
            writer,
            types,
            lora,
            lora_dtype: self.lora,
            linear_params: 0,
            linear_bytes: 0,
        }))
    }
}

/// The adapter's tensors (weights with factors, all padded to the largest rank) and that rank.
fn lora_plan(
    ck: &Checkpoint,
    planned: &Planned,
    ty: GgmlType,
) -> Result<Option<(Vec<TensorInfo>, usize)>> {
    let rank = planned
        .iter()
        .flatten()
        .map(|(_, e)| e.rank)
        .max()
        .unwrap_or(0);
    if rank == 0 {
        return Ok(None);
    }
    let mut plan = Vec::new();
    for (l, spec) in ck.arch().layers.iter().enumerate() {
        for lin in &spec.linears {
            let e = planned[l].iter().find(|(n, _)| *n == lin.weight.name);
            if e.is_some_and(|(_, e)| e.rank > 0) {
                let n = format!("blk.{l}.{}.weight", gguf_name(lin.kind));
                plan.push(TensorInfo {
                    name: format!("{n}.lora_a"),
                    ne: vec![lin.in_features, rank],
                    ty,
                });
                plan.push(TensorInfo {
                    name: format!("{n}.lora_b"),
                    ne: vec![rank, lin.out_features],
                    ty,
                });
            }
        }
    }
    Ok(Some((plan, rank)))
}

/// The ggml type a tensor copied from the source gets: norms and biases f32 (what llama.cpp
/// expects), matrices their source dtype.
fn plain_type(t: &crate::model::TensorRef<'_>) -> GgmlType {
    if t.shape.len() == 1 {
        GgmlType::F32
    } else {
        float_type(t.dtype)
    }
}

fn write_plain(w: &mut GgufWriter, ck: &Checkpoint, name: &str, gname: &str) -> Result<()> {
    let t = ck.tensor(name)?;
    if plain_type(&t) != float_type(t.dtype) {
        w.write(gname, bytemuck::cast_slice(&t.to_f32()?))?;
    } else {
        w.write(gname, t.bytes)?;
    }
    ck.release(name);
    Ok(())
}

struct GgufOut {
    writer: GgufWriter,
    types: HashMap<String, GgmlType>,
    lora: Option<(GgufWriter, usize)>,
    lora_dtype: crate::DType,
    linear_params: usize,
    linear_bytes: u64,
}

impl FormatWriter for GgufOut {
    fn layer(&mut self, ck: &Checkpoint, s: &CompressedLayer) -> Result<()> {
        let spec = &ck.arch().layers[s.layer];
        let l = s.layer;
        write_plain(
            &mut self.writer,
            ck,
            &spec.input_norm.name,
            &format!("blk.{l}.attn_norm.weight"),
        )?;
        for lin in &spec.linears {
            if lin.kind == LinearKind::GateProj {
                write_plain(
                    &mut self.writer,
                    ck,
                    &spec.post_attention_norm.name,
                    &format!("blk.{l}.ffn_norm.weight"),
                )?;
            }
            let m = s
                .matrices
                .iter()
                .find(|m| m.weight == lin.weight.name)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("{}: missing from layer {l}", lin.weight.name))
                })?;
            let ty = self.types[&lin.weight.name];
            let order = row_order(ck, lin.kind, lin.out_features);
            let n = format!("blk.{l}.{}.weight", gguf_name(lin.kind));
            let data = encode(m, ty, &order)?;
            self.linear_params += lin.out_features * lin.in_features;
            self.linear_bytes += data.len() as u64;
            self.writer.write(&n, &data)?;
            if let Some(b) = &lin.bias {
                let gb = format!("blk.{l}.{}.bias", gguf_name(lin.kind));
                let v = ck.tensor(&b.name)?.to_f32()?;
                let v: Vec<f32> = order.iter().map(|&r| v[r]).collect();
                self.writer.write(&gb, bytemuck::cast_slice(&v))?;
            }
            if let (Some((w, rank)), Some((lt, r))) = (&mut self.lora, factors(&m.entry, &m.data)?)
            {
                let (rows, cols, k) = (m.entry.rows, m.entry.cols, m.entry.rank);
                // lora_a = R zero-padded to `rank` rows; lora_b = L (rows in GGUF order),
                // zero-padded to `rank` columns.
                let mut a = r.clone();
                a.resize(*rank * cols, 0.0);
                let mut bm = vec![0.0f32; rows * *rank];
                for (i, &hr) in order.iter().enumerate() {
                    for t in 0..k {
                        bm[i * *rank + t] = lt[t * rows + hr];
                    }
                }
                w.write(&format!("{n}.lora_a"), &self.lora_dtype.encode_f32(&a))?;
                w.write(&format!("{n}.lora_b"), &self.lora_dtype.encode_f32(&bm))?;
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, ck: &Checkpoint, job: JobInfo) -> Result<Written> {
        let arch = ck.arch();
        write_plain(
            &mut self.writer,
            ck,
            &arch.final_norm.name,
            "output_norm.weight",
        )?;
        if let Some(h) = &arch.lm_head {
            write_plain(&mut self.writer, ck, &h.name, "output.weight")?;
        }
        let GgufOut {
            writer,
            lora,
            linear_params,
            linear_bytes,
            ..
        } = *self;
        let mut files = vec![(MODEL_FILE.to_string(), writer.finish()?)];
        if let Some((w, _)) = lora {
            files.push((ADAPTER_FILE.to_string(), w.finish()?));
        }
        let total: u64 = files.iter().map(|(_, b)| b).sum();
        Ok(Written {
            files,
            total: Accounting::new(job.source.parameters, total * 8),
            linear: Accounting::new(linear_params, linear_bytes * 8),
        })
    }
}

/// What `pumice inspect` says about a GGUF output: sizes and bits per weight, by ggml type.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GgufSummary {
    pub path: String,
    pub architecture: String,
    pub tensors: usize,
    pub parameters: u64,
    /// Parameters of the decoder's linear weights (blk.N.attn_* / ffn_* .weight).
    pub linear_parameters: u64,
    pub bytes: u64,
    pub bits_per_parameter: f64,
    pub linear_bits_per_parameter: f64,
    /// Per ggml type: tensors and parameters.
    pub types: std::collections::BTreeMap<String, (usize, u64)>,
    /// The LoRA adapter beside it (adapter.gguf): bytes, tensors, alpha.
    pub adapter: Option<(u64, usize, serde_json::Value)>,
}

/// Summarize `path` (a GGUF file, or a directory holding model.gguf).
pub fn summary(path: &Path) -> Result<GgufSummary> {
    let file = if path.is_dir() {
        path.join(MODEL_FILE)
    } else {
        path.to_path_buf()
    };
    let info = file::read_info(&file)?;
    let mut types = std::collections::BTreeMap::new();
    let (mut params, mut linear_params, mut linear_bytes) = (0u64, 0u64, 0u64);
    for (name, dims, ty) in &info.tensors {
        let n: u64 = dims.iter().product();
        params += n;
        let e = types
            .entry(file::GgufInfo::type_name(*ty))
            .or_insert((0, 0));
        e.0 += 1;
        e.1 += n;
        let linear = name.starts_with("blk.")
            && name.ends_with(".weight")
            && (name.contains(".attn_") || name.contains(".ffn_"))
            && !name.ends_with("_norm.weight");
        if linear {
            linear_params += n;
            linear_bytes += file::GgufInfo::tensor_bytes(*ty, n).unwrap_or(0);
        }
    }
    let adapter_path = file.with_file_name(ADAPTER_FILE);
    let adapter = if adapter_path.is_file() {
        let a = file::read_info(&adapter_path)?;
        Some((
            a.bytes,
            a.tensors.len(),
            a.metadata
                .get("adapter.lora.alpha")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
        ))
    } else {
        None
    };
    let total = info.bytes + adapter.as_ref().map_or(0, |a| a.0);
    Ok(GgufSummary {
        path: file.display().to_string(),
        architecture: info
            .metadata
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string(),
        tensors: info.tensors.len(),
        parameters: params,
        linear_parameters: linear_params,
        bytes: total,
        bits_per_parameter: total as f64 * 8.0 / params.max(1) as f64,
        linear_bits_per_parameter: linear_bytes as f64 * 8.0 / linear_params.max(1) as f64,
        types,
        adapter,
    })
}
