//! `pumice export`: write a compressed checkpoint in another format.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use pumice::format::FormatKind;

use pumice::DType;

use super::progress;

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// A pumice-compressed checkpoint (`pumice compress` output).
    pub(crate) input: PathBuf,
    /// Output directory (written to a temporary name and renamed when complete).
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Target format: gguf (llama.cpp: OUT/model.gguf, CALDERA's factors in OUT/adapter.gguf),
    /// dense (plain weights, L·R merged), compressed-tensors (pack-quantized, for
    /// transformers and vLLM; CALDERA's factors as a PEFT adapter in OUT/adapter), gptq
    /// (GPTQModel, transformers, vLLM: the gptq_v2 checkpoint format; gptq-v1 the original,
    /// zero points stored minus one; factors in OUT/adapter as for compressed-tensors), peft
    /// (CALDERA's factors alone, as a LoRA adapter). What a format cannot hold exactly is
    /// refused, naming the tensor and the reason.
    #[arg(long, value_parser = super::args::parse_format)]
    pub(crate) format: FormatKind,
    /// GGUF: the ggml type of every linear weight (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, q2_k, q3_k, q4_k,
    /// q5_k, q6_k, f32;
    /// default: the smallest that holds each weight exactly).
    #[arg(long)]
    pub(crate) gguf_type: Option<String>,
    /// Dtype of a dense output (f32, f16, bf16; default: the model's), or of a GGUF LoRA
    /// adapter's factors (default f32, exact; f16 halves the adapter and q8_0 stores 8.5 bits
    /// per factor weight, both rounding the factors; a q8_0 lora_b whose rank is not a multiple
    /// of 32 is f16).
    #[arg(long, value_parser = super::args::parse_store_type)]
    pub(crate) dtype: Option<pumice::format::StoreType>,
    /// A PEFT LoRA adapter directory for INPUT (`finetune --lora-rank`'s output, or any PEFT
    /// LoRA whose modules are INPUT's linears) written into the GGUF LoRA adapter
    /// (OUT/adapter.gguf), each pair's scale folded into lora_b and stacked after CALDERA's
    /// factors of the same weight (`--format gguf` only: the other formats load the PEFT
    /// directory as it is).
    #[arg(long, value_name = "ADAPTER")]
    pub(crate) lora: Option<PathBuf>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub(crate) force: bool,
    /// JSON lines on stdout (implied when stdout is not a terminal).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(a: ExportArgs) -> anyhow::Result<()> {
    let ck = pumice::model::Checkpoint::open(&a.input)?;
    let format: Box<dyn pumice::format::Format> = if a.format == FormatKind::Gguf {
        use pumice::format::gguf::{file::GgmlType, Gguf};
        let linear = match &a.gguf_type {
            None => None,
            Some(t) => Some(
                GgmlType::parse(t)
                    .filter(|t| GgmlType::LINEAR.contains(t))
                    .ok_or_else(|| {
                        let known: Vec<&str> = GgmlType::LINEAR.iter().map(|t| t.name()).collect();
                        pumice::Error::InvalidArgument(format!(
                            "--gguf-type {t}: known types are {}",
                            known.join(", ")
                        ))
                    })?,
            ),
        };
        let tuned = match &a.lora {
            None => None,
            Some(dir) => {
                let t = pumice::format::lora::read(dir, &ck)?;
                if t.exits.is_some() {
                    tracing::warn!(
                        "{}: its exits are not exported (no other format holds them); vote with \
                         `pumice eval --lora`",
                        dir.display()
                    );
                }
                Some(std::sync::Arc::new(t))
            }
        };
        Box::new(Gguf {
            linear,
            lora: a
                .dtype
                .unwrap_or(pumice::format::StoreType::Float(DType::F32)),
            tuned,
        })
    } else {
        for (given, flag) in [
            (a.gguf_type.is_some(), "--gguf-type"),
            (a.lora.is_some(), "--lora"),
        ] {
            if given {
                return Err(pumice::Error::InvalidArgument(format!(
                    "{flag} is for --format gguf, not {} (a PEFT adapter loads as it is beside \
                     the other formats)",
                    a.format.name()
                ))
                .into());
            }
        }
        a.format.make(a.dtype, ck.dtype())?
    };
    let mut rep = progress::Reporter::new(a.json);
    rep.emit(
        "start",
        serde_json::json!({"command": "export", "input": a.input.display().to_string(),
                           "format": a.format.name()}),
    );
    let mut bar: Option<progress::Progress> = None;
    let w = pumice::format::export(&ck, format.as_ref(), &a.output, a.force, &mut |done, n| {
        bar.get_or_insert_with(|| progress::Progress::new("export", n as u64, "layers"))
            .set(done as u64);
    })?;
    if let Some(mut b) = bar {
        b.finish();
    }
    let summary = serde_json::json!({
        "output": a.output.display().to_string(),
        "format": a.format.name(),
        "files": w.files.iter().map(|(f, b)| serde_json::json!({"file": f, "bytes": b})).collect::<Vec<_>>(),
        "bytes": w.bytes(),
        "parameters": w.total.parameters,
        "bits_per_parameter": w.total.bits_per_parameter,
        "linear_bits_per_parameter": w.linear.bits_per_parameter,
    });
    rep.conclude(summary, || {
        let mut out = std::io::stdout();
        writeln!(
            out,
            "wrote {} ({}): {:.2} MiB, {:.3} bits/parameter overall, {:.3} in the linear layers",
            a.output.display(),
            a.format.name(),
            w.bytes() as f64 / (1u64 << 20) as f64,
            w.total.bits_per_parameter,
            w.linear.bits_per_parameter
        )?;
        for (f, b) in &w.files {
            writeln!(out, "  {f}: {b} bytes")?;
        }
        Ok(())
    })?;
    Ok(())
}
