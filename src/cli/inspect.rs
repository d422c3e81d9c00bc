//! `pumice inspect`.

use std::io::Write;

use pumice::model::{Checkpoint, ModelSummary};

pub(crate) fn run(model: &std::path::Path, json: bool, check_weights: bool) -> anyhow::Result<()> {
    let gguf = model.extension().is_some_and(|e| e == "gguf")
        || (model.join(pumice::format::gguf::MODEL_FILE).is_file()
            && !model.join("config.json").is_file());
    if gguf {
        return gguf_summary(model, json);
    }
    if pumice::format::compressed_tensors::is_output(model) {
        return quant_summary(pumice::format::compressed_tensors::summary(model)?, json);
    }
    if pumice::format::gptq::is_output(model) {
        return quant_summary(pumice::format::gptq::summary(model)?, json);
    }
    if pumice::format::peft::is_adapter(model) && !model.join("config.json").is_file() {
        let s = pumice::format::peft::summary(model)?;
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        } else {
            writeln!(out, "{}  (PEFT LoRA adapter)", s.path)?;
            adapter_lines(&mut out, &s)?;
        }
        return Ok(());
    }
    let ck = Checkpoint::open(model)?;
    if check_weights {
        ck.check_finite()?;
    }
    let s = ModelSummary::of(&ck);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        return Ok(());
    }
    writeln!(out, "{}  ({})", s.path, s.architecture)?;
    writeln!(
        out,
        "  parameters      {} ({} in decoder linear layers)",
        s.parameters, s.linear_parameters
    )?;
    writeln!(out, "  layers          {}", s.layers)?;
    writeln!(
        out,
        "  hidden size     {} (intermediate {})",
        s.hidden_size, s.intermediate_size
    )?;
    writeln!(
        out,
        "  attention       {} heads, {} KV heads, head dim {}{}",
        s.num_attention_heads,
        s.num_key_value_heads,
        s.head_dim,
        if s.attention_bias { ", q/k/v bias" } else { "" }
    )?;
    writeln!(
        out,
        "  vocabulary      {}{}",
        s.vocab_size,
        if s.tie_word_embeddings {
            " (tied LM head)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "  rope            theta {} {:?}",
        s.rope.theta, s.rope.scaling
    )?;
    writeln!(out, "  dtype           {}", s.dtype)?;
    writeln!(
        out,
        "  on disk         {} bytes in {} file(s){}",
        s.bytes_on_disk,
        s.files.len(),
        if s.tokenizer {
            ", tokenizer.json"
        } else {
            ", no tokenizer"
        }
    )?;
    writeln!(
        out,
        "  bits/parameter  {:.3} overall, {:.3} in decoder linear layers",
        s.bits_per_parameter, s.linear_bits_per_parameter
    )?;
    if !s.exits.is_empty() {
        writeln!(
            out,
            "  exits           after layers {:?} (norm + LM head each; eval --vote)",
            s.exits
        )?;
    }
    if let Some(m) = ck.manifest() {
        writeln!(
            out,
            "  compressed      {} {} from {} (sha256 {}…)",
            m.method,
            m.params,
            m.source.path,
            &m.source.sha256[..12.min(m.source.sha256.len())]
        )?;
    }
    if check_weights {
        writeln!(out, "  weights         all finite")?;
    }
    Ok(())
}

/// A quantized Hugging Face output (compressed-tensors, GPTQ): schemes, sizes, bits per
/// weight, the adapter beside it.
fn quant_summary(s: pumice::format::hf::QuantSummary, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        return Ok(());
    }
    writeln!(out, "{}  ({})", s.path, s.format)?;
    writeln!(
        out,
        "  parameters      {} ({} in quantized linear layers)",
        s.parameters, s.linear_parameters
    )?;
    for sc in &s.schemes {
        writeln!(
            out,
            "  scheme          {}-bit {}, {}, {} targets",
            sc.bits,
            if sc.symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            sc.group_size
                .map_or("per channel".to_string(), |g| format!("groups of {g}")),
            sc.targets
        )?;
    }
    if let Some(a) = &s.adapter {
        adapter_lines(&mut out, a)?;
    }
    writeln!(
        out,
        "  on disk         {} bytes; {:.3} bits/parameter overall, {:.3} in quantized linear layers",
        s.bytes, s.bits_per_parameter, s.linear_bits_per_parameter
    )?;
    Ok(())
}

fn adapter_lines(
    out: &mut impl Write,
    a: &pumice::format::hf::AdapterSummary,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "  adapter         {}: {} bytes, LoRA r {} alpha {}{}, {} target modules, {} tensors, {} parameters ({})",
        a.path,
        a.bytes,
        a.r,
        a.alpha,
        if a.rank_pattern > 0 {
            format!(" ({} modules with their own rank)", a.rank_pattern)
        } else {
            String::new()
        },
        a.target_modules,
        a.tensors,
        a.parameters,
        a.dtypes.join(", ")
    )?;
    Ok(())
}

fn gguf_summary(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let s = pumice::format::gguf::summary(path)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        return Ok(());
    }
    writeln!(out, "{}  (GGUF, {})", s.path, s.architecture)?;
    writeln!(
        out,
        "  parameters      {} ({} in decoder linear layers), {} tensors",
        s.parameters, s.linear_parameters, s.tensors
    )?;
    for (ty, (n, p)) in &s.types {
        writeln!(out, "  {ty:<15} {n} tensors, {p} parameters")?;
    }
    if let Some((bytes, tensors, alpha)) = &s.adapter {
        writeln!(
            out,
            "  adapter.gguf    {bytes} bytes, {tensors} LoRA tensors, alpha {alpha}"
        )?;
    }
    writeln!(
        out,
        "  on disk         {} bytes; {:.3} bits/parameter overall, {:.3} in decoder linear layers",
        s.bytes, s.bits_per_parameter, s.linear_bits_per_parameter
    )?;
    Ok(())
}
