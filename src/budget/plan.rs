//! From a measurement file and a budget to per-layer recipes: the allocation rule picks one
//! measured option per layer (LUC may add per-layer sparsity), and the choice is recorded for
//! the manifest.

use std::path::PathBuf;

use crate::budget::allocate::{
    allocate, linear_budget_bits, luc_sparsities, min_bits, Budget, Rule,
};
use crate::budget::candidates::Candidate;
use crate::budget::measurement::Measurement;
use crate::compress::pipeline::{planned_entries, CompressOptions, Method};
use crate::format::{Format, Planned};
use crate::model::Checkpoint;
use crate::quant::sparsity::Sparsity;
use crate::{Error, Result};

/// What `compress --measurement` asks for.
#[derive(Clone, Debug)]
pub struct AllocationRequest {
    /// The measurement file (`pumice importance MODEL -o FILE`).
    pub measurement: PathBuf,
    pub rule: Rule,
    pub budget: Budget,
    /// With `Rule::Luc`: the mean unstructured sparsity spread over the layers.
    pub sparsity: Option<Sparsity>,
}

/// The measurement with every option's bits counted as the output format stores them under
/// this run's settings (a GGUF adapter's factors at f16/q8_0, GPTQ's packed zero points, the
/// factor grid of `--lr-bits`): the allocation spends what the written file will hold. Options
/// the format refuses are dropped; none left is an error.
fn in_target_bits(
    ck: &Checkpoint,
    mut m: Measurement,
    opts: &CompressOptions,
    format: &dyn Format,
) -> Result<Measurement> {
    let mut keep = Vec::new();
    let mut refused = Vec::new();
    for (o, name) in m.options.iter().enumerate() {
        let mut one = opts.clone();
        one.rht = m.rht;
        one.layers = vec![Candidate { name: name.clone() }.recipe(&opts.caldera)?; m.layers.len()];
        let planned = planned_entries(ck, &one)?;
        if let Err(e) = format.check(ck, &planned) {
            refused.push(format!("{name} ({e})"));
            continue;
        }
        for (layer, bits) in m.layers.iter_mut().zip(layer_bits(format, &planned)) {
            layer.sensitivity[o].bits = bits;
        }
        keep.push(o);
    }
    if keep.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "--format {} can hold none of the measured options: {}",
            opts.format.name(),
            refused.join("; ")
        )));
    }
    m.options = keep.iter().map(|&o| m.options[o].clone()).collect();
    for layer in &mut m.layers {
        layer.sensitivity = keep.iter().map(|&o| layer.sensitivity[o].clone()).collect();
    }
    Ok(m)
}

/// The bits `format` stores for each layer of `planned`.
fn layer_bits(format: &dyn Format, planned: &Planned) -> Vec<u64> {
    planned
        .iter()
        .map(|layer| layer.iter().map(|(_, e)| format.stored_bits(e)).sum())
        .collect()
}

