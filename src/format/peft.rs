//! CALDERA's low-rank factors as a PEFT LoRA adapter directory (`adapter_config.json`,
//! `adapter_model.safetensors`): lora_A = R (rank × in), lora_B = L (out × rank), f32 (exact: a
//! factor's f16 scale times a small integer fits f32), lora_alpha = rank for every module
//! (scaling 1), so base(Q) + adapter computes Q + L·R. Modules of other ranks are named in
//! `rank_pattern` / `alpha_pattern`. Written on its own (`--format peft`) or beside a quantized
//! base (`adapter/` of a compressed-tensors export of a CALDERA checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::base::atomic::write_atomic;
use crate::error::{Error, Result};
use crate::format::weights::factors;
use crate::model::compressed::{Accounting, PlannedTensor, QuantEntry, StreamingWriter};
use crate::model::Checkpoint;

use super::{hf, CompressedLayer, Format, FormatWriter, JobInfo, Planned, Written};

/// The adapter's file of tensors.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// The adapter's configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

fn lora_names(module: &str) -> (String, String) {
    (
        format!("base_model.model.{module}.lora_A.weight"),
        format!("base_model.model.{module}.lora_B.weight"),
    )
}

/// Why an entry's factors cannot be an adapter (None: they can, or it has none).
pub(crate) fn refusal(e: &QuantEntry) -> Option<String> {
    (e.rank > 0 && e.rht.is_some()).then(|| {
        "its low-rank factors live in pumice's randomized-Hadamard rotated space, which a LoRA \
         adapter cannot express (compress without --rht, or export --format dense)"
            .to_string()
    })
}

/// The PEFT adapter of a CALDERA checkpoint.
pub struct Peft;

impl Format for Peft {
    fn name(&self) -> &'static str {
        "peft"
    }

    /// The factors alone (the base model is not written).
    fn stored_bits(&self, e: &QuantEntry) -> u64 {
        adapter_bits(e)
    }

    fn check(&self, ck: &Checkpoint, planned: &Planned) -> Result<()> {
        super::check_each(ck, planned, "a PEFT adapter", refusal)?;
        if !planned.iter().flatten().any(|(_, e)| e.rank > 0) {
            return Err(Error::InvalidArgument(format!(
                "{}: no weight has low-rank factors (a PEFT adapter holds CALDERA's L·R; \
                 compress with --method caldera)",
                ck.dir().display()
            )));
        }
        Ok(())
    }

    fn begin(
        &self,
        _ck: &Checkpoint,
        dir: &Path,
        _target: &Path,
        planned: &Planned,
    ) -> Result<Box<dyn FormatWriter>> {
        Ok(Box::new(AdapterOnly(LoraWriter::begin(
            dir, None, planned,
        )?)))
    }
}

struct AdapterOnly(LoraWriter);

impl FormatWriter for AdapterOnly {
    fn layer(&mut self, _ck: &Checkpoint, layer: &CompressedLayer) -> Result<()> {
        self.0.layer(layer)
    }

    fn finish(self: Box<Self>, _ck: &Checkpoint, job: JobInfo) -> Result<Written> {
        let (files, params) = self.0.finish()?;
        let bytes: u64 = files.iter().map(|(_, b)| b).sum();
        Ok(Written {
            files,
            total: Accounting::new(job.source.parameters, bytes * 8),
            linear: Accounting::new(params, bytes * 8),
        })
    }
}

/// Writes the adapter of every weight with factors, layer by layer.
pub(crate) struct LoraWriter {
    dir: PathBuf,
    base: Option<PathBuf>,
    writer: StreamingWriter,
    /// Rank per module with factors, in model order.
    ranks: BTreeMap<String, usize>,
    params: usize,
}

/// Bits of one module's factors in the adapter: lora_A (rank × in) and lora_B (out × rank),
/// f32.
pub(crate) fn adapter_bits(e: &QuantEntry) -> u64 {
    (e.rank * (e.rows + e.cols) * 32) as u64
}

