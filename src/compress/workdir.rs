//! Files that outlive one process: work directories (`compress --work-dir`: one file per
//! finished layer, so an interrupted run resumes and shards on several machines fill one
//! directory that `merge` assembles). Hessian directories (`pumice hessians`) are in
//! [`super::hessdir`], in the same container.
//!
//! Every file is written under a temporary name, synced and renamed, so a file that exists is
//! complete: a process killed at any instant leaves either the old state or the new one.
//!
//! Binary files share one container: 8 magic bytes, a little-endian u64 header length, a JSON
//! header padded with spaces to a multiple of 8 bytes, the blobs the header lists, back to
//! back, and last the 32-byte SHA-256 of everything before it. A file is only used whole and
//! verified: a flipped bit anywhere (a count, `layers_done`, a weight) is refused by name
//! instead of resuming into a different model. Every size read from a file is checked
//! arithmetic, so a hostile header cannot wrap a count or allocate beyond the file.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::base::atomic::write_atomic;
use crate::base::hash::sha256_hex;
use crate::format::{CompressedLayer, CompressedMatrix, PackedMatrix};
use crate::model::compressed::{CalibInfo, MatrixReport, QuantEntry, SourceInfo};
use crate::{Error, Result};

/// The job description in a work directory.
pub const JOB_FILE: &str = "job.json";
/// Calibration activations after the last finished layer (sequential mode).
pub const ACTIVATIONS_FILE: &str = "activations.bin";

const JOB_FORMAT: &str = "pumice-work";
pub(super) const VERSION: u32 = 1;
const LAYER_MAGIC: &[u8; 8] = b"PMCLAYR2";
const ACT_MAGIC: &[u8; 8] = b"PMCACTS2";
/// Bytes of the trailing checksum.
const DIGEST: u64 = 32;
/// Largest container header accepted (a hostile length must not allocate gigabytes).
const MAX_HEADER: u64 = 64 << 20;

/// A finished layer's file in a work directory.
pub fn layer_file(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer-{layer:05}.bin"))
}

/// Write a container: `header` plus `blobs`, whose lengths the header must describe.
pub(crate) fn write_container(
    path: &Path,
    magic: &[u8; 8],
    header: &Value,
    blobs: &[&[u8]],
) -> Result<()> {
    let mut h = serde_json::to_vec(header).expect("header serializes");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let len = (h.len() as u64).to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![magic, &len, &h];
    parts.extend_from_slice(blobs);
    let digest = {
        use sha2::Digest;
        let mut d = sha2::Sha256::new();
        for p in &parts {
            d.update(p);
        }
        d.finalize()
    };
    parts.push(&digest);
    write_atomic(path, &parts)
}

/// Read a container's header and, when `with_data`, the data after it (whose length must be
/// `expected_data(header)`, `None` when the header does not describe it or the sum
/// overflows). The whole file's checksum is verified either way.
/// How much of a container to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// Everything, verified, the data dropped.
    Verify,
    /// Everything, verified, the data kept.
    Data,
}

