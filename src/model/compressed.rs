//! Compressed checkpoint, format version 3.
//!
//! Version 3 names each tensor's grid (`"grid": "asymmetric" | "midrise" | "symmetric"`,
//! `quant::GridKind`) where version 2 had `"symmetric": bool` (true meant midrise); version 2
//! files read unchanged. Version 2 changed one thing: symmetric grids are midrise (zero =
//! (2^bits − 1)/2, levels ±scale/2, ±3·scale/2, …); version 1's symmetric zero was 2^bits/2.
//! Version 1 files without symmetric tensors read unchanged; those with them are refused
//! (re-compress).
//!
//! A directory holding the source's config.json and tokenizer files, `model.safetensors`, and
//! the manifest `pumice.json`. For every compressed linear layer `NAME.weight` the safetensors
//! file holds, instead of the weight:
//! - `NAME.weight.qweight` U32 [rows, words]: each row's codes as a little-endian bit stream
//!   of `bits`-bit codes (words = ceil(cols · bits / 32));
//! - `NAME.weight.scales`  F16 [rows, groups];
//! - `NAME.weight.zeros`   F16 [rows, groups] (integer zero points of asymmetric grids; absent
//!   for midrise grids, whose zero is (2^bits − 1)/2, and symmetric ones, whose zero is
//!   2^(bits−1));
//! - `NAME.weight.perm`    U32 [cols] with act-order: stored column j is original column perm[j].
//!
//! A k grid (`quant::kquant`) stores instead of scales and zeros `NAME.weight.scales` F16
//! [rows, supers·(2 or 1)] (each super-block's d and dmin, or d) and `NAME.weight.subscales`
//! U32 [rows, words] (each sub-block's integer scale and minimum, or its scale offset to be
//! unsigned, as a little-endian bit stream of `sbits`-bit fields); columns must be whole
//! super-blocks of 256.
//!
//! A weight dequantizes to scale · (code − zero). Everything else (embeddings, norms, LM head,
//! biases) is stored as in the source. The manifest records the source and its hash, the method
//! and its parameters per tensor, the calibration, per-layer errors and the exact size
//! accounting; readers check it against the file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::quant::grid::packed_words;
use crate::quant::kquant::SUPER;
use crate::quant::{Grid, GridKind};

pub const MANIFEST_FILE: &str = "pumice.json";
pub const FORMAT_NAME: &str = "pumice-compressed";
pub const FORMAT_VERSION: u32 = 3;

/// What the calibration was.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CalibInfo {
    /// `text` or `self` (sampled from the model).
    pub kind: String,
    pub files: Vec<String>,
    pub samples: usize,
    pub len: usize,
    pub seed: u64,
    pub tokens: usize,
}

/// The source checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    pub path: String,
    /// SHA-256 over the source's safetensors files, in name order.
    pub sha256: String,
    pub parameters: usize,
    pub bytes: u64,
}

/// One compressed tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QuantEntry {
    pub method: String,
    pub bits: u32,
    pub group_size: usize,
    /// The backbone's grid kind (`"grid"` in the manifest).
    #[serde(rename = "grid")]
    pub kind: GridKind,
    pub act_order: bool,
    pub rows: usize,
    pub cols: usize,
    /// Bits stored for this tensor: codes (whole u32 words) + scales + zeros + permutation.
    pub stored_bits: u64,
    /// tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the calibration Hessian (null without one).
    pub relative_error: Option<f64>,
    /// Relative damping used for GPTQ (after any retries).
    pub damp: Option<f64>,
    /// CALDERA: rank k of the factors (0: none). Lᵀ (k × rows) is stored as `NAME.L.*` and
    /// R (k × cols) as `NAME.R.*`, each with its own codes, scales and zeros.
    #[serde(default)]
    pub rank: usize,
    /// Bits of the factor codes (CALDERA).
    #[serde(default)]
    pub lr_bits: u32,
    /// Group size of the factor grids along their long dimension (CALDERA).
    #[serde(default)]
    pub lr_group_size: usize,
    /// Incoherence processing: the stored codes are of T_rows · W · T_colsᵀ with the
    /// randomized Hadamard transforms of these seeds (`quant::rht`); undone at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rht: Option<RhtSeeds>,
    /// Pruning (`2:4` or a fraction): only the codes of kept weights are stored
    /// (`NAME.qweight` U32 [rows, words(kept_per_row)]), with `NAME.mask` U32
    /// [rows, ⌈cols/32⌉] marking the kept weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<String>,
    /// Weights kept in every row (cols when not pruned).
    #[serde(default)]
    pub kept_per_row: usize,
}

