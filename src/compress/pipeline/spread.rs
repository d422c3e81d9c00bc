//! Several adapters at once (`--devices`). Layers compressed from saved Hessians are
//! independent, so each adapter gets a worker thread that takes the next layer as soon as it
//! is free. The host is an async task on a tokio runtime: it feeds the work queue, forwards the
//! workers' progress, and hands finished layers to the caller in layer order (so the output is
//! written exactly as a one-adapter run writes it). At most `window` layers are handed out and
//! not yet written, which bounds memory when one adapter is slower than the others.
//!
//! A layer that fails on one adapter (a lost device, a driver error) is given to another and
//! that adapter retires; the run fails when a layer fails twice, when no adapter is left, on a
//! stop request (SIGINT), or when writing fails. Workers finish the layer they hold, then stop.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, Mutex};

use crate::compress::hessdir::LayerHessians;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

use super::layer::{compress_layer, LayerInput, LayerResult, LayerShared};
use super::options::{CompressOptions, Event};

/// A layer one adapter finished.
pub(crate) struct Finished {
    pub layer: usize,
    /// Index into the adapters given to [`spread_layers`].
    pub device: usize,
    pub result: LayerResult,
    /// Wall seconds on its adapter (reading its Hessians included).
    pub seconds: f64,
}

enum Msg {
    Event(Event),
    Done(Finished),
    Failed {
        layer: usize,
        device: usize,
        error: Error,
    },
}

/// What receives each finished layer (and may report progress).
pub(crate) type Consume<'a> = dyn FnMut(Finished, &mut dyn FnMut(&Event)) -> Result<()> + 'a;

/// Where the layers' Hessians are: the directory and the source model's sha256.
pub(crate) struct SavedHessians<'a> {
    pub dir: &'a Path,
    pub source_sha256: &'a str,
}

/// Compress `layers` from saved Hessians on every adapter of `gpus` at once. `template` is
/// the settings every layer shares (its `gpu` is replaced by each worker's). `progress` sees
/// every event, matrices counted from `done` of `total`; `consume` receives each finished
/// layer, in the order of `layers`, on the calling thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spread_layers(
    gpus: &[&Gpu],
    template: &LayerShared<'_>,
    opts: &CompressOptions,
    layers: &[usize],
    hessians: &SavedHessians<'_>,
    mut done: usize,
    total: usize,
    progress: &mut dyn FnMut(&Event),
    consume: &mut Consume<'_>,
) -> Result<()> {
    if layers.is_empty() {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| Error::Gpu {
            op: "starting the host's runtime".into(),
            msg: e.to_string(),
        })?;
    let window = (2 * gpus.len()).max(1);
    let (work_tx, work_rx) = mpsc::unbounded_channel::<usize>();
    let work_rx = Mutex::new(work_rx);
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let stop = AtomicBool::new(false);

    std::thread::scope(|s| -> Result<()> {
        for (d, &gpu) in gpus.iter().enumerate() {
            let (tx, work_rx, stop, handle) = (tx.clone(), &work_rx, &stop, rt.handle().clone());
            let sh = LayerShared { gpu, ..*template };
            let worker = move || loop {
                let next = handle.block_on(async { work_rx.lock().await.recv().await });
                let Some(l) = next else { break };
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t0 = Instant::now();
                let mut local_done = 0;
                let r =
                    LayerHessians::read(hessians.dir, l, hessians.source_sha256).and_then(|lh| {
                        compress_layer(
                            &sh,
                            l,
                            &opts.recipe(l),
                            LayerInput::Hessians(lh),
                            &mut local_done,
                            total,
                            &mut |e: &Event| {
                                let _ = tx.send(Msg::Event(e.clone()));
                            },
                        )
                    });
                let msg = match r {
                    Ok(result) => Msg::Done(Finished {
                        layer: l,
                        device: d,
                        result,
                        seconds: t0.elapsed().as_secs_f64(),
                    }),
                    Err(error) => Msg::Failed {
                        layer: l,
                        device: d,
                        error,
                    },
                };
                let failed = matches!(msg, Msg::Failed { .. });
                if tx.send(msg).is_err() || failed {
                    break;
                }
            };
            std::thread::Builder::new()
                .name(format!("pumice-device-{d}"))
                .spawn_scoped(s, worker)
                .map_err(|e| Error::Gpu {
                    op: "starting a device thread".into(),
                    msg: e.to_string(),
                })?;
        }
        drop(tx);

        // The host: feed, forward, write in order.
        rt.block_on(async {
            let mut sent = 0;
            let mut work_tx = Some(work_tx);
            let feed = |sent: &mut usize, upto: usize, w: &Option<mpsc::UnboundedSender<usize>>| {
                while *sent < upto.min(layers.len()) {
                    if let Some(w) = w {
                        let _ = w.send(layers[*sent]);
                    }
                    *sent += 1;
                }
            };
            feed(&mut sent, window, &work_tx);
            let mut next = 0;
            let mut ready: BTreeMap<usize, Finished> = BTreeMap::new();
            let mut retried: Vec<usize> = Vec::new();
            let mut live = gpus.len();
            let mut first_error: Option<Error> = None;
            while let Some(msg) = rx.recv().await {
                if first_error.is_some() {
                    continue; // draining: workers finish the layer they hold
                }
                match msg {
                    Msg::Event(Event::Matrix {
                        layer,
                        name,
                        total,
                        relative_error,
                        ..
                    }) => {
                        done += 1;
                        progress(&Event::Matrix {
                            layer,
                            name,
                            done,
                            total,
                            relative_error,
                        });
                    }
                    Msg::Event(e) => progress(&e),
                    Msg::Done(f) => {
                        ready.insert(f.layer, f);
                        while next < layers.len() {
                            let Some(f) = ready.remove(&layers[next]) else {
                                break;
                            };
                            if let Err(e) = consume(f, progress) {
                                first_error = Some(e);
                                break;
                            }
                            next += 1;
                            feed(&mut sent, next + window, &work_tx);
                        }
                    }
                    Msg::Failed {
                        layer,
                        device,
                        error,
                    } => {
                        live -= 1;
                        let retry = !matches!(error, Error::Interrupted(_))
                            && live > 0
                            && !retried.contains(&layer);
                        if retry {
                            progress(&Event::Note(format!(
                                "layer {layer} failed on {} ({error}); it goes to another adapter and this one retires",
                                gpus[device].label()
                            )));
                            retried.push(layer);
                            if let Some(w) = &work_tx {
                                let _ = w.send(layer);
                            }
                        } else {
                            first_error = Some(error);
                        }
                    }
                }
                if first_error.is_some() {
                    stop.store(true, Ordering::Relaxed);
                    work_tx = None;
                } else if next == layers.len() {
                    work_tx = None; // every layer written: the workers' queue closes
                }
            }
            match first_error {
                Some(e) => Err(e),
                None if next < layers.len() => Err(Error::Gpu {
                    op: format!("compressing layer {}", layers[next]),
                    msg: "no adapter is left".into(),
                }),
                None => Ok(()),
            }
        })
    })
}
