//! What every Hugging Face–style output directory shares: the source's side files (config,
//! tokenizer), an edited config.json, tensors copied as the source stores them, and the
//! safetensors plan of a model whose linear weights are replaced by other tensors.

use std::path::Path;

use crate::base::atomic::write_atomic;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::compressed::{Accounting, PlannedTensor, StreamingWriter};
use crate::model::Checkpoint;

/// Files copied from the source directory beside the weights.
pub(crate) const SIDE_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// Copy the side files that exist (all but config.json when `with_config` is false).
pub(crate) fn copy_side_files(ck: &Checkpoint, dir: &Path, with_config: bool) -> Result<()> {
    for f in SIDE_FILES {
        if f == "config.json" && !with_config {
            continue;
        }
        let src = ck.dir().join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// The source's config.json as JSON, edited by `edit`, written into `dir`.
pub(crate) fn write_config(
    ck: &Checkpoint,
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<()> {
    let path = ck.dir().join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not a JSON object", path.display())))?;
    edit(obj);
    let text = serde_json::to_string_pretty(&v).expect("config serializes");
    write_atomic(&dir.join("config.json"), &[text.as_bytes(), b"\n"])
}

/// transformers' name of a storage dtype (`torch_dtype` in config.json).
pub(crate) fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

/// Write a tensor exactly as the source stores it, then let its pages go.
pub(crate) fn copy_plain(wr: &mut StreamingWriter, ck: &Checkpoint, name: &str) -> Result<()> {
    let t = ck.tensor(name)?;
    wr.write(name, t.bytes)?;
    ck.release(name);
    Ok(())
}

/// Write a tensor in `dtype` (converted from the source's float dtype; bytes unchanged when
/// they agree), then let its pages go.
pub(crate) fn copy_as(
    wr: &mut StreamingWriter,
    ck: &Checkpoint,
    name: &str,
    dtype: DType,
) -> Result<()> {
    let t = ck.tensor(name)?;
    if t.dtype == dtype {
        wr.write(name, t.bytes)?;
    } else {
        wr.write(name, &dtype.encode_f32(&t.to_f32()?))?;
    }
    ck.release(name);
    Ok(())
}

/// A tensor planned in `dtype` (see [`copy_as`]).
pub(crate) fn plain_as(ck: &Checkpoint, name: &str, dtype: DType) -> Result<PlannedTensor> {
    let t = ck.tensor(name)?;
    Ok(PlannedTensor {
        name: name.to_string(),
        dtype: dtype.safetensors_name().into(),
        shape: t.shape.to_vec(),
        bytes: t.shape.iter().product::<usize>() * dtype.size(),
    })
}

/// A tensor planned as the source stores it.
pub(crate) fn plain(ck: &Checkpoint, name: &str) -> Result<PlannedTensor> {
    let t = ck.tensor(name)?;
    Ok(PlannedTensor {
        name: name.to_string(),
        dtype: t.dtype.safetensors_name().into(),
        shape: t.shape.to_vec(),
        bytes: t.bytes.len(),
    })
}

/// Every stored tensor in the checkpoint's order: linear weight `w` (rows × cols) as the
/// tensors `linear(w, rows, cols)` gives, anything else as in the source.
pub(crate) fn plan_model(
    ck: &Checkpoint,
    linear: impl FnMut(&str, usize, usize) -> Result<Vec<PlannedTensor>>,
) -> Result<Vec<PlannedTensor>> {
    plan_model_as(ck, None, linear)
}

/// [`plan_model`] with every other tensor in `dtype` when given.
pub(crate) fn plan_model_as(
    ck: &Checkpoint,
    dtype: Option<DType>,
    mut linear: impl FnMut(&str, usize, usize) -> Result<Vec<PlannedTensor>>,
) -> Result<Vec<PlannedTensor>> {
    let linears: std::collections::HashSet<&str> = ck
        .arch()
        .layers
        .iter()
        .flat_map(|l| l.linears.iter().map(|lin| lin.weight.name.as_str()))
        .collect();
    let mut out = Vec::new();
    for spec in ck.arch().tensors() {
        if linears.contains(spec.name.as_str()) {
            out.extend(linear(&spec.name, spec.shape[0], spec.shape[1])?);
        } else {
            out.push(match dtype {
                Some(d) => plain_as(ck, &spec.name, d)?,
                None => plain(ck, &spec.name)?,
            });
        }
    }
    Ok(out)
}

/// One planned tensor.
pub(crate) fn tensor(name: String, dtype: &str, shape: Vec<usize>) -> PlannedTensor {
    let elem = match dtype {
        "F16" | "BF16" | "I16" => 2,
        "I64" | "F64" => 8,
        "U8" | "I8" => 1,
        _ => 4,
    };
    PlannedTensor {
        bytes: shape.iter().product::<usize>() * elem,
        name,
        dtype: dtype.into(),
        shape,
    }
}

/// The module a linear weight belongs to (`….q_proj.weight` → `….q_proj`).
pub(crate) fn module_of(weight: &str) -> &str {
    weight.strip_suffix(".weight").unwrap_or(weight)
}

/// The tensors after the decoder layers (final norm, LM head), in `dtype` when given.
pub(crate) fn copy_tail(
    wr: &mut StreamingWriter,
    ck: &Checkpoint,
    dtype: Option<DType>,
) -> Result<()> {
    let arch = ck.arch();
    let names =
        std::iter::once(&arch.final_norm.name).chain(arch.lm_head.as_ref().map(|h| &h.name));
    for name in names {
        match dtype {
            Some(d) => copy_as(wr, ck, name, d)?,
            None => copy_plain(wr, ck, name)?,
        }
    }
    Ok(())
}

/// The integer quantization scheme of a module (compressed-tensors config groups, GPTQ's one
/// quantization_config): bits, group size (0: per channel), symmetric or with zero points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Scheme {
    pub(crate) bits: u32,
    pub(crate) group_size: usize,
    pub(crate) symmetric: bool,
}

impl Scheme {
    pub(crate) fn of(e: &crate::model::compressed::QuantEntry) -> Scheme {
        Scheme {
            bits: e.bits,
            group_size: e.group_size,
            symmetric: e.kind == crate::quant::GridKind::Symmetric,
        }
    }
}

/// A Hugging Face model directory whose linear weights are quantized modules (compressed-tensors,
/// GPTQ): model.safetensors streamed layer by layer with every other tensor as the source stores
/// it, CALDERA's factors as a PEFT adapter in `adapter/`, and the source's config.json with a
/// `quantization_config`. The format supplies each module's planned tensors and their bytes.
pub(crate) struct QuantModelWriter {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
    writer: StreamingWriter,
    lora: Option<super::peft::LoraWriter>,
    linear_params: usize,
    linear_bits: u64,
}

impl QuantModelWriter {
    /// Plan model.safetensors in `dir` (linear weight `w`, rows × cols, as `linear` plans it)
    /// and the adapter of any weight with factors; `target` is where the output will live.
    pub(crate) fn begin(
        ck: &Checkpoint,
        dir: &Path,
        target: &Path,
        planned: &super::Planned,
        linear: impl FnMut(&str, usize, usize) -> Result<Vec<PlannedTensor>>,
    ) -> Result<QuantModelWriter> {
        let plan = plan_model(ck, linear)?;
        let path = dir.join("model.safetensors");
        let mut writer = StreamingWriter::create(&path, plan)?;
        copy_plain(&mut writer, ck, &ck.arch().embed_tokens.name)?;
        let lora = planned
            .iter()
            .flatten()
            .any(|(_, e)| e.rank > 0)
            .then(|| super::peft::LoraWriter::begin(&dir.join("adapter"), Some(target), planned))
            .transpose()?;
        Ok(QuantModelWriter {
            dir: dir.to_path_buf(),
            path,
            writer,
            lora,
            linear_params: 0,
            linear_bits: 0,
        })
    }

    /// One decoder layer: each linear weight as the tensors `module` gives (those `stored`
    /// accepts by name count as the weight's storage), everything else copied, the factors to
    /// the adapter.
    pub(crate) fn layer(
        &mut self,
        ck: &Checkpoint,
        s: &super::CompressedLayer,
        module: impl Fn(&super::CompressedMatrix) -> Result<Vec<(String, Vec<u8>)>>,
        stored: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let spec = &ck.arch().layers[s.layer];
        for t in spec.tensors() {
            match s.matrices.iter().find(|m| m.weight == t.name) {
                Some(m) => {
                    for (name, bytes) in module(m)? {
                        if stored(&name) {
                            self.linear_bits += bytes.len() as u64 * 8;
                        }
                        self.writer.write(&name, &bytes)?;
                    }
                    self.linear_params += m.entry.rows * m.entry.cols;
                }
                None if spec.linears.iter().any(|l| l.weight.name == t.name) => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: missing from compressed layer {}",
                        t.name, s.layer
                    )));
                }
                None => copy_plain(&mut self.writer, ck, &t.name)?,
            }
        }
        match &mut self.lora {
            Some(l) => l.layer(s),
            None => Ok(()),
        }
    }

    /// The tensors after the layers, the side files, config.json with `quantization_config`
    /// (also written on its own as each of `config_files`), the adapter's configuration; what
    /// was written (model.safetensors and the adapter's files).
    pub(crate) fn finish(
        mut self,
        ck: &Checkpoint,
        job: &super::JobInfo,
        quantization_config: serde_json::Value,
        config_files: &[&str],
    ) -> Result<super::Written> {
        copy_tail(&mut self.writer, ck, None)?;
        self.writer.finish()?;
        copy_side_files(ck, &self.dir, false)?;
        let text = serde_json::to_string_pretty(&quantization_config).expect("config serializes");
        for f in config_files {
            write_atomic(&self.dir.join(f), &[text.as_bytes(), b"\n"])?;
        }
        write_config(ck, &self.dir, |c| {
            c.insert("quantization_config".into(), quantization_config);
        })?;
        let bytes = std::fs::metadata(&self.path)
            .map_err(|e| Error::io(&self.path, e))?
            .len();
        let mut files = vec![("model.safetensors".to_string(), bytes)];
        if let Some(lora) = self.lora {
            let (adapter, _) = lora.finish()?;
            files.extend(
                adapter
                    .into_iter()
                    .map(|(f, b)| (format!("adapter/{f}"), b)),
            );
        }
        let total_bytes: u64 = files.iter().map(|(_, b)| b).sum();
        Ok(super::Written {
            files,
            total: Accounting::new(job.source.parameters, total_bytes * 8),
            linear: Accounting::new(self.linear_params, self.linear_bits),
        })
    }
}

