//! Memory-mapped safetensors files with a strict header check.
//!
//! Layout: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
//! `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the data section that
//! follows the header), then the data. Every way a file can lie — truncated, a header length past
//! the end, offsets out of range or overlapping, a byte length that disagrees with the shape —
//! becomes an [`Error::Safetensors`] naming the file and the tensor. Tensor bytes are never
//! copied: they are slices of the mapping, so RAM use stays bounded by what is touched.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Largest header accepted (the format's own reference reader uses the same bound).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor's entry, offsets already made absolute within the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// The dtype string as written (`BF16`, `I64`, ...).
    pub dtype_name: String,
    /// The dtype if it is one pumice computes with.
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Bytes per element of any safetensors dtype.
fn dtype_width(name: &str) -> Option<usize> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// An open, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    tensors: BTreeMap<String, TensorInfo>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SafetensorsFile({}, {} tensors)",
            self.path.display(),
            self.tensors.len()
        )
    }
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only. If another process truncates the file while it is
        // mapped, reads may fault; checkpoints are treated as immutable inputs, as every
        // mmap-based model loader does.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let tensors = parse_header(path, &map)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The raw little-endian bytes of a tensor of this file.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.end]
    }

    /// Drop this process's resident pages of a tensor: they stay in the OS page cache and fault
    /// back in if read again, so streaming through a model larger than memory keeps the
    /// resident set near one layer. A no-op where unsupported.
    pub fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            // madvise needs a page-aligned start; 64 KiB is a multiple of every common page.
            const ALIGN: usize = 64 << 10;
            let start = info.start / ALIGN * ALIGN;
            let end = info.end.min(self.map.len());
            if end > start {
                // SAFETY: the mapping is read-only and file-backed; MADV_DONTNEED only discards
                // this process's page-table entries, and later reads fault the same bytes back
                // in from the file, so no reference ever observes different contents.
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }
}

fn parse_header(path: &Path, data: &[u8]) -> Result<BTreeMap<String, TensorInfo>> {
    let err = |msg: String| Error::safetensors(path, msg);
    let file_len = data.len() as u64;
    if file_len < 8 {
        return Err(err(format!(
            "truncated: {file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(err(format!(
            "header length {n} is implausibly large (limit {MAX_HEADER})"
        )));
    }
    if 8 + n > file_len {
        return Err(err(format!(
            "header length {n} runs past the end of the file ({file_len} bytes; truncated?)"
        )));
    }
    let header: Value = serde_json::from_slice(&data[8..8 + n as usize])
        .map_err(|e| err(format!("header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| err("header is not a JSON object".into()))?;
    let data_start = 8 + n as usize;
    let data_len = data.len() - data_start;

    let mut tensors = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| err(format!("tensor `{name}`: {what}"));
        let e = entry
            .as_object()
            .ok_or_else(|| bad("entry is not an object"))?;
        let dtype_name = e
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing `dtype`"))?
            .to_string();
        let width = dtype_width(&dtype_name)
            .ok_or_else(|| bad(&format!("unknown dtype `{dtype_name}`")))?;
        let shape = e
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing `shape`"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`shape` must be a list of non-negative integers"))?;
        let offs = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("`data_offsets` must be two non-negative integers"))?;
        let (b, en) = offs;
        if b > en {
            return Err(bad(&format!("data offsets [{b}, {en}] are reversed")));
        }
        if en > data_len as u64 {
            return Err(bad(&format!(
                "data offsets [{b}, {en}] run past the end of the data section ({data_len} bytes; truncated?)"
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(width))
            .ok_or_else(|| bad("shape overflows"))?;
        if (en - b) as usize != numel {
            return Err(bad(&format!(
                "{} bytes of data but shape {shape:?} of {dtype_name} needs {numel}",
                en - b
            )));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                name: name.clone(),
                dtype: DType::from_safetensors(&dtype_name),
                dtype_name,
                shape,
                start: data_start + b as usize,
                end: data_start + en as usize,
            },
        );
    }

    // Overlaps: sort by start; each must begin at or after the previous one's end.
    let mut spans: Vec<&TensorInfo> = tensors.values().filter(|t| t.end > t.start).collect();
    spans.sort_by_key(|t| (t.start, t.end));
    for w in spans.windows(2) {
        if w[1].start < w[0].end {
            return Err(err(format!(
                "tensors `{}` and `{}` overlap (data bytes {}..{} and {}..{})",
                w[0].name,
                w[1].name,
                w[0].start - data_start,
                w[0].end - data_start,
                w[1].start - data_start,
                w[1].end - data_start
            )));
        }
    }
    Ok(tensors)
}
