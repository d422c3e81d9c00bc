//! Reading a PEFT LoRA adapter directory for a model (`eval`/`generate --lora`): every
//! `base_model.model.{module}.lora_A.weight` [r, in] / `lora_B.weight` [out, r] pair matched to
//! a linear layer of the model, its scale α/r (α/√r with `use_rslora`; per-module α and r from
//! `alpha_pattern`/`rank_pattern` keys that name a module), all checked before any GPU work.
//! Exits stored beside the adapter (`exits.safetensors`) come with it.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::exits::Exits;
use crate::model::{Checkpoint, LinearKind};

use super::peft::ADAPTER_FILE;

/// One linear layer's LoRA: y += scale · (x Aᵀ) Bᵀ.
pub struct LoraModule {
    pub layer: usize,
    pub kind: LinearKind,
    pub rank: usize,
    pub scale: f32,
    /// A: rank × in, row-major.
    pub a: Vec<f32>,
    /// B: out × rank, row-major.
    pub b: Vec<f32>,
}

/// A PEFT LoRA adapter read for a model.
pub struct LoraAdapter {
    pub modules: Vec<LoraModule>,
    pub exits: Option<Exits>,
}

/// `key` of a PEFT pattern as the module name it denotes (PEFT matches keys as regular
/// expressions against the end of a module's dotted name; only plain names are read here).
fn pattern_name(key: &str) -> Option<String> {
    let plain = key.replace("\\.", ".");
    let special = |c: char| "\\^$*+?()[]{}|".contains(c);
    (!plain.chars().any(special)).then_some(plain)
}

fn pattern_value(
    cfg_path: &Path,
    patterns: &serde_json::Value,
    module: &str,
    what: &str,
) -> Result<Option<f64>> {
    let Some(map) = patterns.as_object() else {
        return Ok(None);
    };
    for (key, v) in map {
        let name = pattern_name(key).ok_or_else(|| {
            Error::config(
                cfg_path,
                format!("{what} key `{key}` is a regular expression; only module names are read"),
            )
        })?;
        if module == name || module.ends_with(&format!(".{name}")) {
            return v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(cfg_path, format!("{what} `{key}` is not a number")));
        }
    }
    Ok(None)
}

/// Read the adapter in `dir` for `ck`.
pub fn read(dir: &Path, ck: &Checkpoint) -> Result<LoraAdapter> {
    let (cfg_path, cfg) = super::peft::read_config(dir)?;
    for (flag, why) in [
        ("use_dora", "DoRA adapters are not supported"),
        (
            "fan_in_fan_out",
            "fan_in_fan_out adapters (Conv1D models) are not supported",
        ),
    ] {
        if cfg[flag].as_bool() == Some(true) {
            return Err(Error::config(&cfg_path, format!("{flag}: {why}")));
        }
    }
    let rslora = cfg["use_rslora"].as_bool() == Some(true);
    let alpha_default = cfg["lora_alpha"]
        .as_f64()
        .ok_or_else(|| Error::config(&cfg_path, "lora_alpha is missing or not a number"))?;
    // Module name → (layer, kind, out, in).
    let mut linears = BTreeMap::new();
    for (l, spec) in ck.arch().layers.iter().enumerate() {
        for lin in &spec.linears {
            let module = super::hf::module_of(&lin.weight.name).to_string();
            linears.insert(module, (l, lin.kind, lin.out_features, lin.in_features));
        }
    }
    let wpath = dir.join(ADAPTER_FILE);
    let file = crate::model::safetensors::SafetensorsFile::open(&wpath)?;
    let mut pairs: BTreeMap<String, [Option<&crate::model::safetensors::TensorInfo>; 2]> =
        BTreeMap::new();
    for t in file.tensors() {
        let rest = t.name.strip_prefix("base_model.model.");
        let (module, which) = match rest.and_then(|r| {
            r.strip_suffix(".lora_A.weight")
                .map(|m| (m, 0))
                .or_else(|| r.strip_suffix(".lora_B.weight").map(|m| (m, 1)))
        }) {
            Some(x) => x,
            None => return Err(Error::tensor(
                &wpath,
                &t.name,
                "is not a LoRA A or B weight of a module (base_model.model.MODULE.lora_A/B.weight)",
            )),
        };
        pairs.entry(module.to_string()).or_default()[which] = Some(t);
    }
    let mut modules = Vec::with_capacity(pairs.len());
    for (module, [a, b]) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::tensor(
                &wpath,
                &format!("base_model.model.{module}"),
                "has only one of lora_A and lora_B",
            ));
        };
        let &(layer, kind, out, inp) = linears
            .get(&module)
            .ok_or_else(|| Error::tensor(&wpath, &a.name, "names no linear layer of the model"))?;
        let rank = a.shape.first().copied().unwrap_or(0);
        if rank == 0 || a.shape != [rank, inp] || b.shape != [out, rank] {
            return Err(Error::tensor(
                &wpath,
                &a.name,
                format!(
                    "A {:?} and B {:?} do not fit the layer ({out} × {inp}) with one rank",
                    a.shape, b.shape
                ),
            ));
        }
        let values = |t| crate::model::TensorRef::in_file(&file, t)?.to_f32();
        let alpha = pattern_value(&cfg_path, &cfg["alpha_pattern"], &module, "alpha_pattern")?
            .unwrap_or(alpha_default);
        let r = rank as f64;
        let scale = if rslora { alpha / r.sqrt() } else { alpha / r };
        modules.push(LoraModule {
            layer,
            kind,
            rank,
            scale: scale as f32,
            a: values(a)?,
            b: values(b)?,
        });
    }
    if modules.is_empty() {
        return Err(Error::model_dir(&wpath, "holds no LoRA weights"));
    }
    Ok(LoraAdapter {
        modules,
        exits: Exits::open(dir, ck.config())?,
    })
}