/// Seeds of the two randomized Hadamard transforms of a weight (64 bits each, counted in
/// `stored_bits`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct RhtSeeds {
    pub rows: u64,
    pub cols: u64,
}

/// What a stored tensor of a compressed weight holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartKind {
    /// The codes, each row a little-endian bit stream in u32 words.
    Codes,
    /// One f16 scale per row and group.
    Scales,
    /// One f16 integer zero point per row and group (asymmetric grids only).
    Zeros,
    /// A k grid's integer sub-block scales and minimums, bit-packed in u32 words per row.
    SubScales,
    /// The kept-weight bit mask of a pruned matrix, u32 words per row.
    Mask,
    /// The act-order column permutation (u32 per column).
    Perm,
}

/// Which matrix of a compressed weight a part belongs to: the backbone Q, or one of CALDERA's
/// factors (Lᵀ, k × rows; R, k × cols).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Factor {
    Backbone,
    L,
    R,
}

/// One stored tensor of a compressed weight: whose, what, dtype and shape. Its name in a
/// pumice checkpoint is `{weight}.{suffix}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPart {
    pub factor: Factor,
    pub kind: PartKind,
    /// `U32` or `F16`.
    pub dtype: &'static str,
    pub shape: Vec<usize>,
}

impl StoredPart {
    /// The tensor name's suffix after the weight's name (`qweight`, `L.scales`, …).
    pub fn suffix(&self) -> String {
        let kind = match self.kind {
            PartKind::Codes => "qweight",
            PartKind::Scales => "scales",
            PartKind::Zeros => "zeros",
            PartKind::SubScales => "subscales",
            PartKind::Mask => "mask",
            PartKind::Perm => "perm",
        };
        match self.factor {
            Factor::Backbone => kind.to_string(),
            Factor::L => format!("L.{kind}"),
            Factor::R => format!("R.{kind}"),
        }
    }

    /// The stored tensor's name for weight `weight`.
    pub fn name(&self, weight: &str) -> String {
        format!("{weight}.{}", self.suffix())
    }

    /// Bytes per element (U32 codes, masks and permutations; F16 scales and zeros).
    pub fn element_bytes(&self) -> usize {
        if self.dtype == "F16" {
            2
        } else {
            4
        }
    }

    /// Its size in bytes; None when that overflows (a hostile entry).
    pub fn bytes(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(self.element_bytes(), |a, &d| a.checked_mul(d))
    }
}

impl QuantEntry {
    pub fn grid(&self) -> Result<Grid> {
        Grid::new(self.bits, self.group_size, self.kind)
    }

    /// Grid of the low-rank factors (asymmetric), when there are factors.
    pub fn lr_grid(&self) -> Result<Option<Grid>> {
        if self.rank == 0 {
            return Ok(None);
        }
        Grid::new(self.lr_bits, self.lr_group_size, GridKind::Asymmetric).map(Some)
    }

    /// Stored bits computed from the stored layout (what `stored_bits` must equal); 0 for an
    /// entry that is itself invalid (the caller reports the mismatch).
    pub fn expected_bits(&self) -> u64 {
        self.stored_parts()
            .map(|parts| self.bits_of(&parts))
            .unwrap_or(0)
    }

    fn bits_of(&self, parts: &[StoredPart]) -> u64 {
        let data: u64 = parts
            .iter()
            .map(|p| {
                p.shape.iter().fold(p.element_bytes() as u64 * 8, |a, &d| {
                    a.saturating_mul(d as u64)
                })
            })
            .fold(0u64, u64::saturating_add);
        data.saturating_add(if self.rht.is_some() { 128 } else { 0 })
    }

    /// The entry checked on its own (grid, pruning, `stored_bits` against its layout); its
    /// stored parts when valid. What every reader of an entry (manifest, work directory) runs.
    pub fn check(&self) -> std::result::Result<Vec<StoredPart>, String> {
        let parts = self.stored_parts()?;
        let want = self.bits_of(&parts);
        if self.stored_bits != want {
            return Err(format!(
                "stored_bits {} disagrees with its shape and grid ({want})",
                self.stored_bits
            ));
        }
        Ok(parts)
    }

