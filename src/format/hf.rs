//! What every Hugging Face–style output directory shares: the source's side files (config,
//! tokenizer), an edited config.json, tensors copied as the source stores them, and the
//! safetensors plan of a model whose linear weights are replaced by other tensors.

use std::path::Path;

use crate::base::atomic::write_atomic;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::compressed::{PlannedTensor, StreamingWriter};
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