impl LoraWriter {
    /// Plan the adapter of `planned` (weights with factors) in `dir`; `base` is the
    /// directory of the model it applies to, when known.
    pub(crate) fn begin(dir: &Path, base: Option<&Path>, planned: &Planned) -> Result<LoraWriter> {
        let mut plan: Vec<PlannedTensor> = Vec::new();
        let mut ranks = BTreeMap::new();
        for (weight, e) in planned.iter().flatten().filter(|(_, e)| e.rank > 0) {
            let module = hf::module_of(weight);
            let (a, b) = lora_names(module);
            plan.push(hf::tensor(a, "F32", vec![e.rank, e.cols]));
            plan.push(hf::tensor(b, "F32", vec![e.rows, e.rank]));
            ranks.insert(module.to_string(), e.rank);
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let writer = StreamingWriter::create(&dir.join(ADAPTER_FILE), plan)?;
        Ok(LoraWriter {
            dir: dir.to_path_buf(),
            base: base.map(Path::to_path_buf),
            writer,
            ranks,
            params: 0,
        })
    }

    pub(crate) fn layer(&mut self, layer: &CompressedLayer) -> Result<()> {
        for m in &layer.matrices {
            let Some((lt, r)) = factors(&m.entry, &m.data)? else {
                continue;
            };
            let (rows, k) = (m.entry.rows, m.entry.rank);
            // lora_B = L (rows × k), from the stored Lᵀ (k × rows).
            let mut l = vec![0.0f32; rows * k];
            for t in 0..k {
                for i in 0..rows {
                    l[i * k + t] = lt[t * rows + i];
                }
            }
            let (a, b) = lora_names(hf::module_of(&m.weight));
            self.writer.write(&a, bytemuck::cast_slice(&r))?;
            self.writer.write(&b, bytemuck::cast_slice(&l))?;
            self.params += r.len() + l.len();
        }
        Ok(())
    }

    /// Close the tensors and write the configuration; the files written (relative to the
    /// adapter directory) and the adapter's parameter count.
    pub(crate) fn finish(self) -> Result<(Vec<(String, u64)>, usize)> {
        self.writer.finish()?;
        // The most common rank is the default; the others are named.
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for &r in self.ranks.values() {
            *counts.entry(r).or_default() += 1;
        }
        let r = counts
            .iter()
            .max_by_key(|(r, n)| (**n, **r))
            .map_or(0, |(r, _)| *r);
        let pattern: serde_json::Map<String, serde_json::Value> = self
            .ranks
            .iter()
            .filter(|(_, &k)| k != r)
            .map(|(m, &k)| (regex_escape(m), k.into()))
            .collect();
        write_config(
            &self.dir,
            self.base.as_deref(),
            r,
            serde_json::json!(r),
            self.ranks.keys().cloned().collect(),
            pattern,
        )?;
        let files = files_of(&self.dir)?;
        Ok((files, self.params))
    }
}

/// Write `adapter_config.json` of a LoRA adapter (rank `r` and `alpha` by default, other
/// modules' ranks and alphas in `patterns`) into `dir`, atomically.
pub(crate) fn write_config(
    dir: &Path,
    base: Option<&Path>,
    r: usize,
    alpha: serde_json::Value,
    target_modules: Vec<String>,
    patterns: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.map(|p| p.display().to_string()),
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": patterns,
        "alpha_pattern": patterns,
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
    });
    let text = serde_json::to_string_pretty(&config).expect("config serializes");
    write_atomic(&dir.join(ADAPTER_CONFIG), &[text.as_bytes(), b"\n"])
}

/// The adapter's two files in `dir` with their sizes.
pub(crate) fn files_of(dir: &Path) -> Result<Vec<(String, u64)>> {
    [ADAPTER_FILE, ADAPTER_CONFIG]
        .iter()
        .map(|f| {
            let p = dir.join(f);
            Ok((
                f.to_string(),
                std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len(),
            ))
        })
        .collect()
}

/// `name` as a regular expression matching itself (module names hold dots; PEFT matches a
/// pattern against the end of a module's dotted name).
fn regex_escape(name: &str) -> String {
    name.replace('.', "\\.")
}

/// Whether `dir` is a PEFT adapter directory (it has adapter_config.json).
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// The adapter_config.json of the LoRA adapter in `dir` (its path, its JSON); any other PEFT
/// type is refused.
pub(crate) fn read_config(dir: &Path) -> Result<(std::path::PathBuf, serde_json::Value)> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    if cfg["peft_type"] != "LORA" {
        return Err(Error::config(
            &cfg_path,
            format!("peft_type {} is not LORA", cfg["peft_type"]),
        ));
    }
    Ok((cfg_path, cfg))
}

/// Summarize the PEFT adapter directory `dir` (its configuration and tensors; any adapter,
/// not only pumice's).
pub fn summary(dir: &Path) -> Result<hf::AdapterSummary> {
    let (_, cfg) = read_config(dir)?;
    let mut bytes = 0;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        bytes += e.metadata().map_err(|err| Error::io(e.path(), err))?.len();
    }
    let weights = dir.join(ADAPTER_FILE);
    let f = crate::model::safetensors::SafetensorsFile::open(&weights)?;
    let mut dtypes: Vec<String> = Vec::new();
    let (mut tensors, mut parameters) = (0, 0u64);
    for t in f.tensors() {
        tensors += 1;
        parameters += t.numel() as u64;
        if !dtypes.contains(&t.dtype_name) {
            dtypes.push(t.dtype_name.clone());
        }
    }
    let count = |k: &str| match &cfg[k] {
        serde_json::Value::Array(a) => a.len(),
        serde_json::Value::Object(o) => o.len(),
        serde_json::Value::String(_) => 1,
        _ => 0,
    };
    Ok(hf::AdapterSummary {
        path: dir.display().to_string(),
        bytes,
        r: cfg["r"].as_u64().unwrap_or(0),
        alpha: cfg["lora_alpha"].as_f64().unwrap_or(0.0),
        rank_pattern: count("rank_pattern"),
        target_modules: count("target_modules"),
        tensors,
        parameters,
        dtypes,
    })
}