    /// The tensors this weight is stored as (named `{weight}.{suffix}`), in the order they are
    /// written, or why the entry itself is invalid (grid, pruning). The one authority on the
    /// stored layout: the writer's plan, the work-directory record, the validator at open, the
    /// reader, the finiteness scan and the size accounting all derive from it.
    pub fn stored_parts(&self) -> std::result::Result<Vec<StoredPart>, String> {
        let grid = self.grid().map_err(|e| e.to_string())?;
        let kept = if self.sparsity.is_some() {
            if self.kept_per_row == 0
                || self.kept_per_row > self.cols
                || self.act_order
                || self.rank > 0
            {
                return Err(format!(
                    "pruned with {} kept of {} per row{}",
                    self.kept_per_row,
                    self.cols,
                    if self.act_order || self.rank > 0 {
                        " and act-order or factors, which pruning excludes"
                    } else {
                        ""
                    }
                ));
            }
            self.kept_per_row
        } else {
            self.cols
        };
        let groups = grid.groups(self.cols);
        let part = |factor, kind, dtype, shape| StoredPart {
            factor,
            kind,
            dtype,
            shape,
        };
        let b = Factor::Backbone;
        let mut parts = vec![part(
            b,
            PartKind::Codes,
            "U32",
            vec![self.rows, packed_words(kept, self.bits)],
        )];
        if let Some(k) = grid.ktype() {
            if !self.cols.is_multiple_of(SUPER) || self.sparsity.is_some() {
                return Err(format!(
                    "the k grid needs whole super-blocks of {SUPER} columns and no pruning \
                     ({} columns{})",
                    self.cols,
                    if self.sparsity.is_some() {
                        ", pruned"
                    } else {
                        ""
                    }
                ));
            }
            parts.push(part(
                b,
                PartKind::Scales,
                "F16",
                vec![self.rows, k.supers_f16() * (self.cols / SUPER)],
            ));
            parts.push(part(
                b,
                PartKind::SubScales,
                "U32",
                vec![self.rows, packed_words(k.fields() * groups, k.sbits)],
            ));
        } else {
            parts.push(part(b, PartKind::Scales, "F16", vec![self.rows, groups]));
        }
        if grid.stores_zeros() {
            parts.push(part(b, PartKind::Zeros, "F16", vec![self.rows, groups]));
        }
        if self.sparsity.is_some() {
            parts.push(part(
                b,
                PartKind::Mask,
                "U32",
                vec![self.rows, self.cols.div_ceil(32)],
            ));
        }
        if self.act_order {
            parts.push(part(b, PartKind::Perm, "U32", vec![self.cols]));
        }
        if let Some(lg) = self.lr_grid().map_err(|e| e.to_string())? {
            for (f, len) in [(Factor::L, self.rows), (Factor::R, self.cols)] {
                let groups = lg.groups(len);
                parts.push(part(
                    f,
                    PartKind::Codes,
                    "U32",
                    vec![self.rank, packed_words(len, lg.bits)],
                ));
                parts.push(part(f, PartKind::Scales, "F16", vec![self.rank, groups]));
                parts.push(part(f, PartKind::Zeros, "F16", vec![self.rank, groups]));
            }
        }
        Ok(parts)
    }
}

/// A manifest of an older format version rewritten as the current one (in memory): version 2
/// spelled the grid `"symmetric": bool` (true: midrise); version 1's symmetric grid is no
/// longer decoded.
fn upgrade(mut v: serde_json::Value, path: &Path) -> Result<serde_json::Value> {
    let version = v
        .get("format_version")
        .and_then(|x| x.as_u64())
        .unwrap_or(0);
    if version >= 3 {
        return Ok(v);
    }
    if let Some(tensors) = v.get_mut("tensors").and_then(|t| t.as_object_mut()) {
        for (name, e) in tensors.iter_mut() {
            let Some(e) = e.as_object_mut() else { continue };
            let Some(symmetric) = e.remove("symmetric") else {
                continue;
            };
            let symmetric = symmetric.as_bool().ok_or_else(|| {
                Error::config(
                    path,
                    format!("tensor `{name}`: `symmetric` is not a boolean"),
                )
            })?;
            if symmetric && version < 2 {
                return Err(Error::config(
                    path,
                    format!("tensor `{name}` uses the symmetric grid of format version {version}, which this build no longer decodes; compress the model again"),
                ));
            }
            let kind = if symmetric {
                GridKind::Midrise
            } else {
                GridKind::Asymmetric
            };
            e.insert("grid".into(), kind.name().into());
        }
    }
    Ok(v)
}

/// Size accounting of a group of parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Accounting {
    pub parameters: usize,
    pub bits: u64,
    pub bits_per_parameter: f64,
}