pub(crate) fn read_container(
    path: &Path,
    magic: &[u8; 8],
    mode: Read,
    expected_data: impl Fn(&Value) -> Option<u64>,
) -> Result<(Value, Vec<u8>)> {
    use sha2::Digest;
    let bad = |msg: &str| Error::work_dir(path, msg);
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 16];
    f.read_exact(&mut head)
        .map_err(|_| bad("truncated: shorter than its 16-byte preamble"))?;
    if &head[..8] != magic {
        if head[..7] == magic[..7] {
            return Err(bad(
                "was written by an older pumice (format without checksums); remove it and run again",
            ));
        }
        return Err(bad("not a pumice file of this kind (wrong magic bytes)"));
    }
    let hlen = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    if hlen > MAX_HEADER || 16 + hlen + DIGEST > size {
        return Err(bad("truncated or damaged: header length exceeds the file"));
    }
    let mut h = vec![0u8; hlen as usize];
    f.read_exact(&mut h).map_err(|e| Error::io(path, e))?;
    // A header that does not parse or fit is reported as damage when the checksum says so.
    let damaged = |msg: String| {
        if checksum_matches(path) == Some(false) {
            bad(CHECKSUM_MISMATCH)
        } else {
            bad(&msg)
        }
    };
    let header: Value = serde_json::from_slice(&h)
        .map_err(|e| damaged(format!("damaged header ({e}); remove the file")))?;
    let Some(want) = expected_data(&header) else {
        return Err(damaged(
            "damaged header: its blob sizes are missing or overflow".into(),
        ));
    };
    let have = size - 16 - hlen - DIGEST;
    if have != want {
        return Err(bad(&format!(
            "truncated or damaged: {have} data bytes, the header lists {want}"
        )));
    }
    let n = usize::try_from(want).map_err(|_| bad("too large for this machine"))?;
    let mut d = sha2::Sha256::new();
    d.update(head);
    d.update(&h);
    let mut data = Vec::new();
    if mode == Read::Data {
        data.try_reserve_exact(n)
            .map_err(|_| bad("too large to read into memory"))?;
        (&mut f)
            .take(want)
            .read_to_end(&mut data)
            .map_err(|e| Error::io(path, e))?;
        if data.len() != n {
            return Err(bad("changed while being read"));
        }
        d.update(&data);
    } else {
        // Verify without keeping the data.
        let n = std::io::copy(&mut (&mut f).take(want), &mut d).map_err(|e| Error::io(path, e))?;
        if n != want {
            return Err(bad("changed while being read"));
        }
    }
    let mut stored = [0u8; DIGEST as usize];
    f.read_exact(&mut stored)
        .map_err(|_| bad("changed while being read"))?;
    if d.finalize().as_slice() != stored.as_slice() {
        return Err(bad(CHECKSUM_MISMATCH));
    }
    Ok((header, data))
}

const CHECKSUM_MISMATCH: &str = "damaged: its SHA-256 checksum does not match its contents";

/// Whether a container's trailing SHA-256 matches the bytes before it (`None`: unreadable or
/// too short to tell).
fn checksum_matches(path: &Path) -> Option<bool> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).ok()?;
    let size = f.metadata().ok()?.len();
    let body = size.checked_sub(DIGEST)?;
    let mut d = sha2::Sha256::new();
    std::io::copy(&mut (&mut f).take(body), &mut d).ok()?;
    let mut stored = [0u8; DIGEST as usize];
    f.read_exact(&mut stored).ok()?;
    Some(d.finalize().as_slice() == stored.as_slice())
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// What a work directory's job is: the inputs its output depends on, and the manifest fields
/// that do not come from the layers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub format: String,
    pub format_version: u32,
    pub created_by: String,
    /// SHA-256 of `inputs` (as JSON).
    pub fingerprint: String,
    /// Everything the output depends on, by name: options (their text), the source model's
    /// SHA-256, the Hessian directory's identity.
    pub inputs: BTreeMap<String, String>,
    pub layers: usize,
    pub source: SourceInfo,
    pub method: String,
    pub params: Value,
    pub calibration: CalibInfo,
    pub allocation: Option<Value>,
}

/// The fingerprint of a job's inputs.
pub fn fingerprint(inputs: &BTreeMap<String, String>) -> String {
    sha256_hex(&serde_json::to_vec(inputs).expect("map serializes"))
}

impl Job {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(JOB_FILE)
    }

    /// The job in `dir`, if one was started there.
    pub fn read(dir: &Path) -> Result<Option<Job>> {
        let p = Job::path(dir);
        if !p.exists() {
            return Ok(None);
        }
        let j: Job = read_json(&p)?;
        if j.format != JOB_FORMAT || j.format_version != VERSION {
            return Err(Error::work_dir(
                &p,
                format!(
                    "format {} version {} is not {JOB_FORMAT} version {VERSION}",
                    j.format, j.format_version
                ),
            ));
        }
        Ok(Some(j))
    }

    pub fn new(
        inputs: BTreeMap<String, String>,
        layers: usize,
        source: SourceInfo,
        method: String,
        params: Value,
        calibration: CalibInfo,
        allocation: Option<Value>,
    ) -> Job {
        Job {
            format: JOB_FORMAT.into(),
            format_version: VERSION,
            created_by: format!("pumice {}", env!("CARGO_PKG_VERSION")),
            fingerprint: fingerprint(&inputs),
            inputs,
            layers,
            source,
            method,
            params,
            calibration,
            allocation,
        }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("job serializes");
        write_atomic(&Job::path(dir), &[text.as_bytes()])
    }
}

