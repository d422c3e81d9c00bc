//! Hessian directories (`pumice hessians`, read by `compress --hessians`): a description
//! (hessians.json: the source model, the calibration, the layer count) and one file per layer
//! with its Hessians, in the work directory's checksummed container (see [`super::workdir`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::workdir::{blob_total, read_container, write_atomic, write_container, Read, VERSION};
use crate::base::hash::sha256_hex;
use crate::model::compressed::{CalibInfo, SourceInfo};
use crate::model::InputGroup;
use crate::{Error, Result};

/// The description of a Hessian directory.
pub const HESSIANS_FILE: &str = "hessians.json";
const HESSIANS_FORMAT: &str = "pumice-hessians";
const HESS_MAGIC: &[u8; 8] = b"PMCHESS2";

/// A layer's Hessians in a Hessian directory.
pub fn hessian_file(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer-{layer:05}.hessians"))
}

/// A Hessian directory's description.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HessiansInfo {
    pub format: String,
    pub format_version: u32,
    pub created_by: String,
    pub source: SourceInfo,
    pub calibration: CalibInfo,
    pub layers: usize,
}

impl HessiansInfo {
    pub fn new(source: SourceInfo, calibration: CalibInfo, layers: usize) -> HessiansInfo {
        HessiansInfo {
            format: HESSIANS_FORMAT.into(),
            format_version: VERSION,
            created_by: format!("pumice {}", env!("CARGO_PKG_VERSION")),
            source,
            calibration,
            layers,
        }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("info serializes");
        write_atomic(&dir.join(HESSIANS_FILE), &[text.as_bytes()])
    }

    /// The description and its identity (SHA-256 of the file).
    pub fn read(dir: &Path) -> Result<(HessiansInfo, String)> {
        let p = dir.join(HESSIANS_FILE);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        let info: HessiansInfo = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: p.clone(),
            source: e,
        })?;
        if info.format != HESSIANS_FORMAT || info.format_version != VERSION {
            return Err(Error::work_dir(
                &p,
                format!("not a {HESSIANS_FORMAT} version {VERSION} description"),
            ));
        }
        Ok((info, sha256_hex(&bytes)))
    }
}

/// One layer's Hessians H = Σ XᵀX, one per input group, full symmetric f64 in memory (the
/// upper triangle on disk).
#[derive(Clone, Debug, Default)]
pub struct LayerHessians {
    pub groups: Vec<(InputGroup, usize, Vec<f64>)>,
}

impl LayerHessians {
    /// Move out the Hessian of input group `g` (each is used once; no copy of n² values).
    pub fn take(&mut self, g: InputGroup) -> Option<Vec<f64>> {
        let i = self.groups.iter().position(|(k, _, _)| *k == g)?;
        Some(self.groups.swap_remove(i).2)
    }

    pub fn write(&self, dir: &Path, layer: usize, source_sha256: &str) -> Result<()> {
        let mut tri: Vec<Vec<u8>> = Vec::new();
        for (_, n, h) in &self.groups {
            let mut b = Vec::with_capacity(n * (n + 1) / 2 * 8);
            for i in 0..*n {
                for v in &h[i * n + i..(i + 1) * n] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
            tri.push(b);
        }
        let header = serde_json::json!({
            "layer": layer,
            "source_sha256": source_sha256,
            "groups": self.groups.iter().map(|(g, n, _)| serde_json::json!({"input": g, "features": n})).collect::<Vec<_>>(),
        });
        let blobs: Vec<&[u8]> = tri.iter().map(Vec::as_slice).collect();
        write_container(&hessian_file(dir, layer), HESS_MAGIC, &header, &blobs)
    }

    /// Check that layer `layer`'s file is there, describes that layer and matches its
    /// checksum, without keeping its data (a run verifies every file it will need up front).
    pub fn verify(dir: &Path, layer: usize, source_sha256: &str) -> Result<()> {
        Self::read_impl(dir, layer, source_sha256, Read::Verify).map(|_| ())
    }

    pub fn read(dir: &Path, layer: usize, source_sha256: &str) -> Result<LayerHessians> {
        Self::read_impl(dir, layer, source_sha256, Read::Data)
    }

    fn read_impl(
        dir: &Path,
        layer: usize,
        source_sha256: &str,
        mode: Read,
    ) -> Result<LayerHessians> {
        let path = hessian_file(dir, layer);
        if !path.exists() {
            return Err(Error::work_dir(
                &path,
                format!("is missing: the Hessian directory lacks layer {layer}"),
            ));
        }
        let feats = |g: &Value| g.get("features").and_then(Value::as_u64);
        let (h, data) = read_container(&path, HESS_MAGIC, mode, |h| {
            blob_total(h, "groups", |g| {
                let n = feats(g)?;
                n.checked_mul(n.checked_add(1)?)?
                    .checked_div(2)?
                    .checked_mul(8)
            })
        })?;
        if h.get("layer").and_then(Value::as_u64) != Some(layer as u64)
            || h.get("source_sha256").and_then(Value::as_str) != Some(source_sha256)
        {
            return Err(Error::work_dir(
                &path,
                format!("is not layer {layer} of this model's Hessians"),
            ));
        }
        if mode != Read::Data {
            return Ok(LayerHessians::default());
        }
        let mut groups = Vec::new();
        let mut off = 0;
        for g in h["groups"].as_array().into_iter().flatten() {
            let input: InputGroup = serde_json::from_value(g["input"].clone())
                .map_err(|e| Error::work_dir(&path, format!("bad input group: {e}")))?;
            let n = feats(g).unwrap_or(0) as usize;
            let mut m = vec![0.0f64; n * n];
            for i in 0..n {
                for j in i..n {
                    let v = f64::from_le_bytes(data[off..off + 8].try_into().expect("8 bytes"));
                    off += 8;
                    m[i * n + j] = v;
                    m[j * n + i] = v;
                }
            }
            groups.push((input, n, m));
        }
        Ok(LayerHessians { groups })
    }
}
