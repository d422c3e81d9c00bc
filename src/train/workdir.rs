//! A fine-tune's work directory: one checksummed container (`finetune.bin`, compress's
//! container format, written atomically) holding the job's fingerprint, the steps done and
//! their losses, the training tokens (so sampled data is never drawn again) and every
//! parameter's value and AdamW moments. A run resumed from it continues with the same data
//! order and optimizer state, so its output equals an uninterrupted run's byte for byte.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::compress::workdir::{read_container, write_container, Read};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"PMCTUNE1";
pub const STATE_FILE: &str = "finetune.bin";

/// What a work directory holds.
#[derive(Clone, Debug)]
pub struct State {
    pub fingerprint: String,
    /// Optimizer steps done.
    pub step: usize,
    pub losses: Vec<f64>,
    /// The held-out score before tuning, when it was measured.
    pub before: Option<super::finetune::HeldOut>,
    pub tokens: Vec<u32>,
    /// Per parameter (in `Trainable::params` order): value, gradient, first and second moment.
    pub params: Vec<[Vec<f32>; 4]>,
    /// Per parameter: AdamW steps taken.
    pub param_steps: Vec<u32>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

impl State {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let header = serde_json::json!({
            "fingerprint": self.fingerprint,
            "step": self.step,
            "losses": self.losses,
            "before": self.before,
            "tokens": self.tokens.len(),
            "params": self.params.iter().map(|p| p[0].len()).collect::<Vec<_>>(),
            "param_steps": self.param_steps,
        });
        let mut blobs: Vec<&[u8]> = vec![bytemuck::cast_slice(&self.tokens)];
        for p in &self.params {
            for v in p {
                blobs.push(bytemuck::cast_slice(v));
            }
        }
        write_container(&path(dir), MAGIC, &header, &blobs)
    }

    /// The saved state, if any; one of another job (fingerprint) is refused.
    pub fn read(dir: &Path, fingerprint: &str) -> Result<Option<State>> {
        let p = path(dir);
        if !p.exists() {
            return Ok(None);
        }
        let sizes = |h: &Value| -> Option<(u64, Vec<u64>)> {
            let t = h.get("tokens")?.as_u64()?;
            let ps = h
                .get("params")?
                .as_array()?
                .iter()
                .map(Value::as_u64)
                .collect::<Option<Vec<_>>>()?;
            Some((t, ps))
        };
        let (h, data) = read_container(&p, MAGIC, Read::Data, |h| {
            let (t, ps) = sizes(h)?;
            ps.iter().try_fold(t.checked_mul(4)?, |acc, &n| {
                acc.checked_add(n.checked_mul(16)?)
            })
        })?;
        if h.get("fingerprint").and_then(Value::as_str) != Some(fingerprint) {
            return Err(Error::work_dir(
                &p,
                "was made by a fine-tune of other inputs or options; remove it or use another \
                 --work-dir",
            ));
        }
        let (t, ps) = sizes(&h).expect("checked by the size function");
        let step = h
            .get("step")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::work_dir(&p, "header lacks `step`"))? as usize;
        let losses: Vec<f64> = h
            .get("losses")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        if losses.len() != step {
            return Err(Error::work_dir(&p, "its losses do not match its steps"));
        }
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let mut off = 4 * t as usize;
        let tokens: Vec<u32> = data[..off]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let mut params = Vec::with_capacity(ps.len());
        for n in ps {
            let n = 4 * n as usize;
            let mut four: [Vec<f32>; 4] = Default::default();
            for v in four.iter_mut() {
                *v = f32s(&data[off..off + n]);
                off += n;
            }
            params.push(four);
        }
        let param_steps: Vec<u32> = h
            .get("param_steps")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as u32)
                    .collect()
            })
            .unwrap_or_default();
        if param_steps.len() != params.len() {
            return Err(Error::work_dir(
                &p,
                "its parameter steps do not match its parameters",
            ));
        }
        let before = h
            .get("before")
            .and_then(|b| serde_json::from_value(b.clone()).ok());
        Ok(Some(State {
            fingerprint: fingerprint.to_string(),
            step,
            losses,
            before,
            tokens,
            params,
            param_steps,
        }))
    }
}
