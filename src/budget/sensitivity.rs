//! Measured sensitivity: for each decoder layer and each option, the KL divergence
//! KL(original ‖ model) over the calibration positions when *only that layer* is compressed
//! with that option (its Hessians from the original model's activations, sequential inside the
//! layer as in `compress`). The compressed layer's output is sent through the original later
//! layers; logits are compared on the GPU (`logit_stats`), never read back. Also records the
//! exact stored bits of the layer's linears under each option.

use serde::{Deserialize, Serialize};

use crate::compress::pipeline::{
    calibration_batches, compress_layer, CalderaSettings, CalibBatches, Event, LayerInput,
    LayerShared,
};
use crate::error::{Error, Result};
use crate::gpu::{ops, Batch, GpuMatrix};
use crate::infer::engine::Engine;
use crate::quant::GptqOptions;

use super::candidates::Candidate;

/// One (layer, option) measurement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OptionResult {
    pub option: String,
    /// Stored bits of the layer's linear weights (codes, grids, factors, permutations, seeds).
    pub bits: u64,
    /// Mean KL(original ‖ only this layer compressed) per calibration position, nats.
    pub kl: f64,
    /// Mean relative weighted error of the layer's matrices.
    pub relative_error: f64,
}

/// How sensitivity is measured.
#[derive(Clone, Debug)]
pub struct SensitivityOptions {
    pub candidates: Vec<Candidate>,
    /// Factor grid and iterations for CALDERA options.
    pub caldera: CalderaSettings,
    pub gptq: GptqOptions,
    pub rht: bool,
    pub seed: u64,
}

/// Progress of a measurement.
#[derive(Clone, Debug)]
pub struct SensitivityProgress {
    pub layer: usize,
    pub option: String,
    pub done: usize,
    pub total: usize,
    pub kl: f64,
}

/// Σ over rows of KL(softmax(ref) ‖ softmax(model)) of two final-normed hidden states.
fn kl_sum(engine: &Engine<'_>, hidden: &GpuMatrix, reference: &GpuMatrix) -> Result<f64> {
    let gpu = engine.gpu();
    let rows = hidden.rows();
    let targets = ops::upload_u32(gpu, &vec![0u32; rows])?;
    let out = gpu.storage((rows * 16) as u64, true)?;
    let block = engine.logit_block_rows();
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + block).min(rows);
        let z = engine.logits(hidden, r0..r1)?;
        let zr = engine.logits(reference, r0..r1)?;
        let mut b = Batch::new(gpu);
        ops::logit_stats(&mut b, &z, Some(&zr), &targets, &out, r0)?;
        b.submit()?;
        r0 = r1;
    }
    let stats: Vec<f32> =
        bytemuck::cast_slice(&gpu.read_bytes(&out, 0, (rows * 16) as u64)?).to_vec();
    let mut sum = 0.0;
    for r in 0..rows {
        let kl = stats[4 * r + 1];
        if !kl.is_finite() {
            return Err(Error::Gpu {
                op: "sensitivity".into(),
                msg: format!("non-finite KL at calibration row {r}"),
            });
        }
        sum += kl.max(0.0) as f64;
    }
    Ok(sum)
}

/// Measure every (layer, option) on `tokens` (whole sequences of `len`). `engine` runs the
/// original model. Returns one row of results per layer, options in the given order.
pub fn measure(
    engine: &mut Engine<'_>,
    tokens: &[u32],
    len: usize,
    opts: &SensitivityOptions,
    progress: &mut dyn FnMut(&SensitivityProgress),
) -> Result<Vec<Vec<OptionResult>>> {
    let gpu = engine.gpu();
    let ck = engine.checkpoint();
    let cfg = ck.config().clone();
    if len == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(len) {
        return Err(Error::Shape(format!(
            "{} calibration tokens are not whole sequences of {len}",
            tokens.len()
        )));
    }
    let recipes = opts
        .candidates
        .iter()
        .map(|c| c.recipe(&opts.caldera))
        .collect::<Result<Vec<_>>>()?;
    // Inputs of layer 0 and the original final hidden states, per sub-batch.
    let CalibBatches { ranges, xs, pos } = calibration_batches(engine, tokens, len)?;
    let refs = ranges
        .iter()
        .map(|r| engine.hidden_states(&tokens[r.start * len..r.end * len], len))
        .collect::<Result<Vec<_>>>()?;
    let rows = tokens.len() as f64;
    let shared = LayerShared {
        gpu,
        ck,
        gptq: opts.gptq,
        rht: opts.rht,
        seed: opts.seed,
        len,
        hessians_on: crate::lowrank::fit::Placement::Auto,
        helpers: &[],
    };
    let layers = cfg.num_layers;
    let total = layers * recipes.len();
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        let mut row = Vec::with_capacity(recipes.len());
        for (c, recipe) in opts.candidates.iter().zip(&recipes) {
            let copies = xs
                .iter()
                .map(|x| x.duplicate(gpu))
                .collect::<Result<Vec<_>>>()?;
            let mut done = 0;
            let res = compress_layer(
                &shared,
                l,
                recipe,
                LayerInput::Activations {
                    engine,
                    xs: &copies,
                    pos: &pos,
                },
                &mut done,
                7,
                &mut |_: &Event| {},
            )?;
            let bits: u64 = res.entries().iter().map(|(_, e)| e.stored_bits).sum();
            let errs: Vec<f64> = res
                .entries()
                .iter()
                .filter_map(|(_, e)| e.relative_error)
                .collect();
            let mut kl = 0.0;
            for (x, r) in copies.iter().zip(&refs) {
                engine.forward_layers(l + 1..layers, x, &pos, len)?;
                let h = engine.final_normed(x, len)?;
                kl += kl_sum(engine, &h, r)?;
            }
            let kl = kl / rows;
            progress(&SensitivityProgress {
                layer: l,
                option: c.name.clone(),
                done: l * recipes.len() + row.len() + 1,
                total,
                kl,
            });
            row.push(OptionResult {
                option: c.name.clone(),
                bits,
                kl,
                relative_error: errs.iter().sum::<f64>() / errs.len().max(1) as f64,
            });
        }
        out.push(row);
        // Advance the original activations through the original layer l.
        for x in &xs {
            engine.forward_layers(l..l + 1, x, &pos, len)?;
        }
    }
    Ok(out)
}
