//! The fine-tune's output: the input checkpoint rewritten with its CALDERA factors replaced by
//! the tuned ones — rotated back into the stored (randomized-Hadamard) space when the weight
//! was rotated, quantized with the clip search on the stored factor grid (or one of
//! `--factor-bits`; by RTN under QAT, else weighted by the tuned model's input Hessians, see
//! `store`), the entries' stored bits recomputed — through the native format's writer (a
//! temporary sibling moved into place whole).

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{native, Format, JobInfo, Output};

use super::finetune::{Event, FinetuneOptions};
use super::model::{AdapterPlan, TrainModel};

/// Write the model's trained exits (if any) into `dir` (`exits.safetensors`, in the dtype of
/// `base`'s LM head); returns the file's bytes (0 without exits).
fn write_exits(model: &TrainModel<'_>, base: &crate::model::Checkpoint, dir: &Path) -> Result<u64> {
    let exits = &model.trainable.exits;
    if exits.is_empty() {
        return Ok(0);
    }
    let gpu = model.gpu();
    let values = exits
        .iter()
        .map(|e| {
            Ok(crate::model::exits::ExitValues {
                depth: e.depth,
                norm: e.norm.theta.to_f32(gpu)?,
                head: e.head.theta.to_f32(gpu)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    crate::model::exits::write(
        dir,
        &values,
        base.config().hidden_size,
        base.lm_head()?.dtype,
    )
}

/// Write `model`'s tuned factors over `student` into `out`; returns the bytes written and the
/// factor grid's bits. `calib` (token sequences and their length) gives the input Hessians
/// that weigh the rounding of factors not trained quantization-aware.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write(
    model: &TrainModel<'_>,
    student: &crate::model::Checkpoint,
    out: &Path,
    force: bool,
    opts: &FinetuneOptions,
    on: &mut dyn FnMut(&Event),
    before_commit: &mut dyn FnMut(&Path) -> Result<()>,
    calib: Option<(&[u32], usize)>,
) -> Result<(u64, u32)> {
    let gpu = model.gpu();
    let manifest = student
        .manifest()
        .ok_or_else(|| Error::InvalidArgument("not a compressed checkpoint".into()))?;
    let mut planned = native::entries(student)?;
    let mut bits_used = 0;
    for (_, e) in planned.iter_mut().flatten() {
        if e.rank > 0 {
            if let AdapterPlan::Factors {
                factor_bits: Some(b),
                ..
            } = opts.plan
            {
                e.lr_bits = b;
            }
            bits_used = e.lr_bits;
            e.relative_error = None;
            e.stored_bits = e.expected_bits();
        }
    }
    native::Native.check(student, &planned)?;
    let mut output = Output::begin(&native::Native, student, out, force, &planned)?;
    let n = planned.len();
    // With a refit, the tuned model's own input Hessians weigh it (calibration sequences).
    let refit = model
        .trainable
        .adapters
        .iter()
        .any(|a| a.store.as_ref().is_some_and(|s| s.refit));
    let mut walk = match calib {
        Some((tokens, t)) if refit => Some(model.input_hessians(tokens, t)?),
        _ => None,
    };
    for (l, entries) in planned.iter().enumerate() {
        let hessians = match &mut walk {
            Some(w) => model.next_input_hessians(w)?,
            None => Vec::new(),
        };
        let mut layer = native::read_layer(student, l)?;
        let spec = &student.arch().layers[l];
        for m in layer.matrices.iter_mut() {
            let Some((_, e)) = entries.iter().find(|(w, _)| *w == m.weight) else {
                continue;
            };
            if e.rank == 0 {
                continue;
            }
            let kind = spec
                .linears
                .iter()
                .find(|s| s.weight.name == m.weight)
                .map(|s| s.kind)
                .expect("every compressed matrix is one of the layer's linears");
            let ad = model
                .trainable
                .get(l, kind)
                .ok_or_else(|| Error::InvalidArgument(format!("{}: no tuned factors", m.weight)))?;
            let store = ad.store.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("{}: tuned factors without a stored grid", m.weight))
            })?;
            let h = hessians
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, h)| h.as_slice());
            let (ltq, rq) = store.quantize(
                &ad.b.theta.to_f32(gpu)?,
                &ad.a.theta.to_f32(gpu)?,
                e.rank,
                h,
            );
            let factors = (
                crate::compress::pipeline::pack(&ltq)?,
                crate::compress::pipeline::pack(&rq)?,
            );
            m.data.factors = Some(Box::new(factors));
            m.entry = e.clone();
        }
        for rep in layer.reports.iter_mut() {
            if entries.iter().any(|(w, e)| *w == rep.name && e.rank > 0) {
                rep.relative_error = None;
            }
        }
        output.layer(student, &layer)?;
        on(&Event::Writing {
            done: l + 1,
            total: n,
        });
        crate::interrupt::check("stopped while writing; nothing was written")?;
    }
    let mut params = manifest.params.clone();
    if let Some(obj) = params.as_object_mut() {
        obj.insert(
            "finetune".into(),
            serde_json::json!({
                "loss": format!("{:?}", opts.loss),
                "steps": opts.steps,
                "samples": opts.samples,
                "len": opts.len,
                "batch": opts.batch,
                "accum": opts.accum,
                "lr": opts.lr,
                "seed": opts.seed,
                "factor_bits": bits_used,
                "qat": matches!(opts.plan, AdapterPlan::Factors { qat: true, .. }),
            }),
        );
    }
    write_exits(model, student, output.dir())?;
    let written = output.finish_then(
        student,
        JobInfo {
            source: manifest.source.clone(),
            method: manifest.method.clone(),
            params,
            calibration: manifest.calibration.clone(),
            allocation: manifest.allocation.clone(),
        },
        before_commit,
    )?;
    Ok((written.bytes(), bits_used))
}

