//! The measurement file: per-layer importance measured once per model, reused by later runs.
//! JSON, written to a temporary name and renamed when complete.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::compressed::CalibInfo;

use super::importance::LayerImportance;
use super::sensitivity::OptionResult;

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
    /// Names of the options whose sensitivity was measured (empty: importance only).
    #[serde(default)]
    pub options: Vec<String>,
    /// Whether the options were measured with incoherence processing.
    #[serde(default)]
    pub rht: bool,
    /// Linear parameters per decoder layer.
    #[serde(default)]
    pub layer_params: u64,
    pub layers: Vec<LayerImportanceRecord>,
}

/// One layer's record: LSAQ importance and, per option, measured sensitivity and size.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerImportanceRecord {
    pub layer: usize,
    pub jaccard: f64,
    pub importance: f64,
    #[serde(default)]
    pub sensitivity: Vec<OptionResult>,
}

impl From<&LayerImportance> for LayerImportanceRecord {
    fn from(l: &LayerImportance) -> Self {
        LayerImportanceRecord {
            layer: l.layer,
            jaccard: l.jaccard,
            importance: l.importance,
            sensitivity: Vec::new(),
        }
    }
}

impl Measurement {
    /// Write as JSON to a temporary sibling and rename it into place.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("measurement: {e}")))?;
        crate::base::atomic::write_atomic(path, &[text.as_bytes(), b"\n"])
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
        if let Some(l) = m.layers.iter().find(|l| {
            l.sensitivity.len() != m.options.len()
                || l.sensitivity
                    .iter()
                    .zip(&m.options)
                    .any(|(r, o)| &r.option != o)
        }) {
            return Err(Error::config(
                path,
                format!(
                    "layer {}: measured options disagree with the file's option list",
                    l.layer
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
