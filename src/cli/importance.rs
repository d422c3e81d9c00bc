//! `pumice importance`: per-layer importance and sensitivity.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use pumice::gpu::GpuOptions;
use pumice::model::Checkpoint;

use super::args::*;
use super::progress;

#[derive(Args, Debug)]
pub(crate) struct ImportanceArgs {
    /// Model directory (Hugging Face layout).
    pub(crate) model: PathBuf,
    /// Calibration text: files, or directories of .txt files. Without it, the model samples
    /// its own sequences.
    #[arg(long, num_args = 1..)]
    pub(crate) calib: Vec<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 32)]
    pub(crate) calib_samples: usize,
    /// Tokens per calibration sequence (capped at the model's context).
    #[arg(long, default_value_t = 256)]
    pub(crate) calib_len: usize,
    /// Seed for drawing or sampling calibration sequences.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Tokenize text files byte for byte, keeping CRLF and lone CR (llama.cpp's way). By
    /// default text is read as Python's text mode reads it: CRLF and lone CR become LF.
    #[arg(long)]
    pub(crate) raw_text: bool,
    /// Size k of the top-k token sets (1–64).
    #[arg(long, default_value_t = 10)]
    pub(crate) top_k: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub(crate) batch: usize,
    /// Options whose sensitivity is measured, comma-separated: caldera-BPW (Q 2-bit midrise
    /// g64, rank from the budget), gptq-BITS-gGROUP, rtn-BITS-gGROUP, gptq-TYPE for a ggml
    /// type's grid (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, q4_0, q4_1, q5_0, q5_1, q8_0),
    /// caldera-TYPE-rRANK
    /// for CALDERA with Q on such a grid and a fixed rank.
    #[arg(long, default_value = pumice::budget::candidates::DEFAULT_CANDIDATES)]
    pub(crate) options: String,
    /// Importance only; skip the (slower) sensitivity sweep.
    #[arg(long)]
    pub(crate) no_sensitivity: bool,
    /// Turn incoherence processing off for the measured options.
    #[arg(long)]
    pub(crate) no_rht: bool,
    /// CALDERA options: outer iterations.
    #[arg(long, default_value_t = 15)]
    pub(crate) outer_iters: usize,
    /// CALDERA options: L/R refinement rounds per outer iteration.
    #[arg(long, default_value_t = 10)]
    pub(crate) inner_iters: usize,
    /// Write the measurement file here (JSON; written to a temporary name, then renamed).
    #[arg(short, long)]
    pub(crate) output: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(gpu_opts: &GpuOptions, a: ImportanceArgs) -> anyhow::Result<()> {
    use pumice::budget::candidates::Candidate;
    use pumice::budget::measure::{measure_model, MeasureOptions, MeasureStage};
    use pumice::compress::calib::CalibOptions;

    let ck = Checkpoint::open(&a.model)?;
    let opts = MeasureOptions {
        calib: a.calib.clone(),
        calib_opts: CalibOptions {
            samples: a.calib_samples,
            len: a.calib_len,
            seed: a.seed,
            hessians_on: pumice::lowrank::fit::Placement::Auto,
            newlines: newlines(a.raw_text),
        },
        top_k: a.top_k,
        batch: a.batch,
        candidates: if a.no_sensitivity {
            Vec::new()
        } else {
            Candidate::parse_list(&a.options)?
        },
        outer_iters: a.outer_iters,
        inner_iters: a.inner_iters,
        rht: !a.no_rht,
    };
    opts.check()?;
    let gpu = super::setup::open_gpu(gpu_opts)?;
    eprintln!(
        "measuring layer importance of {} on {}",
        a.model.display(),
        gpu.describe()
    );
    // One progress bar per stage, made when the stage starts.
    let mut bar: Option<(MeasureStage, progress::Progress)> = None;
    let m = measure_model(&gpu, &ck, &a.model, &opts, &mut |stage, done, total| {
        if bar.as_ref().map(|(s, _)| *s) != Some(stage) {
            if let Some((_, mut b)) = bar.take() {
                b.finish();
            }
            let (name, unit) = match stage {
                MeasureStage::SelfCalibration => (
                    "calibration (self-generated: sampling from the model)",
                    "sequences",
                ),
                MeasureStage::Importance => ("importance", "sequences"),
                MeasureStage::Sensitivity => ("sensitivity", "layer options"),
            };
            bar = Some((stage, progress::Progress::new(name, total as u64, unit)));
        }
        if let Some((_, b)) = bar.as_mut() {
            b.set(done as u64);
        }
    })?;
    if let Some((_, mut b)) = bar.take() {
        b.finish();
    }
    if let Some(path) = &a.output {
        m.write(path)?;
        eprintln!("wrote {}", path.display());
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&m)?)?;
    } else {
        write!(out, "layer  jaccard  importance")?;
        for o in &m.options {
            write!(out, "  {o:>14}")?;
        }
        writeln!(out)?;
        for l in &m.layers {
            write!(
                out,
                "{:>5}  {:>7.4}  {:>10.4}",
                l.layer, l.jaccard, l.importance
            )?;
            for r in &l.sensitivity {
                write!(out, "  {:>14.5}", r.kl)?;
            }
            writeln!(out)?;
        }
        if !m.options.is_empty() {
            write!(out, "bits/param         ")?;
            for r in &m.layers[0].sensitivity {
                write!(out, "  {:>14.3}", r.bits as f64 / m.layer_params as f64)?;
            }
            writeln!(out)?;
            writeln!(
                out,
                "(importance: 1 − top-{} Jaccard; option columns: KL(original ‖ only that layer compressed), nats/token)",
                a.top_k
            )?;
        }
    }
    Ok(())
}