/// Choose per-layer recipes from a measurement file within a budget, set them in `opts` with
/// the allocation record for the manifest; returns a one-line summary of the choice.
pub fn allocate_layers(
    ck: &Checkpoint,
    req: &AllocationRequest,
    opts: &mut CompressOptions,
) -> Result<String> {
    let path = req.measurement.as_path();

    let m = Measurement::read(path)?;
    let cfg = ck.config();
    let layer_params: u64 = ck.arch().layers[0]
        .linears
        .iter()
        .map(|l| (l.in_features * l.out_features) as u64)
        .sum();
    if m.layers.len() != cfg.num_layers || m.layer_params != layer_params {
        return Err(Error::InvalidArgument(format!(
            "{}: measured on a model with {} layers of {} linear parameters, but {} has {} of {layer_params}",
            path.display(),
            m.layers.len(),
            m.layer_params,
            ck.dir().display(),
            cfg.num_layers
        )));
    }
    let format = opts.format.make(opts.dtype, ck.dtype())?;
    let m = in_target_bits(ck, m, opts, format.as_ref())?;
    let (rule, budget) = (req.rule, req.budget);
    let budget_bits = linear_budget_bits(ck, budget, min_bits(&m))?;
    let alloc = allocate(&m, rule, budget_bits)?;
    let layers: Vec<serde_json::Value> = alloc
        .choice
        .iter()
        .enumerate()
        .map(|(l, &o)| {
            let r = &m.layers[l];
            serde_json::json!({
                "layer": l,
                "importance": r.importance,
                "option": m.options[o],
                "bits_per_parameter": r.sensitivity[o].bits as f64 / m.layer_params as f64,
                "predicted_kl": r.sensitivity[o].kl,
                "sensitivity": r.sensitivity.iter().map(|s| (s.option.clone(), s.kl)).collect::<std::collections::BTreeMap<_, _>>(),
            })
        })
        .collect();
    opts.layers = alloc
        .choice
        .iter()
        .map(|&o| {
            Candidate {
                name: m.options[o].clone(),
            }
            .recipe(&opts.caldera)
        })
        .collect::<Result<_>>()?;
    // LUC's pruning half: per-layer unstructured sparsity around the mean --sparsity.
    let mut sparsities: Vec<Option<f64>> = vec![None; cfg.num_layers];
    if let (Rule::Luc, Some(sp)) = (rule, req.sparsity) {
        let mean = match sp {
            Sparsity::Unstructured(p) => p as f64,
            _ => {
                return Err(Error::InvalidArgument(
                    "--allocate luc takes --sparsity as a mean fraction (e.g. 0.3), not 2:4".into(),
                ))
            }
        };
        let per_layer = luc_sparsities(&m, mean);
        for (l, r) in opts.layers.iter_mut().enumerate() {
            if per_layer[l] > 0.0 {
                if r.method != Method::Gptq {
                    return Err(Error::InvalidArgument(format!(
                        "--allocate luc --sparsity: layer {l} got `{}`, but pruning needs gptq options",
                        m.options[alloc.choice[l]]
                    )));
                }
                r.sparsity = Sparsity::Unstructured(per_layer[l] as f32);
                sparsities[l] = Some(per_layer[l]);
            }
        }
    } else if req.sparsity.is_some() {
        return Err(Error::InvalidArgument(
            "with --measurement, --sparsity goes with --allocate luc (per-layer sparsity around that mean)".into(),
        ));
    }
    let layers: Vec<serde_json::Value> = layers
        .into_iter()
        .zip(&sparsities)
        .map(|(mut v, s)| {
            v["sparsity"] = serde_json::json!(s);
            v
        })
        .collect();
    opts.rht = m.rht;
    let planned: u64 = layer_bits(format.as_ref(), &planned_entries(ck, opts)?)
        .iter()
        .sum();
    if planned > budget_bits {
        return Err(Error::InvalidArgument(
            if sparsities.iter().any(Option::is_some) {
                format!("with LUC pruning the linear layers need {planned} bits, over the budget of {budget_bits} (each pruned weight's mask bit costs more than it saves below 1/bits sparsity); lower --sparsity or raise the budget")
            } else {
                // An f32 GGUF adapter pads ranks to the largest where the scale is not exact.
                format!("the allocation's linear layers need {planned} bits in {}, over the budget of {budget_bits}; raise the budget or choose a smaller --dtype for the adapter", opts.format.name())
            },
        ));
    }
    opts.allocation = Some(serde_json::json!({
        "rule": rule.name(),
        "measurement": path.display().to_string(),
        "budget": match budget {
            Budget::Bpw(b) => serde_json::json!({"target_bpw": b}),
            Budget::MaxSize(b) => serde_json::json!({"max_size": b}),
            Budget::Memory { bytes, context } => serde_json::json!({"memory_budget": bytes, "context": context}),
        },
        "bits_of": opts.format.name(),
        "budget_bits": alloc.budget_bits,
        "allocated_bits": alloc.bits,
        "predicted_kl": alloc.predicted_kl,
        "layers": layers,
    }));
    Ok(format!(
        "allocation ({}): {} (predicted KL {:.4})",
        rule.name(),
        alloc
            .choice
            .iter()
            .map(|&o| m.options[o].as_str())
            .collect::<Vec<_>>()
            .join(", "),
        alloc.predicted_kl
    ))
}
