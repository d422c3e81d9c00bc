//! The measurement file: per-layer importance measured once per model, reused by later runs.
//! JSON, written to a temporary name and renamed when complete.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::compressed::CalibInfo;

use super::importance::LayerImportance;

pub const MEASUREMENT_FORMAT: &str = "pumice-measurement";
pub const MEASUREMENT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    pub format: String,
    pub format_version: u32,
    /// The model directory measured.
    pub model: String,
    /// k of the top-k token sets.
    pub top_k: usize,
    pub calibration: CalibInfo,
    pub layers: Vec<LayerImportanceRecord>,
}

/// One layer's record (importance now; measured sensitivities join it later).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerImportanceRecord {
    pub layer: usize,
    pub jaccard: f64,
    pub importance: f64,
}

impl From<&LayerImportance> for LayerImportanceRecord {
    fn from(l: &LayerImportance) -> Self {
        LayerImportanceRecord {
            layer: l.layer,
            jaccard: l.jaccard,
            importance: l.importance,
        }
    }
}

impl Measurement {
    /// Write as JSON to a temporary sibling and rename it into place.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("measurement: {e}")))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "measurement.json".into());
        let tmp = path.with_file_name(format!(".{name}.pumice-tmp-{}", std::process::id()));
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// Read and check a measurement file.
    pub fn read(path: &Path) -> Result<Measurement> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let m: Measurement = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        if m.format != MEASUREMENT_FORMAT {
            return Err(Error::config(
                path,
                format!("not a {MEASUREMENT_FORMAT} file"),
            ));
        }
        if m.format_version > MEASUREMENT_VERSION {
            return Err(Error::config(
                path,
                format!(
                    "measurement format version {} is newer than this build reads ({MEASUREMENT_VERSION})",
                    m.format_version
                ),
            ));
        }
        if m.layers.iter().enumerate().any(|(i, l)| l.layer != i) {
            return Err(Error::config(
                path,
                "layers are not numbered 0, 1, … in order".to_string(),
            ));
        }
        Ok(m)
    }
}
