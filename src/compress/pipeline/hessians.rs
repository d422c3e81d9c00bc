//! `collect_hessians`: the calibration pass alone, saving every layer's Hessians.

use std::path::Path;
use std::time::Instant;

use crate::base::outdir;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::compressed::CalibInfo;
use crate::model::{Checkpoint, InputGroup};

use crate::compress::calib::CalibOptions;
use crate::compress::hessdir::{hessian_file, HessiansInfo, LayerHessians};

use super::{job::*, layer::*, options::*, output::*};

/// What `pumice hessians` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct HessiansSummary {
    pub output: String,
    pub layers: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub calibration: CalibInfo,
    /// The adapters and how many calibration sequences each ran.
    pub devices: Vec<HessianDevice>,
}

/// One adapter's share of a Hessian collection.
#[derive(Clone, Debug, Serialize)]
pub struct HessianDevice {
    /// "name (backend)".
    pub adapter: String,
    pub sequences: usize,
}

/// The calibration pass alone: every layer's Hessians from the *original* model's activations,
/// saved in `out` (for `compress --hessians`, which can then run layers on separate machines).
pub fn collect_hessians(
    gpu: &Gpu,
    ck: &Checkpoint,
    source: &CalibSource,
    calib_opts: &CalibOptions,
    out: &Path,
    force: bool,
    progress: &mut dyn FnMut(&Event),
) -> Result<HessiansSummary> {
    collect_hessians_on(&[gpu], ck, source, calib_opts, out, force, progress)
}

/// One layer's Hessians from one adapter's share of the sequences: (input, n, H) per group.
type Groups = Vec<(InputGroup, usize, Vec<f64>)>;

/// [`collect_hessians`] on several adapters at once: the first samples or reads the
/// calibration; the sequences are then split into contiguous shares, one per adapter, each
/// running every layer over its share on its own thread; per layer the adapters' Hessians are
/// summed in adapter order (f64), so the same adapters give the same bytes. At most one
/// layer per adapter waits to be summed.
pub fn collect_hessians_on(
    gpus: &[&Gpu],
    ck: &Checkpoint,
    source: &CalibSource,
    calib_opts: &CalibOptions,
    out: &Path,
    force: bool,
    progress: &mut dyn FnMut(&Event),
) -> Result<HessiansSummary> {
    let start = Instant::now();
    let Some(&gpu) = gpus.first() else {
        return Err(Error::InvalidArgument(
            "no adapter to collect Hessians on".into(),
        ));
    };
    if ck.manifest().is_some() {
        return Err(Error::InvalidArgument(format!(
            "{} is a compressed checkpoint; collect Hessians of the original model",
            ck.dir().display()
        )));
    }
    outdir::check_output(ck.dir(), out, force)?;
    let len = calib_opts
        .len
        .min(ck.config().max_position_embeddings)
        .max(2);
    let copts = CalibOptions {
        len,
        ..calib_opts.clone()
    };
    let info = source_info(ck)?;
    let c = {
        let mut engine = streaming_engine(gpu, ck, len)?;
        calibrate(&mut engine, source, &copts, progress)?
    };
    let nseq = c.tokens.len() / len;
    // Each adapter's share of the sequences (an adapter left without any is not used).
    let shares: Vec<std::ops::Range<usize>> = (0..gpus.len())
        .map(|d| shard_layers(nseq, d, gpus.len()))
        .collect();
    let tmp = outdir::begin(out)?;
    let nlayers = ck.arch().layers.len();
    let mut bytes = 0u64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|s| -> Result<()> {
        let mut rxs = Vec::new();
        for (d, &g) in gpus.iter().enumerate() {
            let share = shares[d].clone();
            if share.is_empty() {
                continue;
            }
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Groups>>(1);
            rxs.push(rx);
            let (tokens, stop) = (&c.tokens, &stop);
            let work = move |tx: &std::sync::mpsc::SyncSender<Result<Groups>>| -> Result<()> {
                let engine = streaming_engine(g, ck, len)?;
                let CalibBatches { xs, pos, .. } =
                    calibration_batches(&engine, &tokens[share.start * len..share.end * len], len)?;
                for l in 0..nlayers {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let spec = &ck.arch().layers[l];
                    let mut w = engine.read_layer(l)?;
                    let mut groups = Groups::new();
                    run_layer_stages(&engine, &mut w, &xs, len, &pos, &mut |kinds, inputs, _| {
                        let lin = spec.linear(kinds[0]);
                        let n = lin.in_features;
                        groups.push((
                            lin.kind.input(),
                            n,
                            accumulate_hessian(g, n, inputs, calib_opts.hessians_on)?,
                        ));
                        Ok(())
                    })?;
                    if tx.send(Ok(groups)).is_err() {
                        break;
                    }
                }
                Ok(())
            };
            std::thread::Builder::new()
                .name(format!("pumice-hessians-{d}"))
                .spawn_scoped(s, move || {
                    // A failure is the adapter's next message (the host stops at it).
                    if let Err(e) = work(&tx) {
                        let _ = tx.send(Err(e));
                    }
                })
                .map_err(|e| Error::Gpu {
                    op: "starting a device thread".into(),
                    msg: e.to_string(),
                })?;
        }
        let mut run = || -> Result<()> {
            for l in 0..nlayers {
                let t0 = Instant::now();
                let mut lh = LayerHessians::default();
                for rx in &rxs {
                    let groups = rx.recv().map_err(|_| Error::Gpu {
                        op: format!("collecting the Hessians of layer {l}"),
                        msg: "an adapter's thread ended early".into(),
                    })??;
                    if lh.groups.is_empty() {
                        lh.groups = groups;
                    } else {
                        for ((_, _, acc), (_, _, h)) in lh.groups.iter_mut().zip(groups) {
                            acc.iter_mut().zip(h).for_each(|(a, b)| *a += b);
                        }
                    }
                }
                lh.write(&tmp.path, l, &info.sha256)?;
                ck.release_layer(l);
                bytes += std::fs::metadata(hessian_file(&tmp.path, l))
                    .map(|m| m.len())
                    .unwrap_or(0);
                crate::interrupt::check("stopped while collecting Hessians; nothing was written")?;
                progress(&Event::Layer {
                    layer: l,
                    done: l + 1,
                    total: nlayers,
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
            Ok(())
        };
        let r = run();
        // Stop the adapters' threads (they end after their current layer) and drop the
        // receivers so none waits to send.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(rxs);
        r
    });
    result?;
    HessiansInfo::new(info, c.info.clone(), nlayers).write(&tmp.path)?;
    outdir::commit(tmp, out, force)?;
    Ok(HessiansSummary {
        output: out.display().to_string(),
        layers: nlayers,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
        calibration: c.info,
        devices: gpus
            .iter()
            .zip(&shares)
            .map(|(g, r)| HessianDevice {
                adapter: g.label(),
                sequences: r.len(),
            })
            .collect(),
    })
}
