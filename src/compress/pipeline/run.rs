//! `compress`: validation, job and resume, the start point, the loop over layers, and the
//! final write.

use std::path::Path;
use std::time::Instant;

use crate::base::outdir;
use crate::error::{Error, Result};
use crate::gpu::ops;
use crate::gpu::{Gpu, GpuMatrix};
use crate::model::compressed::LayerReport;
use crate::model::Checkpoint;
use crate::quant::sparsity::Sparsity;

use crate::compress::calib::CalibOptions;
use crate::compress::hessdir::{HessiansInfo, LayerHessians};
use crate::compress::workdir::{
    check_inputs, fingerprint, layer_file, Activations, Job, StoredLayer,
};

use crate::format::{JobInfo, Output};

use super::spread::{spread_layers, Finished, SavedHessians};
use super::{checks::*, job::*, layer::*, layout::*, options::*, output::*};

/// Compress `ck` into `opts.output` — or, with `opts.shard`, compress that shard's layers into
/// `opts.work_dir` for [`merge`].
pub fn compress(
    gpu: &Gpu,
    ck: &Checkpoint,
    opts: &CompressOptions,
    progress: &mut dyn FnMut(&Event),
) -> Result<CompressSummary> {
    compress_on(&[gpu], ck, opts, progress)
}