impl Accounting {
    pub fn new(parameters: usize, bits: u64) -> Accounting {
        Accounting {
            parameters,
            bits,
            bits_per_parameter: bits as f64 / parameters.max(1) as f64,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MatrixReport {
    pub name: String,
    pub relative_error: Option<f64>,
    /// The adapter that quantized it, where a layer's matrices were spread over several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    pub layer: usize,
    /// Wall time of the layer: in run summaries only, never in a manifest (whose bytes must
    /// not depend on timing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// The adapter that computed the layer ("name (backend)"), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub matrices: Vec<MatrixReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileInfo {
    pub bytes: u64,
    pub sha256: String,
}

/// `pumice.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub created_by: String,
    pub source: SourceInfo,
    pub method: String,
    /// Method parameters as given (bits, group size, ...).
    pub params: serde_json::Value,
    pub calibration: Option<CalibInfo>,
    /// Compressed tensors by weight name.
    pub tensors: BTreeMap<String, QuantEntry>,
    /// The compressed linear layers.
    pub linear: Accounting,
    /// The whole safetensors file (header included) over all parameters.
    pub total: Accounting,
    pub layers: Vec<LayerReport>,
    pub files: BTreeMap<String, FileInfo>,
    /// How options were allocated to layers (`compress --measurement`), when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<serde_json::Value>,
}

impl Manifest {
    /// Read and check the manifest of a compressed directory.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        let version = v.get("format_version").and_then(|x| x.as_u64());
        match (v.get("format").and_then(|x| x.as_str()), version) {
            (Some(FORMAT_NAME), Some(ver)) if ver as u32 > FORMAT_VERSION => {
                return Err(Error::config(
                    &path,
                    format!("format version {ver} was written by a newer pumice; this build reads version {FORMAT_VERSION} and older"),
                ))
            }
            (Some(FORMAT_NAME), Some(_)) => {}
            _ => return Err(Error::config(&path, format!("not a {FORMAT_NAME} manifest (missing `format` or `format_version`)"))),
        }
        let v = upgrade(v, &path)?;
        let m: Manifest = serde_json::from_value(v)
            .map_err(|e| Error::config(&path, format!("malformed manifest: {e}")))?;
        for (name, e) in &m.tensors {
            e.check()
                .map_err(|err| Error::config(&path, format!("tensor `{name}`: {err}")))?;
        }
        for (file, info) in &m.files {
            let plain = Path::new(file).file_name().map(|n| n == file.as_str()) == Some(true);
            if !plain || file == ".." || file == "." {
                return Err(Error::config(
                    &path,
                    format!(
                        "file name `{file}` must be a plain file name in the checkpoint directory"
                    ),
                ));
            }
            let p = dir.join(file);
            let len = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
            if len != info.bytes {
                return Err(Error::config(
                    &path,
                    format!(
                        "says {file} has {} bytes but it has {len} (truncated or replaced?)",
                        info.bytes
                    ),
                ));
            }
        }
        Ok(m)
    }
}

pub use crate::base::hash::sha256_files;

/// One tensor of a safetensors file being written: its header entry.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// Writes a safetensors file whose header is known up front, streaming tensor data in header
/// order as it becomes available (so a whole model never sits in memory).
pub struct StreamingWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    plan: Vec<PlannedTensor>,
    next: usize,
}

impl StreamingWriter {
    pub fn create(path: &Path, plan: Vec<PlannedTensor>) -> Result<StreamingWriter> {
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for t in &plan {
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.bytes]}),
            );
            off += t.bytes;
        }
        header.insert(
            "__metadata__".into(),
            serde_json::json!({"format": "pt", "writer": "pumice"}),
        );
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, f);
        file.write_all(&(h.len() as u64).to_le_bytes())
            .map_err(|e| Error::io(path, e))?;
        file.write_all(&h).map_err(|e| Error::io(path, e))?;
        Ok(StreamingWriter {
            path: path.to_path_buf(),
            file,
            plan,
            next: 0,
        })
    }

    /// Name of the tensor the writer expects next.
    pub fn expects(&self) -> Option<&str> {
        self.plan.get(self.next).map(|t| t.name.as_str())
    }

    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let t = self.plan.get(self.next).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "writer: unexpected tensor {name} after the last one"
            ))
        })?;
        if t.name != name || t.bytes != bytes.len() {
            return Err(Error::InvalidArgument(format!(
                "writer: expected {} ({} bytes), got {name} ({} bytes)",
                t.name,
                t.bytes,
                bytes.len()
            )));
        }
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Flush and sync; every planned tensor must have been written.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            return Err(Error::InvalidArgument(format!(
                "writer: {} of {} tensors written",
                self.next,
                self.plan.len()
            )));
        }
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }
}
