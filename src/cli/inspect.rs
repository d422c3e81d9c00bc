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
        return ct_summary(model, json);
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

/// A GGUF output: its architecture, sizes and bits per weight by ggml type.
fn ct_summary(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let s = pumice::format::compressed_tensors::summary(path)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        return Ok(());
    }
    writeln!(out, "{}  (compressed-tensors pack-quantized)", s.path)?;
    writeln!(
        out,
        "  parameters      {} ({} in quantized linear layers)",
        s.parameters, s.linear_parameters
    )?;
    for (bits, group, symmetric, targets) in &s.schemes {
        writeln!(
            out,
            "  scheme          {bits}-bit {}, {}, {targets} targets",
            if *symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            group.map_or("per channel".to_string(), |g| format!("groups of {g}"))
        )?;
    }
    if let Some((bytes, r)) = &s.adapter {
        writeln!(out, "  adapter/        {bytes} bytes, PEFT LoRA r {r}")?;
    }
    writeln!(
        out,
        "  on disk         {} bytes; {:.3} bits/parameter overall, {:.3} in quantized linear layers",
        s.bytes, s.bits_per_parameter, s.linear_bits_per_parameter
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
