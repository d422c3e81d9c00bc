//! Write a synthetic checkpoint in the shape of a real model family (deterministic weights
//! scaled like a trained model's), with the asset model's tokenizer, for measuring speed and
//! memory at real shapes without downloading a model:
//!
//! ```text
//! cargo run --release --example synthetic_model -- smollm2-135m 30 /tmp/smollm2-shape
//! ```
//!
//! Families: smollm2-135m, qwen2.5-0.5b, llama-3.2-1b. The tokenizer's ids (4,096 of them) are
//! a subset of every family's vocabulary, so text calibration and evaluation work.

use std::path::PathBuf;

use pumice::model::synthetic::SyntheticLlama;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [family, layers, out] = args.as_slice() else {
        anyhow::bail!(
            "usage: synthetic_model FAMILY LAYERS OUT_DIR (families: {})",
            SyntheticLlama::FAMILIES.join(", ")
        );
    };
    let layers: usize = layers.parse()?;
    let Some(s) = SyntheticLlama::family(family, layers) else {
        anyhow::bail!(
            "unknown family {family} (known: {})",
            SyntheticLlama::FAMILIES.join(", ")
        );
    };
    let out = PathBuf::from(out);
    s.write(&out)?;
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("assets/models/gutenberg-llama/tokenizer.json");
    std::fs::copy(&tok, out.join("tokenizer.json"))?;
    println!(
        "{} ({} layers) written to {}",
        family,
        layers,
        out.display()
    );
    Ok(())
}
