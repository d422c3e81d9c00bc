//! GGUF for llama.cpp (and Ollama, LM Studio, transformers' GGUF loader): the whole model in one
//! file `model.gguf` — architecture metadata (llama or qwen2; RoPE and its scaling), the
//! tokenizer, every linear weight in a ggml block type that holds pumice's values exactly, the
//! embeddings and LM head in their source dtype, norms and biases in f32 — and CALDERA's L·R in
//! a GGUF LoRA adapter `adapter.gguf` (`llama-cli --lora`), which also carries a tuned PEFT LoRA
//! (`export --lora`, e.g. `finetune --lora-rank`'s output), stacked onto the factors.
//!
//! Which ggml block type holds which grid exactly, and the encoders: [`blocks`].
//! llama.cpp's q/k row order for the llama architecture is applied (rows and adapter B alike).

mod blocks;
pub mod file;
mod tokenizer;

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::compressed::{Accounting, QuantEntry};
use crate::model::config::{Family, RopeScaling};
use crate::model::{Checkpoint, LinearKind};

use super::{weights::factors, CompressedLayer, CompressedMatrix, Format, FormatWriter};
use super::{JobInfo, Planned, Written};
use blocks::{encode, exact_types};
use file::{GgmlType, GgufWriter, TensorInfo, Value};

/// The model file inside the output directory.
pub const MODEL_FILE: &str = "model.gguf";
/// The LoRA adapter holding CALDERA's factors (and a tuned adapter's pairs).
pub const ADAPTER_FILE: &str = "adapter.gguf";

/// GGUF, with every linear weight in `linear` (None: the smallest exact type per weight).
pub struct Gguf {
    pub linear: Option<GgmlType>,
    /// What the LoRA adapter's factors are stored in (f32: exact; f16, bf16, q8_0 round).
    pub lora: super::StoreType,
    /// A PEFT LoRA adapter read for the checkpoint ([`super::lora::read`]), written into
    /// adapter.gguf: a module's pair (its scale folded into B) stacked after CALDERA's factors
    /// of the same weight, [R; A] and [L | s·B].
    pub tuned: Option<std::sync::Arc<super::lora::LoraAdapter>>,
}

/// A tuned adapter's pair for layer `l`'s `kind`, if any.
fn tuned_pair(
    tuned: &Option<std::sync::Arc<super::lora::LoraAdapter>>,
    l: usize,
    kind: LinearKind,
) -> Option<&super::lora::LoraModule> {
    tuned
        .as_ref()?
        .modules
        .iter()
        .find(|m| m.layer == l && m.kind == kind)
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

/// The ggml type of an adapter tensor of rows of `ne0` values stored as `t`: Q8_0 needs whole
/// 32-blocks along its rows (lora_b's rows are the rank), f16 stands in otherwise.
fn adapter_type(t: super::StoreType, ne0: usize) -> GgmlType {
    match t {
        super::StoreType::Float(d) => float_type(d),
        super::StoreType::Q8_0 if ne0.is_multiple_of(32) => GgmlType::Q8_0,
        super::StoreType::Q8_0 => GgmlType::F16,
    }
}

/// f32 values in `ty` (an adapter's tensor types: f32, f16, bf16, Q8_0 by ggml's rounding).
fn encode_adapter(ty: GgmlType, v: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F16 => crate::DType::F16.encode_f32(v),
        GgmlType::BF16 => crate::DType::BF16.encode_f32(v),
        GgmlType::Q8_0 => blocks::q8_0_of_f32(v),
        _ => crate::DType::F32.encode_f32(v),
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
        Some(GgmlType::Q5_0) => 8,
        Some(GgmlType::Q4_1) => 3,
        Some(GgmlType::Q5_1) => 9,
        Some(GgmlType::Iq4Nl) => 25,
        Some(GgmlType::Q4K) => 14,
        Some(GgmlType::Q5K) => 16,
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

    /// The weight in its ggml type and, with factors, the adapter's lora_a (Q8_0 where its
    /// rows allow) and lora_b at the module's own rank (f32 adapters may pad a rank to the
    /// largest one, which this does not count).
    fn stored_bits(&self, e: &QuantEntry) -> u64 {
        let Ok(ty) = self.linear_type(e) else {
            return e.expected_bits();
        };
        let bytes = |ty: GgmlType, ne0: usize, rows: usize| {
            ty.row_bytes(ne0).map_or(0, |b| (b * rows * 8) as u64)
        };
        let mut bits = bytes(ty, e.cols, e.rows);
        if e.rank > 0 {
            bits += bytes(adapter_type(self.lora, e.cols), e.cols, e.rank)
                + bytes(adapter_type(self.lora, e.rank), e.rank, e.rows);
        }
        bits
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
        let common = GgmlType::LINEAR
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
        let lora = lora_plan(self, ck, planned)?
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
            lora_type: self.lora,
            tuned: self.tuned.clone(),
            linear_params: 0,
            linear_bytes: 0,
        }))
    }
}

