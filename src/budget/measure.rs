//! `pumice importance` as a library call: calibrate, LSAQ importance of every layer, the
//! sensitivity sweep over candidate options, assembled into a [`Measurement`].

use std::path::{Path, PathBuf};

use crate::budget::candidates::Candidate;
use crate::budget::importance::lsaq;
use crate::budget::measurement::{
    LayerImportanceRecord, Measurement, MEASUREMENT_FORMAT, MEASUREMENT_VERSION,
};
use crate::budget::sensitivity::{measure, SensitivityOptions};
use crate::compress::calib::{self, CalibOptions};
use crate::compress::pipeline::CalderaSettings;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::infer::{Engine, EngineOptions};
use crate::model::{Checkpoint, Tokenizer};

/// What to measure.
#[derive(Clone, Debug)]
pub struct MeasureOptions {
    /// Calibration text files or directories; empty: the model samples its own sequences.
    pub calib: Vec<PathBuf>,
    /// Calibration (its length is capped at the model's context).
    pub calib_opts: CalibOptions,
    /// Size k of the top-k token sets.
    pub top_k: usize,
    /// Sequences per forward pass.
    pub batch: usize,
    /// Options whose sensitivity is measured (none: importance only).
    pub candidates: Vec<Candidate>,
    /// CALDERA iterations for CALDERA candidates.
    pub outer_iters: usize,
    pub inner_iters: usize,
    /// Incoherence processing for the measured options.
    pub rht: bool,
}

impl MeasureOptions {
    /// Refuse options that cannot measure anything (callers run this before opening a GPU).
    pub fn check(&self) -> Result<()> {
        if self.calib_opts.samples == 0 {
            return Err(Error::InvalidArgument(
                "--calib-samples must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Progress of a measurement: stage, done, total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeasureStage {
    /// Sampling calibration sequences from the model (sequences).
    SelfCalibration,
    /// LSAQ importance (sequences).
    Importance,
    /// The sensitivity sweep (layer × option pairs).
    Sensitivity,
}

/// Measure every decoder layer of `ck` (recorded as `model` in the file).
pub fn measure_model(
    gpu: &Gpu,
    ck: &Checkpoint,
    model: &Path,
    opts: &MeasureOptions,
    progress: &mut dyn FnMut(MeasureStage, usize, usize),
) -> Result<Measurement> {
    opts.check()?;
    let len = opts
        .calib_opts
        .len
        .min(ck.config().max_position_embeddings)
        .max(2);
    let copts = CalibOptions {
        len,
        ..opts.calib_opts.clone()
    };
    let mut engine = Engine::new(
        gpu,
        ck,
        &EngineOptions {
            max_positions: len,
            ..Default::default()
        },
    )?;
    let calibration = if opts.calib.is_empty() {
        calib::self_generated(&mut engine, &copts, &mut |d, t| {
            progress(MeasureStage::SelfCalibration, d, t)
        })?
    } else {
        let tok = Tokenizer::from_model_dir(ck.dir())?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} has no tokenizer.json to tokenize --calib text",
                model.display()
            ))
        })?;
        calib::from_text(&tok, &opts.calib, &copts)?
    };
    let layers = lsaq(
        &mut engine,
        &calibration.tokens,
        len,
        opts.top_k,
        opts.batch,
        &mut |d, t| progress(MeasureStage::Importance, d, t),
    )?;
    let mut records: Vec<LayerImportanceRecord> =
        layers.iter().map(LayerImportanceRecord::from).collect();
    if !opts.candidates.is_empty() {
        let so = SensitivityOptions {
            candidates: opts.candidates.clone(),
            caldera: CalderaSettings {
                outer_iters: opts.outer_iters.max(1),
                inner_iters: opts.inner_iters.max(1),
                ..Default::default()
            },
            gptq: Default::default(),
            rht: opts.rht,
            seed: opts.calib_opts.seed,
        };
        let rows = measure(&mut engine, &calibration.tokens, len, &so, &mut |p| {
            progress(MeasureStage::Sensitivity, p.done, p.total)
        })?;
        for (r, row) in records.iter_mut().zip(rows) {
            r.sensitivity = row;
        }
    }
    let layer_params: u64 = ck.arch().layers[0]
        .linears
        .iter()
        .map(|l| (l.in_features * l.out_features) as u64)
        .sum();
    Ok(Measurement {
        format: MEASUREMENT_FORMAT.into(),
        format_version: MEASUREMENT_VERSION,
        model: model.display().to_string(),
        top_k: opts.top_k,
        calibration: calibration.info.clone(),
        options: opts.candidates.iter().map(|c| c.name.clone()).collect(),
        rht: opts.rht,
        layer_params,
        layers: records,
    })
}