/// Refuse a work directory whose job was made from other inputs, naming what changed.
pub fn check_inputs(
    dir: &Path,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Result<()> {
    if old == new {
        return Ok(());
    }
    let short = |s: Option<&String>| {
        let s = s.map(String::as_str).unwrap_or("(absent)");
        if s.chars().count() > 90 {
            format!("{}…", s.chars().take(90).collect::<String>())
        } else {
            s.to_string()
        }
    };
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| {
            format!(
                "{k} was {} and is now {}",
                short(old.get(k)),
                short(new.get(k))
            )
        })
        .collect();
    Err(Error::work_dir(
        dir,
        format!(
            "holds a job made from other inputs ({}); use another --work-dir or remove this one",
            changed.join("; ")
        ),
    ))
}

/// One stored tensor of a layer, with its header entry exactly as the checkpoint has it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// A finished layer's record in a work directory: its linear weights' manifest entries and
/// reports, and its stored tensors' header entries (in the native layout, named
/// `{weight}.{suffix}`), without their data.
#[derive(Clone, Debug)]
pub struct StoredLayer {
    pub layer: usize,
    pub seconds: f64,
    /// The adapter that computed it.
    pub device: Option<String>,
    pub entries: Vec<(String, QuantEntry)>,
    pub reports: Vec<MatrixReport>,
    pub tensors: Vec<TensorMeta>,
}

#[derive(Serialize, Deserialize)]
struct LayerHeader {
    layer: usize,
    fingerprint: String,
    seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    entries: Vec<(String, QuantEntry)>,
    reports: Vec<MatrixReport>,
    tensors: Vec<TensorMeta>,
}

pub(super) fn blob_total(
    h: &Value,
    key: &str,
    size: impl Fn(&Value) -> Option<u64>,
) -> Option<u64> {
    h.get(key)?
        .as_array()?
        .iter()
        .try_fold(0u64, |acc, v| acc.checked_add(size(v)?))
}

impl StoredLayer {
    /// Write `layer` to `layer_file(dir, layer.layer)`, tagged with the job's fingerprint.
    pub fn write(layer: &CompressedLayer, dir: &Path, fingerprint: &str) -> Result<()> {
        let mut tensors = Vec::new();
        let mut blobs: Vec<&[u8]> = Vec::new();
        for m in &layer.matrices {
            for (p, bytes) in m.parts()? {
                tensors.push(TensorMeta {
                    name: p.name(&m.weight),
                    dtype: p.dtype.into(),
                    shape: p.shape,
                    bytes: bytes.len(),
                });
                blobs.push(bytes);
            }
        }
        let header = LayerHeader {
            layer: layer.layer,
            fingerprint: fingerprint.into(),
            seconds: layer.seconds,
            device: layer.device.clone(),
            entries: layer
                .matrices
                .iter()
                .map(|m| (m.weight.clone(), m.entry.clone()))
                .collect(),
            reports: layer.reports.clone(),
            tensors,
        };
        let v = serde_json::to_value(&header).expect("header serializes");
        write_container(&layer_file(dir, layer.layer), LAYER_MAGIC, &v, &blobs)
    }

    fn read_impl(
        dir: &Path,
        layer: usize,
        fingerprint: &str,
        mode: Read,
    ) -> Result<(StoredLayer, Vec<u8>)> {
        let path = layer_file(dir, layer);
        let (v, data) = read_container(&path, LAYER_MAGIC, mode, |h| {
            blob_total(h, "tensors", |t| t.get("bytes")?.as_u64())
        })?;
        let h: LayerHeader = serde_json::from_value(v).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
        if h.layer != layer {
            return Err(Error::work_dir(
                &path,
                format!("holds layer {}, not {layer}", h.layer),
            ));
        }
        if h.fingerprint != fingerprint {
            return Err(Error::work_dir(
                &path,
                "was made by another job (fingerprint differs from job.json); remove it",
            ));
        }
        let stored = StoredLayer {
            layer,
            seconds: h.seconds,
            device: h.device,
            entries: h.entries,
            reports: h.reports,
            tensors: h.tensors,
        };
        Ok((stored, data))
    }