/// Write `model`'s LoRA adapters as a PEFT adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors`: lora_A r × in, lora_B out × r, f32; lora_alpha = α, so PEFT's
/// scale α/r is the trainer's) for the model in `base`, and its exits (`exits.safetensors`)
/// when it has any. Returns the bytes written.
pub(crate) fn write_lora(
    model: &TrainModel<'_>,
    base: &crate::model::Checkpoint,
    out: &Path,
    force: bool,
    rank: usize,
    alpha: f32,
    before_commit: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<u64> {
    use crate::format::hf;
    use crate::model::compressed::StreamingWriter;
    let gpu = model.gpu();
    let tmp = crate::base::outdir::begin(out)?;
    let named: Vec<(String, &super::params::Adapter)> = model
        .trainable
        .adapters
        .iter()
        .map(|a| {
            let w = &base.arch().layers[a.layer].linear(a.kind).weight.name;
            (hf::module_of(w).to_string(), a)
        })
        .collect();
    let mut plan = Vec::new();
    for (module, a) in &named {
        let [r, inp] = a.a.theta.shape();
        let [o, _] = a.b.theta.shape();
        plan.push(hf::tensor(
            format!("base_model.model.{module}.lora_A.weight"),
            "F32",
            vec![r, inp],
        ));
        plan.push(hf::tensor(
            format!("base_model.model.{module}.lora_B.weight"),
            "F32",
            vec![o, r],
        ));
    }
    let mut writer =
        StreamingWriter::create(&tmp.path.join(crate::format::peft::ADAPTER_FILE), plan)?;
    for (module, a) in &named {
        let av = a.a.theta.to_f32(gpu)?;
        let bv = a.b.theta.to_f32(gpu)?;
        writer.write(
            &format!("base_model.model.{module}.lora_A.weight"),
            bytemuck::cast_slice(&av),
        )?;
        writer.write(
            &format!("base_model.model.{module}.lora_B.weight"),
            bytemuck::cast_slice(&bv),
        )?;
    }
    writer.finish()?;
    let mut kinds: Vec<&str> = named
        .iter()
        .map(|(m, _)| m.rsplit('.').next().unwrap_or(m))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    let kinds = kinds.into_iter().map(String::from).collect();
    crate::format::peft::write_config(
        &tmp.path,
        Some(base.dir()),
        rank,
        serde_json::json!(alpha),
        kinds,
        Default::default(),
    )?;
    let bytes = crate::format::peft::files_of(&tmp.path)?
        .iter()
        .map(|(_, b)| b)
        .sum::<u64>()
        + write_exits(model, base, &tmp.path)?;
    before_commit(&tmp.path)?;
    crate::base::outdir::commit(tmp, out, force)?;
    Ok(bytes)
}
