//! `merge`: assemble a work directory whose layers are all finished into a checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::base::outdir;
use crate::error::{Error, Result};
use crate::format::{FormatKind, JobInfo, Output};
use crate::model::compressed::LayerReport;
use crate::model::Checkpoint;

use crate::compress::workdir::{layer_file, Job, StoredLayer};

use super::{checks::*, options::*, output::*};

/// Assemble the compressed checkpoint from a work directory whose layers are all finished
/// (by one run or by shards on several machines). `model` overrides the source path the job
/// recorded; the source must be the same model (checked by SHA-256). `format` is the output's
/// (any: the work directory holds format-neutral layers), `dtype` that of a dense output.
pub fn merge(
    work_dir: &Path,
    model: Option<&Path>,
    output: &Path,
    force: bool,
    format: FormatKind,
    dtype: Option<crate::format::StoreType>,
    progress: &mut dyn FnMut(&Event),
) -> Result<CompressSummary> {
    let start = Instant::now();
    let job = Job::read(work_dir)?.ok_or_else(|| {
        Error::work_dir(
            work_dir,
            "is not a work directory (no job.json): run `pumice compress ... --work-dir` first",
        )
    })?;
    let src = model
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(&job.source.path));
    let ck = Checkpoint::open(&src)?;
    outdir::check_output_apart(output, &[("work directory", work_dir)])?;
    outdir::check_output(ck.dir(), output, force)?;
    let nlayers = ck.arch().layers.len();
    if nlayers != job.layers {
        return Err(Error::work_dir(
            work_dir,
            format!(
                "the job has {} layers but {} has {nlayers}",
                job.layers,
                src.display()
            ),
        ));
    }
    let missing: Vec<String> = (0..nlayers)
        .filter(|&l| !layer_file(work_dir, l).exists())
        .map(|l| l.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::work_dir(
            work_dir,
            format!(
                "layers {} are not finished (their shards are still running or failed; rerun them with --resume)",
                missing.join(", ")
            ),
        ));
    }
    let source = source_info(&ck)?;
    if job.inputs.get("source_sha256") != Some(&source.sha256) {
        return Err(Error::work_dir(
            work_dir,
            format!(
                "was made from another model than {} (SHA-256 differs)",
                src.display()
            ),
        ));
    }
    let headers = (0..nlayers)
        .map(|l| {
            let s = StoredLayer::read_header(work_dir, l, &job.fingerprint)?;
            check_stored_layer(&ck, work_dir, &s)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let planned: Vec<Vec<_>> = headers.iter().map(|s| s.entries.clone()).collect();
    let format = format.make(dtype, ck.dtype())?;
    format.check(&ck, &planned)?;
    let mut w = Output::begin(format.as_ref(), &ck, output, force, &planned)?;
    for (l, header) in headers.iter().enumerate() {
        let (s, layer) = StoredLayer::read(work_dir, l, &job.fingerprint)?;
        if s.tensors != header.tensors || s.entries != header.entries {
            return Err(Error::work_dir(
                layer_file(work_dir, l),
                "changed while being merged",
            ));
        }
        w.layer(&ck, &layer)?;
        crate::interrupt::check("stopped while merging; nothing was written")?;
    }
    progress(&Event::Writing);
    let info = JobInfo {
        source: job.source.clone(),
        method: job.method.clone(),
        params: job.params.clone(),
        calibration: Some(job.calibration.clone()),
        allocation: job.allocation.clone(),
    };
    let written = w.finish(&ck, info)?;
    // Which adapter computed which layers, as the shards recorded.
    let mut devices: Vec<DeviceUse> = Vec::new();
    for s in &headers {
        let Some(name) = &s.device else { continue };
        let at = match devices.iter().position(|d| &d.adapter == name) {
            Some(i) => i,
            None => {
                devices.push(DeviceUse::new(name.clone()));
                devices.len() - 1
            }
        };
        devices[at].layers.push(s.layer);
        devices[at].seconds += s.seconds;
    }
    Ok(CompressSummary {
        output: output.display().to_string(),
        method: job.method.clone(),
        source_bytes: ck.bytes_on_disk(),
        output_bytes: written.bytes(),
        parameters: written.total.parameters,
        bits_per_parameter: written.total.bits_per_parameter,
        linear_bits_per_parameter: written.linear.bits_per_parameter,
        seconds: start.elapsed().as_secs_f64(),
        // A merge only writes.
        stages: StageTimes {
            writing: start.elapsed().as_secs_f64(),
            ..Default::default()
        },
        calibration: job.calibration,
        layers: headers
            .into_iter()
            .map(|s| LayerReport {
                layer: s.layer,
                seconds: Some(s.seconds),
                device: s.device,
                matrices: s.reports,
            })
            .collect(),
        shard: None,
        peak_rss_bytes: peak_rss_bytes(),
        peak_gpu_bytes: 0,
        // A merge opens no GPU.
        kernels: Default::default(),
        devices,
    })
}