/// The `quantization_config.quant_method` of the model directory `dir`, if any.
pub(crate) fn quant_method(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    cfg["quantization_config"]["quant_method"]
        .as_str()
        .map(str::to_string)
}

/// One quantization scheme of a quantized Hugging Face output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SchemeSummary {
    pub bits: u64,
    /// None: per channel.
    pub group_size: Option<u64>,
    pub symmetric: bool,
    /// Modules it targets (module names, or the one class name `Linear`; GPTQ: every module).
    pub targets: usize,
}

/// What `pumice inspect` says about a quantized Hugging Face output (compressed-tensors,
/// GPTQ): its schemes, sizes and bits per weight (what stores the quantized linear weights
/// over their parameters), and the PEFT adapter beside it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantSummary {
    pub path: String,
    pub format: &'static str,
    pub schemes: Vec<SchemeSummary>,
    pub parameters: u64,
    pub linear_parameters: u64,
    /// model.safetensors plus the adapter's files.
    pub bytes: u64,
    pub bits_per_parameter: f64,
    pub linear_bits_per_parameter: f64,
    /// adapter/, if there is one.
    pub adapter: Option<AdapterSummary>,
}

/// What one stored tensor of a quantized output is.
pub(crate) enum Stored {
    /// Says a quantized linear weight has this many parameters (CT's weight_shape).
    LinearShape(u64),
    /// The codes of a quantized linear weight of this many parameters (GPTQ's qweight).
    LinearCodes(u64),
    /// Holds part of a quantized linear weight's storage (codes, scales, zero points).
    LinearPart,
    /// Bookkeeping that is neither parameters nor weight storage (GPTQ's g_idx).
    Index,
    /// A plain tensor of this many parameters.
    Plain(u64),
}

