//! `pumice merge`: assemble a work directory.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::progress;

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// Work directory the shards wrote (`compress --work-dir`).
    pub(crate) work_dir: PathBuf,
    /// Output directory (written to a temporary name and renamed when complete).
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// The source model, when it is not where the job recorded it (checked by SHA-256).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Output format: pumice (default), dense, compressed-tensors, gptq, gptq-v1, peft, gguf
    /// (see `pumice export`).
    #[arg(long, value_parser = super::args::parse_format, default_value = "pumice")]
    pub(crate) format: pumice::format::FormatKind,
    /// Dtype of a dense output (f32, f16, bf16; default: the model's), or of a GGUF LoRA
    /// adapter's factors (default f32, exact; f16 halves the adapter and q8_0 stores 8.5 bits
    /// per factor weight, both rounding the factors; a q8_0 lora_b whose rank is not a multiple
    /// of 32 is f16).
    #[arg(long, value_parser = super::args::parse_store_type)]
    pub(crate) dtype: Option<pumice::format::StoreType>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub(crate) force: bool,
    /// JSON lines on stdout (implied when stdout is not a terminal).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(a: MergeArgs) -> anyhow::Result<()> {
    use pumice::compress::pipeline::{merge, Event};
    let mut rep = progress::Reporter::new(a.json);
    rep.emit(
        "start",
        serde_json::json!({"command": "merge", "work_dir": a.work_dir.display().to_string()}),
    );
    let s = merge(
        &a.work_dir,
        a.model.as_deref(),
        &a.output,
        a.force,
        a.format,
        a.dtype,
        &mut |e: &Event| rep.on(e),
    )?;
    rep.conclude(serde_json::to_value(&s)?, || {
        writeln!(
            std::io::stdout(),
            "wrote {}: {:.2} MiB, {:.3} bits/parameter overall, {:.3} in the linear layers",
            s.output,
            s.output_bytes as f64 / (1u64 << 20) as f64,
            s.bits_per_parameter,
            s.linear_bits_per_parameter
        )
    })?;
    Ok(())
}