/// [`compress`] on several adapters at once. With saved Hessians (`opts.hessians`) the layers
/// are independent and each adapter takes the next one as soon as it is free (see
/// [`super::spread`]); each layer records the adapter that computed it. Without them each
/// layer needs the one before it (the quantized layer feeds the next): the first adapter
/// calibrates and propagates, and the matrices of each input group (q/k/v, gate/up) are
/// quantized on the adapters at once, each matrix on a fixed one (by size), which its report
/// records. The first adapter does everything else.
pub fn compress_on(
    gpus: &[&Gpu],
    ck: &Checkpoint,
    opts: &CompressOptions,
    progress: &mut dyn FnMut(&Event),
) -> Result<CompressSummary> {
    let start = Instant::now();
    let Some(&gpu) = gpus.first() else {
        return Err(Error::InvalidArgument("no adapter to compress on".into()));
    };
    if ck.manifest().is_some() {
        return Err(Error::InvalidArgument(format!(
            "{} is already a compressed checkpoint; compress the original model",
            ck.dir().display()
        )));
    }
    let nlayers = ck.arch().layers.len();
    for l in 0..nlayers {
        let r = opts.recipe(l);
        if r.sparsity != Sparsity::Dense
            && (r.method != Method::Gptq || opts.gptq.act_order || opts.gptq.block > 128)
        {
            return Err(Error::InvalidArgument(
                "pruning (--sparsity) works with --method gptq, without --act-order".into(),
            ));
        }
    }
    // What the output will hold, checked by the format before any GPU work.
    let format = opts.format.make(opts.dtype, ck.dtype())?;
    let format = format.as_ref();
    let planned = planned_entries(ck, opts)?;
    format.check(ck, &planned)?;
    let todo = match opts.shard {
        Some((i, n)) => {
            if opts.work_dir.is_none() || opts.hessians.is_none() {
                return Err(Error::InvalidArgument(
                    "a shard (--shard I/N) needs --hessians HDIR and --work-dir DIR".into(),
                ));
            }
            if n == 0 || i >= n {
                return Err(Error::InvalidArgument(format!(
                    "shard {i}/{n}: the index must be below the count (0-based)"
                )));
            }
            shard_layers(nlayers, i, n)
        }
        None => {
            let mut inputs: Vec<(&str, &Path)> = Vec::new();
            if let Some(w) = &opts.work_dir {
                inputs.push(("work directory", w));
            }
            if let Some(h) = &opts.hessians {
                inputs.push(("Hessian directory", h));
            }
            outdir::check_output_apart(&opts.output, &inputs)?;
            if opts.work_dir.is_none() {
                outdir::check_output(ck.dir(), &opts.output, opts.force)?;
            }
            0..nlayers
        }
    };
    let cfg = ck.config().clone();
    let len = opts.calib.len.min(cfg.max_position_embeddings).max(2);
    let copts = CalibOptions {
        len,
        ..opts.calib.clone()
    };
    let source = source_info(ck)?;
    let hessians = match &opts.hessians {
        Some(d) => {
            let (info, id) = HessiansInfo::read(d)?;
            if info.source.sha256 != source.sha256 || info.layers != nlayers {
                return Err(Error::work_dir(
                    d,
                    format!(
                        "holds the Hessians of another model ({}, sha256 {}…), not of {}",
                        info.source.path,
                        &info.source.sha256[..12.min(info.source.sha256.len())],
                        ck.dir().display()
                    ),
                ));
            }
            Some((d.clone(), info, id))
        }
        None => None,
    };
    // What a work directory's job depends on (only needed with one: hashing the calibration
    // text is not free).
    let inputs = match &opts.work_dir {
        Some(_) => job_inputs(
            gpus,
            opts,
            &source.sha256,
            hessians.as_ref().map(|h| h.2.as_str()),
        )?,
        None => Default::default(),
    };
    let fp = fingerprint(&inputs);
    // A resumed job may find its own output, committed just before a kill ended the process:
    // replacing it with the identical one loses nothing. (Checked here, once the job's
    // fingerprint is known.)
    let force = opts.force
        || (opts.resume
            && opts
                .work_dir
                .as_deref()
                .is_some_and(|d| outdir::written_by(d, &fp, &opts.output)));
    if opts.shard.is_none() && opts.work_dir.is_some() {
        outdir::check_output(ck.dir(), &opts.output, force)?;
    }
    let mut job = None;
    if let Some(wd) = &opts.work_dir {
        if wd.exists() && !wd.is_dir() {
            return Err(Error::work_dir(wd, "is not a directory"));
        }
        std::fs::create_dir_all(wd).map_err(|e| Error::io(wd, e))?;
        if let Some(j) = Job::read(wd)? {
            check_inputs(wd, &j.inputs, &inputs)?;
            if !opts.resume && opts.shard.is_none() {
                return Err(Error::work_dir(
                    wd,
                    "holds a started job; pass --resume to continue it, or remove the directory",
                ));
            }
            job = Some(j);
        }
    }

    // Everything earlier runs left is read and verified before any GPU work: saved
    // activations, finished layers (checksums, entries), the Hessian files still needed.
    let saved = match (&hessians, &opts.work_dir, &job) {
        (None, Some(wd), Some(_)) => match Activations::read(wd, &fp)? {
            Some(a) => {
                let rows: usize = a.batches.iter().map(|(r, _)| *r).sum();
                if a.len != len
                    || a.cols != cfg.hidden_size
                    || a.layers_done == 0
                    || a.layers_done > nlayers
                    || rows == 0
                    || a.batches.iter().any(|(r, _)| r % len != 0)
                {
                    return Err(Error::work_dir(
                        wd.join(crate::compress::workdir::ACTIVATIONS_FILE),
                        format!(
                            "does not fit this model and job ({} layers done of {nlayers}, {} × {} per sequence, the job needs {len} × {})",
                            a.layers_done, a.len, a.cols, cfg.hidden_size
                        ),
                    ));
                }
                Some(a)
            }
            None => None,
        },
        _ => None,
    };
    let first = saved.as_ref().map_or(todo.start, |a| a.layers_done);
    // Finished layers' headers, read and verified once here, used by the loop below.
    let mut finished_layers = std::collections::BTreeMap::new();
    for l in todo.clone() {
        let finished = match &opts.work_dir {
            Some(wd) if hessians.is_some() => layer_file(wd, l).exists(),
            Some(_) => l < first,
            None => false,
        };
        if let (true, Some(wd)) = (finished, &opts.work_dir) {
            let path = layer_file(wd, l);
            if !path.exists() {
                return Err(Error::work_dir(
                    &path,
                    format!(
                        "is missing, yet {} says {first} layers are done; remove that file to start again",
                        crate::compress::workdir::ACTIVATIONS_FILE
                    ),
                ));
            }
            let header = StoredLayer::read_header(wd, l, &fp)?;
            check_stored_layer(ck, wd, &header)?;
            finished_layers.insert(l, header);
        } else if let Some((d, info, _)) = &hessians {
            LayerHessians::verify(d, l, &info.source.sha256)?;
        }
    }

    // The forward pass (calibration, propagation); saved Hessians need none.
    let mut engine = match &hessians {
        None => Some(streaming_engine(gpu, ck, len)?),
        Some(_) => None,
    };
    // Starting point: saved Hessians, saved activations, or a fresh calibration.
    let mut xs: Vec<GpuMatrix> = Vec::new();
    let mut pos = None;
    let calib_info = match (&hessians, saved, &job) {
        (Some((_, info, _)), _, _) => info.calibration.clone(),
        (None, Some(a), Some(j)) => {
            let most = a.batches.iter().map(|(r, _)| *r).max().unwrap_or(len);
            for (rows, v) in &a.batches {
                xs.push(GpuMatrix::from_f32_grouped(gpu, *rows, a.cols, len, v)?);
            }
            let positions: Vec<u32> = (0..most).map(|r| (r % len) as u32).collect();
            pos = Some(ops::upload_u32(gpu, &positions)?);
            progress(&Event::Note(format!(
                "resuming: {first} of {nlayers} layers already done"
            )));
            j.calibration.clone()
        }
        _ => {
            let engine = engine.as_mut().expect("no saved Hessians: an engine");
            let c = calibrate(engine, &opts.calib_source, &copts, progress)?;
            let b = calibration_batches(engine, &c.tokens, len)?;
            xs = b.xs;
            pos = Some(b.pos);
            c.info
        }
    };
    gpu.wait()?;
    let mut stages = StageTimes {
        calibration: start.elapsed().as_secs_f64(),
        hessians_on: opts.hessians.is_none().then(|| {
            if opts.calib.hessians_on.host_for(gpu.caps().is_cpu) {
                "host"
            } else {
                "gpu"
            }
        }),
        ..Default::default()
    };
    let base = JobInfo {
        source,
        method: manifest_method(opts),
        params: manifest_params(opts),
        calibration: Some(calib_info.clone()),
        allocation: opts.allocation.clone(),
    };
    if let (Some(wd), None) = (&opts.work_dir, &job) {
        Job::new(
            inputs.clone(),
            nlayers,
            base.source.clone(),
            base.method.clone(),
            base.params.clone(),
            calib_info.clone(),
            base.allocation.clone(),
        )
        .write(wd)?;
    }

    // Without a work directory, layers stream straight into the output.
    let mut direct = match &opts.work_dir {
        None => Some(Output::begin(
            format,
            ck,
            &opts.output,
            opts.force,
            &planned,
        )?),
        Some(_) => None,
    };
    let shared = LayerShared {
        gpu,
        ck,
        gptq: opts.gptq,
        rht: opts.rht,
        seed: opts.calib.seed,
        len,
        hessians_on: opts.calib.hessians_on,
        // Without saved Hessians the layers run in turn and a group's matrices spread over
        // the adapters; with them whole layers do (each worker alone on its adapter).
        helpers: if hessians.is_none() { gpus } else { &[] },
    };
    let total_matrices = todo.len() * 7;
    let mut done = 0;
    let mut layers = Vec::new();
    let mut shard_bits = 0u64;
    let mut shard_params = 0usize;
    let mut devices: Vec<DeviceUse> = gpus.iter().map(|g| DeviceUse::new(g.label())).collect();
    // Layers an earlier run finished count as they are; the rest are computed below.
    let mut pending = Vec::new();
    for l in todo.clone() {
        let Some(s) = finished_layers.remove(&l) else {
            pending.push(l);
            continue;
        };
        done += 7;
        shard_bits += s.entries.iter().map(|(_, e)| e.stored_bits).sum::<u64>();
        shard_params += s
            .entries
            .iter()
            .map(|(_, e)| e.rows * e.cols)
            .sum::<usize>();
        layers.push(LayerReport {
            layer: l,
            seconds: Some(s.seconds),
            device: s.device,
            matrices: s.reports,
        });
    }
    let mut layers_done = layers.len();
    // A finished layer: counted, written (work directory or output), reported.
    let mut consume = |l: usize,
                       result: LayerResult,
                       seconds: f64,
                       device: usize,
                       progress: &mut dyn FnMut(&Event)|
     -> Result<()> {
        stages.hessians += result.hessian_s;
        stages.quantization += result.quantize_s;
        stages.propagation += (seconds - result.hessian_s - result.quantize_s).max(0.0);
        // With a group's matrices spread, the first adapter ran the layer and every adapter
        // some of its matrices.
        for (d, &(n, s)) in result.helper_work.iter().enumerate().skip(1) {
            devices[d].matrices += n;
            devices[d].seconds += s;
        }
        if let Some(&(n, _)) = result.helper_work.first() {
            devices[device].matrices += n;
        }
        let t_write = Instant::now();
        let layer = result.into_layer(l, seconds, Some(gpus[device].label()));
        devices[device].layers.push(l);
        devices[device].seconds += seconds;
        ck.release_layer(l);
        shard_bits += layer
            .matrices
            .iter()
            .map(|m| m.entry.stored_bits)
            .sum::<u64>();
        shard_params += layer
            .matrices
            .iter()
            .map(|m| m.entry.rows * m.entry.cols)
            .sum::<usize>();
        match (&opts.work_dir, &mut direct) {
            (Some(wd), _) => {
                StoredLayer::write(&layer, wd, &fp)?;
                if hessians.is_none() {
                    let batches = xs
                        .iter()
                        .map(|x| Ok((x.rows(), x.to_f32(gpu)?)))
                        .collect::<Result<Vec<_>>>()?;
                    Activations {
                        layers_done: l + 1,
                        len,
                        cols: cfg.hidden_size,
                        batches,
                    }
                    .write(wd, &fp)?;
                }
            }
            (None, Some(w)) => w.layer(ck, &layer)?,
            (None, None) => unreachable!("direct output exists without a work dir"),
        }
        stages.writing += t_write.elapsed().as_secs_f64();
        layers_done += 1;
        progress(&Event::Layer {
            layer: l,
            done: layers_done,
            total: todo.len(),
            seconds,
        });
        layers.push(LayerReport {
            layer: l,
            seconds: Some(seconds),
            device: layer.device,
            matrices: layer.reports,
        });
        Ok(())
    };
    // A stop request's error says what is kept (`at`: the layer being computed, if one).
    let stopped = |e: Error, at: Option<usize>| {
        let at = at.map(|l| format!(" during layer {l}")).unwrap_or_default();
        match e {
            Error::Interrupted(_) => Error::Interrupted(match &opts.work_dir {
                Some(wd) => format!(
                    "stopped{at}; finished layers are kept in {} (continue with --resume)",
                    wd.display()
                ),
                None => format!(
                    "stopped{at}; nothing was written (--work-dir DIR makes a run resumable)"
                ),
            }),
            e => e,
        }
    };
    match &hessians {
        Some((d, info, _)) if gpus.len() > 1 => spread_layers(
            gpus,
            &shared,
            opts,
            &pending,
            &SavedHessians {
                dir: d,
                source_sha256: &info.source.sha256,
            },
            done,
            total_matrices,
            progress,
            &mut |f: Finished, progress: &mut dyn FnMut(&Event)| {
                consume(f.layer, f.result, f.seconds, f.device, progress)
            },
        )
        .map_err(|e| stopped(e, None))?,
        _ => {
            for &l in &pending {
                crate::interrupt::check("").map_err(|e| stopped(e, Some(l)))?;
                let t0 = Instant::now();
                let recipe = opts.recipe(l);
                let input = match &hessians {
                    Some((d, info, _)) => {
                        LayerInput::Hessians(LayerHessians::read(d, l, &info.source.sha256)?)
                    }
                    None => LayerInput::Activations {
                        engine: engine.as_ref().expect("no saved Hessians: an engine"),
                        xs: &xs,
                        pos: pos.as_ref().expect("a calibration gives positions"),
                    },
                };
                let result = compress_layer(
                    &shared,
                    l,
                    &recipe,
                    input,
                    &mut done,
                    total_matrices,
                    progress,
                )
                .map_err(|e| stopped(e, Some(l)))?;
                consume(l, result, t0.elapsed().as_secs_f64(), 0, progress)?;
            }
        }
    }
    layers.sort_by_key(|r| r.layer);
    drop(xs);

    if let (Some((i, n)), Some(wd)) = (opts.shard, &opts.work_dir) {
        return Ok(CompressSummary {
            output: wd.display().to_string(),
            method: base.method,
            source_bytes: ck.bytes_on_disk(),
            output_bytes: shard_bits / 8,
            parameters: shard_params,
            bits_per_parameter: shard_bits as f64 / shard_params.max(1) as f64,
            linear_bits_per_parameter: shard_bits as f64 / shard_params.max(1) as f64,
            seconds: start.elapsed().as_secs_f64(),
            stages,
            calibration: calib_info,
            layers,
            shard: Some(format!("{i}/{n}: layers {}..{}", todo.start, todo.end)),
            peak_rss_bytes: peak_rss_bytes(),
            peak_gpu_bytes: gpu.memory().peak_bytes,
            kernels: gpu.profile(),
            devices,
        });
    }
    let t_write = Instant::now();
    let w = match (direct, &opts.work_dir) {
        (Some(w), _) => w,
        (None, Some(wd)) => {
            let mut w = Output::begin(format, ck, &opts.output, force, &planned)?;
            for l in 0..nlayers {
                w.layer(ck, &StoredLayer::read(wd, l, &fp)?.1)?;
            }
            w
        }
        (None, None) => unreachable!("one of the two outputs exists"),
    };
    progress(&Event::Writing);
    let written = w.finish_then(ck, base, &mut |tmp| match &opts.work_dir {
        Some(wd) => outdir::record_output(wd, &fp, tmp),
        None => Ok(()),
    })?;
    stages.writing += t_write.elapsed().as_secs_f64();
    Ok(CompressSummary {
        output: opts.output.display().to_string(),
        method: opts.method.name().into(),
        source_bytes: ck.bytes_on_disk(),
        output_bytes: written.bytes(),
        parameters: written.total.parameters,
        bits_per_parameter: written.total.bits_per_parameter,
        linear_bits_per_parameter: written.linear.bits_per_parameter,
        seconds: start.elapsed().as_secs_f64(),
        stages,
        calibration: calib_info,
        layers,
        shard: None,
        peak_rss_bytes: peak_rss_bytes(),
        peak_gpu_bytes: gpu.memory().peak_bytes,
        kernels: gpu.profile(),
        devices,
    })
}