/// Summarize the quantized output `dir` (`schemes` reads its quantization_config; `classify`
/// says what each stored tensor of model.safetensors is, from its name, shape and bytes).
pub(crate) fn summary(
    dir: &Path,
    format: &'static str,
    schemes: impl FnOnce(&serde_json::Value, &Path) -> Result<Vec<SchemeSummary>>,
    classify: impl Fn(&str, &[usize], &[u8]) -> Stored,
) -> Result<QuantSummary> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    let schemes = schemes(&cfg["quantization_config"], &cfg_path)?;
    let path = dir.join("model.safetensors");
    let f = crate::model::safetensors::SafetensorsFile::open(&path)?;
    let (mut params, mut linear_params, mut linear_bytes) = (0u64, 0u64, 0u64);
    for t in f.tensors() {
        let bytes = (t.end - t.start) as u64;
        match classify(&t.name, &t.shape, f.bytes(t)) {
            Stored::LinearShape(n) => {
                linear_params += n;
                params += n;
            }
            Stored::LinearCodes(n) => {
                linear_params += n;
                params += n;
                linear_bytes += bytes;
            }
            Stored::LinearPart => linear_bytes += bytes,
            Stored::Index => {}
            Stored::Plain(n) => params += n,
        }
    }
    let mut total = f.len_bytes();
    let adapter = dir.join("adapter");
    let adapter = if adapter.join(super::peft::ADAPTER_CONFIG).is_file() {
        let a = super::peft::summary(&adapter)?;
        total += a.bytes;
        Some(a)
    } else {
        None
    };
    Ok(QuantSummary {
        path: dir.display().to_string(),
        format,
        schemes,
        parameters: params,
        linear_parameters: linear_params,
        bytes: total,
        bits_per_parameter: total as f64 * 8.0 / params.max(1) as f64,
        linear_bits_per_parameter: linear_bytes as f64 * 8.0 / linear_params.max(1) as f64,
        adapter,
    })
}

/// A PEFT LoRA adapter directory, as `pumice inspect` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub path: String,
    /// Every file of the directory.
    pub bytes: u64,
    /// The default rank r and lora_alpha.
    pub r: u64,
    pub alpha: f64,
    /// Modules with their own rank (rank_pattern).
    pub rank_pattern: usize,
    /// Target modules (as listed, names or patterns).
    pub target_modules: usize,
    /// Tensors and parameters of the adapter's weights.
    pub tensors: usize,
    pub parameters: u64,
    pub dtypes: Vec<String>,
}