    /// Read layer `layer` of the job with `fingerprint` from `dir`: its record and the layer
    /// itself, every weight's parts found by the layout its entry implies.
    pub fn read(
        dir: &Path,
        layer: usize,
        fingerprint: &str,
    ) -> Result<(StoredLayer, CompressedLayer)> {
        let (stored, data) = Self::read_impl(dir, layer, fingerprint, Read::Data)?;
        let path = layer_file(dir, layer);
        let mut offsets = std::collections::HashMap::new();
        let mut off = 0usize;
        for m in &stored.tensors {
            offsets.insert(m.name.as_str(), (off, m));
            off += m.bytes;
        }
        let mut matrices = Vec::with_capacity(stored.entries.len());
        for (weight, entry) in &stored.entries {
            let parts = entry
                .stored_parts()
                .map_err(|msg| Error::tensor(&path, weight, msg))?;
            let mut blobs = Vec::with_capacity(parts.len());
            for p in parts {
                let name = p.name(weight);
                let Some(&(at, m)) = offsets.get(name.as_str()) else {
                    return Err(Error::tensor(
                        &path,
                        &name,
                        "is missing from the layer file",
                    ));
                };
                if Some(m.bytes) != p.bytes() {
                    return Err(Error::tensor(
                        &path,
                        &name,
                        format!("holds {} bytes, its entry implies {:?}", m.bytes, p.bytes()),
                    ));
                }
                blobs.push((p, data[at..at + m.bytes].to_vec()));
            }
            matrices.push(CompressedMatrix {
                weight: weight.clone(),
                data: PackedMatrix::from_parts(entry, blobs),
                entry: entry.clone(),
            });
        }
        let compressed = CompressedLayer {
            layer,
            seconds: stored.seconds,
            device: stored.device.clone(),
            matrices,
            reports: stored.reports.clone(),
        };
        Ok((stored, compressed))
    }

    /// The record alone (the whole file's checksum verified, its data not kept).
    pub fn read_header(dir: &Path, layer: usize, fingerprint: &str) -> Result<StoredLayer> {
        Ok(Self::read_impl(dir, layer, fingerprint, Read::Verify)?.0)
    }
}

/// Calibration activations between layers: the residual stream leaving layer
/// `layers_done - 1`, per sub-batch of whole sequences.
pub struct Activations {
    pub layers_done: usize,
    pub len: usize,
    pub cols: usize,
    /// Rows and f32 values of each sub-batch.
    pub batches: Vec<(usize, Vec<f32>)>,
}

impl Activations {
    pub fn write(&self, dir: &Path, fingerprint: &str) -> Result<()> {
        let header = serde_json::json!({
            "fingerprint": fingerprint,
            "layers_done": self.layers_done,
            "len": self.len,
            "cols": self.cols,
            "batches": self.batches.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        });
        let blobs: Vec<&[u8]> = self
            .batches
            .iter()
            .map(|(_, v)| bytemuck::cast_slice(v.as_slice()))
            .collect();
        write_container(&dir.join(ACTIVATIONS_FILE), ACT_MAGIC, &header, &blobs)
    }

    /// The saved activations, if any.
    pub fn read(dir: &Path, fingerprint: &str) -> Result<Option<Activations>> {
        let path = dir.join(ACTIVATIONS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let cols_of = |h: &Value| h.get("cols").and_then(Value::as_u64);
        let (h, data) = read_container(&path, ACT_MAGIC, Read::Data, |h| {
            let c = cols_of(h)?;
            blob_total(h, "batches", |r| r.as_u64()?.checked_mul(c)?.checked_mul(4))
        })?;
        if h.get("fingerprint").and_then(Value::as_str) != Some(fingerprint) {
            return Err(Error::work_dir(
                &path,
                "was made by another job (fingerprint differs from job.json); remove it",
            ));
        }
        let field = |k: &str| {
            h.get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::work_dir(&path, format!("header lacks `{k}`")))
        };
        let (layers_done, len, cols) = (field("layers_done")?, field("len")?, field("cols")?);
        let rows: Vec<usize> = h["batches"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as usize)
                    .collect()
            })
            .unwrap_or_default();
        let mut batches = Vec::with_capacity(rows.len());
        let mut off = 0;
        for r in rows {
            let n = r * cols * 4;
            let v: Vec<f32> = data[off..off + n]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            off += n;
            batches.push((r, v));
        }
        Ok(Some(Activations {
            layers_done,
            len,
            cols,
            batches,
        }))
    }
}
