//! Arguments and parsers several commands share: calibration, numbers with units and
//! ranges, how text is read, token files.

use std::path::PathBuf;

use clap::Args;

/// Where calibration sequences come from (compress, hessians).
#[derive(Args, Debug)]
pub(crate) struct CalibArgs {
    /// Calibration text: files, or directories of .txt files. Without it, the model samples
    /// its own calibration sequences (self-calibration).
    #[arg(long, num_args = 1..)]
    pub(crate) calib: Vec<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    pub(crate) calib_samples: usize,
    /// Tokens per calibration sequence (capped at the model's context). Default: sized to the
    /// model — 64 tokens per feature of its widest linear input over --calib-samples
    /// sequences, a power of two from 256 to 2048 (256 for the asset model, 2048 for models
    /// with inputs of 4096 or more).
    #[arg(long)]
    pub(crate) calib_len: Option<usize>,
    /// Seed for drawing or sampling calibration sequences.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Tokenize text files byte for byte, keeping CRLF and lone CR (llama.cpp's way). By
    /// default text is read as Python's text mode reads it: CRLF and lone CR become LF.
    #[arg(long)]
    pub(crate) raw_text: bool,
    /// Where the Hessians H = Σ XᵀX are accumulated: `auto` (the host's BLAS, in f64, for a CPU
    /// adapter such as lavapipe, where it is several times faster than the emulated GPU; else
    /// the GPU), `gpu` or `host`.
    #[arg(long, default_value = "auto", value_parser = parse_placement)]
    pub(crate) hessians_on: pumice::lowrank::fit::Placement,
}

impl CalibArgs {
    pub(crate) fn source(&self) -> pumice::compress::pipeline::CalibSource {
        use pumice::compress::pipeline::CalibSource;
        if self.calib.is_empty() {
            CalibSource::SelfGenerated
        } else {
            CalibSource::Text(self.calib.clone())
        }
    }

    /// The calibration options for `ck` (its sized length unless --calib-len was given).
    pub(crate) fn options(
        &self,
        ck: &pumice::model::Checkpoint,
    ) -> Result<pumice::compress::calib::CalibOptions, pumice::Error> {
        if self.calib_samples == 0 {
            return Err(pumice::Error::InvalidArgument(
                "--calib-samples must be at least 1".into(),
            ));
        }
        Ok(pumice::compress::calib::CalibOptions {
            samples: self.calib_samples,
            len: self
                .calib_len
                .unwrap_or_else(|| pumice::compress::calib::sized_len(ck, self.calib_samples)),
            seed: self.seed,
            newlines: newlines(self.raw_text),
            hessians_on: self.hessians_on,
        })
    }
}

pub(crate) fn parse_sparsity(s: &str) -> Result<pumice::quant::sparsity::Sparsity, String> {
    pumice::quant::sparsity::Sparsity::parse(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (e.g. 3500000, 512K, 1.5G)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("`{s}` is not a byte count"));
    }
    Ok((v * mult as f64) as u64)
}

pub(crate) fn parse_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

/// --temperature: finite and ≥ 0.
pub(crate) fn parse_temperature(s: &str) -> Result<f32, String> {
    let v = parse_f64(s)?;
    if !(0.0..=1e6).contains(&v) {
        return Err(format!("{v} must be within 0 (greedy) and 1e6"));
    }
    Ok(v as f32)
}

/// --top-p: a probability mass in (0, 1].
pub(crate) fn parse_top_p(s: &str) -> Result<f32, String> {
    let v = parse_f64(s)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("{v} must be within (0, 1]"));
    }
    Ok(v as f32)
}

/// --target-bpw: stored bits per weight; at least 1 (no grid pumice has stores less) and at
/// most 32.
pub(crate) fn parse_target_bpw(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if !(1.0..=32.0).contains(&v) {
        return Err(format!("{v} bits per weight must be within 1 and 32"));
    }
    Ok(v)
}

/// How text inputs are read: Python's universal newlines unless `--raw-text`.
pub(crate) fn newlines(raw: bool) -> pumice::text::Newlines {
    if raw {
        pumice::text::Newlines::Keep
    } else {
        pumice::text::Newlines::Universal
    }
}

pub(crate) fn read_token_file(path: &std::path::Path) -> Result<Vec<u32>, pumice::Error> {
    let text = pumice::text::read_text(path, pumice::text::Newlines::Keep)?;
    text.split_whitespace()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u32>().map_err(|_| {
                pumice::Error::InvalidArgument(format!(
                    "{}: item {} (`{s}`) is not a token id",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect()
}

/// A storage dtype by name: f32, f16, bf16 (or the safetensors / torch spellings).
pub(crate) fn parse_dtype(s: &str) -> Result<pumice::DType, String> {
    let l = s.to_ascii_lowercase();
    pumice::DType::from_safetensors(&l.to_ascii_uppercase())
        .or_else(|| pumice::DType::from_torch(&l))
        .ok_or_else(|| format!("`{s}`: known dtypes are f32, f16, bf16"))
}

/// What an output stores floats in (`--dtype`): a storage dtype, or q8_0 (a GGUF adapter).
pub(crate) fn parse_store_type(s: &str) -> Result<pumice::format::StoreType, String> {
    use pumice::format::StoreType;
    if s.eq_ignore_ascii_case("q8_0") {
        return Ok(StoreType::Q8_0);
    }
    parse_dtype(s)
        .map(StoreType::Float)
        .map_err(|_| format!("`{s}`: known are f32, f16, bf16 and (a GGUF adapter) q8_0"))
}

/// An output format by name (`pumice::format::FormatKind`).
pub(crate) fn parse_grid(s: &str) -> Result<pumice::quant::GridKind, String> {
    pumice::quant::GridKind::parse(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_format(s: &str) -> Result<pumice::format::FormatKind, String> {
    pumice::format::FormatKind::parse(s).map_err(|e| e.to_string())
}

/// `--lowrank-on` / `--caldera-lowrank-on`.
pub(crate) fn parse_placement(s: &str) -> Result<pumice::lowrank::fit::Placement, String> {
    pumice::lowrank::fit::Placement::parse(s).map_err(|e| e.to_string())
}

/// The LoRA adapter of `--lora DIR` for `ck`, read and checked (before any GPU work).
pub(crate) fn read_adapter(
    dir: Option<&std::path::Path>,
    ck: &pumice::model::Checkpoint,
) -> Result<Option<pumice::format::lora::LoraAdapter>, pumice::Error> {
    dir.map(|d| pumice::format::lora::read(d, ck)).transpose()
}

/// With `--vote`, the exits to vote with: the adapter's when it has some, else the model's
/// (refused, naming the directories, when neither has any); without `--vote`, none.
pub(crate) fn exits_for_vote<'a>(
    vote: bool,
    ck: &'a pumice::model::Checkpoint,
    adapter: Option<&'a pumice::format::lora::LoraAdapter>,
    adapter_dir: Option<&std::path::Path>,
) -> Result<Option<&'a pumice::model::exits::Exits>, pumice::Error> {
    if !vote {
        return Ok(None);
    }
    if let Some(x) = adapter.and_then(|a| a.exits.as_ref()) {
        return Ok(Some(x));
    }
    ck.exits().map(Some).ok_or_else(|| {
        let with = adapter_dir.map_or(String::new(), |d| format!(" nor does {}", d.display()));
        pumice::Error::InvalidArgument(format!(
            "--vote/--exit: {} has no exits ({}){with}; train them with `finetune --exit-every`",
            ck.dir().display(),
            pumice::model::exits::EXITS_FILE
        ))
    })
}
