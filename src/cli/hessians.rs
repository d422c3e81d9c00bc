//! `pumice hessians`: the calibration pass alone.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use pumice::gpu::GpuOptions;
use pumice::model::Checkpoint;

use super::args::*;
use super::progress;

#[derive(Args, Debug)]
pub(crate) struct HessiansArgs {
    /// Model directory (Hugging Face layout).
    pub(crate) model: PathBuf,
    /// Output directory (written to a temporary name and renamed when complete).
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    #[command(flatten)]
    pub(crate) cal: CalibArgs,
    /// Replace the output directory if it exists (never the input).
    #[arg(long)]
    pub(crate) force: bool,
    /// JSON lines on stdout (implied when stdout is not a terminal).
    #[arg(long)]
    pub(crate) json: bool,
    /// Several adapters at once (`all`, or indices/names as `pumice devices` lists them): the
    /// calibration sequences are split among them and their Hessians summed. Overrides
    /// --adapter.
    #[arg(long, value_parser = super::compress::parse_devices)]
    pub(crate) devices: Option<pumice::gpu::DeviceSet>,
}

pub(crate) fn run(gpu_opts: &GpuOptions, a: HessiansArgs) -> anyhow::Result<()> {
    use pumice::compress::pipeline::{collect_hessians_on, Event};
    let mut rep = progress::Reporter::new(a.json);
    let ck = Checkpoint::open(&a.model)?;
    let (source, copts) = (a.cal.source(), a.cal.options(&ck)?);
    let gpus = super::setup::open_gpus(gpu_opts, a.devices.as_ref())?;
    let names: Vec<String> = gpus.iter().map(|g| g.describe()).collect();
    eprintln!(
        "collecting Hessians of {} on {}",
        a.model.display(),
        names.join(" + ")
    );
    rep.emit(
        "start",
        serde_json::json!({"command": "hessians", "model": a.model.display().to_string(), "adapter": names[0], "adapters": names}),
    );
    let gpu_refs: Vec<&pumice::gpu::Gpu> = gpus.iter().collect();
    let s = collect_hessians_on(
        &gpu_refs,
        &ck,
        &source,
        &copts,
        &a.output,
        a.force,
        &mut |e: &Event| rep.on(e),
    )?;
    rep.conclude(serde_json::to_value(&s)?, || {
        writeln!(
            std::io::stdout(),
            "wrote {}: Hessians of {} layers ({:.1} MiB) from {} sequences of {} tokens in {:.1} s",
            s.output,
            s.layers,
            s.bytes as f64 / (1u64 << 20) as f64,
            s.calibration.samples,
            s.calibration.len,
            s.seconds
        )
    })?;
    Ok(())
}
