//! `collect_hessians`: the calibration pass alone, saving every layer's Hessians.

use std::path::Path;
use std::time::Instant;

use crate::base::outdir;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::compressed::CalibInfo;
use crate::model::Checkpoint;

use crate::compress::calib::CalibOptions;
use crate::compress::workdir::{hessian_file, HessiansInfo, LayerHessians};

use super::{job::*, layer::*, options::*, output::*};

/// What `pumice hessians` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct HessiansSummary {
    pub output: String,
    pub layers: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub calibration: CalibInfo,
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
    let start = Instant::now();
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
    let mut engine = streaming_engine(gpu, ck, len)?;
    let c = calibrate(&mut engine, source, &copts, progress)?;
    let CalibBatches { xs, pos, .. } = calibration_batches(&engine, &c.tokens, len)?;
    let tmp = outdir::begin(out)?;
    let nlayers = ck.arch().layers.len();
    let mut bytes = 0u64;
    for l in 0..nlayers {
        let t0 = Instant::now();
        let spec = &ck.arch().layers[l];
        let mut w = engine.read_layer(l)?;
        let mut lh = LayerHessians::default();
        run_layer_stages(&engine, &mut w, &xs, len, &pos, &mut |kinds, inputs, _| {
            let lin = spec.linear(kinds[0]);
            let n = lin.in_features;
            lh.groups
                .push((lin.kind.input(), n, accumulate_hessian(gpu, n, inputs)?));
            Ok(())
        })?;
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
    HessiansInfo::new(info, c.info.clone(), nlayers).write(&tmp.path)?;
    outdir::commit(tmp, out, force)?;
    Ok(HessiansSummary {
        output: out.display().to_string(),
        layers: nlayers,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
        calibration: c.info,
    })
}