/// The rank a module of factor rank `r` is stored at in an adapter whose alpha is `r_max`:
/// llama.cpp scales each pair by alpha / (its own rank), so a smaller rank keeps its size and
/// lora_b is multiplied by r / r_max — exact in f32 when that is a power of two; otherwise an
/// f32 adapter zero-pads the module to r_max (exact), a rounded one scales anyway.
fn stored_rank(r: usize, r_max: usize, store: super::StoreType) -> usize {
    let exact = r_max.is_multiple_of(r) && (r_max / r).is_power_of_two();
    if exact || store != super::StoreType::Float(crate::DType::F32) {
        r
    } else {
        r_max
    }
}

/// The adapter's tensors (weights with factors or a tuned pair, each at its [`stored_rank`])
/// and alpha (the largest rank). A module's rank is its factors' plus its tuned pair's.
fn lora_plan(
    g: &Gguf,
    ck: &Checkpoint,
    planned: &Planned,
) -> Result<Option<(Vec<TensorInfo>, usize)>> {
    let ty = g.lora;
    let mut ranks = Vec::new();
    for (l, spec) in ck.arch().layers.iter().enumerate() {
        for lin in &spec.linears {
            let k = planned[l]
                .iter()
                .find(|(n, _)| *n == lin.weight.name)
                .map_or(0, |(_, e)| e.rank);
            let r = k + tuned_pair(&g.tuned, l, lin.kind).map_or(0, |m| m.rank);
            if r > 0 {
                ranks.push((l, lin, r));
            }
        }
    }
    let Some(rank) = ranks.iter().map(|x| x.2).max() else {
        return Ok(None);
    };
    let mut plan = Vec::new();
    for (l, lin, r) in ranks {
        let n = format!("blk.{l}.{}.weight", gguf_name(lin.kind));
        let r = stored_rank(r, rank, ty);
        plan.push(TensorInfo {
            name: format!("{n}.lora_a"),
            ne: vec![lin.in_features, r],
            ty: adapter_type(ty, lin.in_features),
        });
        plan.push(TensorInfo {
            name: format!("{n}.lora_b"),
            ne: vec![r, lin.out_features],
            ty: adapter_type(ty, r),
        });
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
    lora_type: super::StoreType,
    tuned: Option<std::sync::Arc<super::lora::LoraAdapter>>,
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
            let tuned = tuned_pair(&self.tuned, l, lin.kind);
            let fac = factors(&m.entry, &m.data)?;
            if let (Some((w, rank)), true) = (&mut self.lora, fac.is_some() || tuned.is_some()) {
                let (rows, cols, k) = (m.entry.rows, m.entry.cols, m.entry.rank);
                let kt = tuned.map_or(0, |t| t.rank);
                let st = self.lora_type;
                // lora_a = [R; A] and lora_b = [L | s·B] (rows in GGUF order), zero-padded to
                // the stored rank sr; at sr < alpha, lora_b times sr / alpha (llama.cpp's
                // scale is alpha / sr).
                let sr = stored_rank(k + kt, *rank, st);
                let scale = sr as f32 / *rank as f32;
                let mut a = Vec::with_capacity(sr * cols);
                let mut bm = vec![0.0f32; rows * sr];
                if let Some((lt, r)) = &fac {
                    a.extend_from_slice(r);
                    for (i, &hr) in order.iter().enumerate() {
                        for t in 0..k {
                            bm[i * sr + t] = lt[t * rows + hr] * scale;
                        }
                    }
                }
                if let Some(t) = tuned {
                    a.extend_from_slice(&t.a);
                    let s = t.scale * scale;
                    for (i, &hr) in order.iter().enumerate() {
                        for j in 0..kt {
                            bm[i * sr + k + j] = t.b[hr * kt + j] * s;
                        }
                    }
                }
                a.resize(sr * cols, 0.0);
                let (ta, tb) = (adapter_type(st, cols), adapter_type(st, sr));
                w.write(&format!("{n}.lora_a"), &encode_adapter(ta, &a))?;
                w.write(&format!("{n}.lora_b"), &encode_adapter(tb, &bm))?;
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
