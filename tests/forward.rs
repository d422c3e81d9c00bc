//! The GPU forward pass against the f64 CPU reference on model configurations the
//! transformers reference data does not cover (Qwen2 biases, Llama attention/MLP biases, tied
//! heads, linear and llama3 RoPE scaling, Mistral's sliding window), and layer streaming
//! against resident layers.

mod common;

use common::{gpu, gpu_limited, project_root};
use pumice::cpu::forward::reference_logits;
use pumice::gpu::Gpu;
use pumice::infer::{Engine, EngineOptions};
use pumice::model::synthetic::SyntheticLlama;
use pumice::model::Checkpoint;

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + seed * 97) % vocab as u64) as u32)
        .collect()
}

fn gpu_logits(g: &Gpu, ck: &Checkpoint, ids: &[u32], seq_len: usize, resident: bool) -> Vec<f32> {
    let opts = EngineOptions {
        resident_bytes: if resident { u64::MAX } else { 0 },
        max_positions: seq_len,
    };
    let mut e = Engine::new(g, ck, &opts).unwrap();
    assert_eq!(e.resident(), resident);
    let h = e.hidden_states(ids, seq_len).unwrap();
    e.logits(&h, 0..ids.len()).unwrap().to_f32(g).unwrap()
}

fn check(name: &str, spec: SyntheticLlama) {
    let g = gpu();
    let d = tempfile::tempdir().unwrap();
    spec.write(d.path()).unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let (seq_len, nseq) = (19, 3);
    let toks = ids(seq_len * nseq, spec.vocab, 1);
    let want = reference_logits(&ck, &toks, seq_len).unwrap();
    let got = gpu_logits(&g, &ck, &toks, seq_len, true);
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    assert!(err < 1e-4, "{name}: max |Δlogit| {err:.3e}");
}

fn with(mut s: SyntheticLlama, extra: serde_json::Value) -> SyntheticLlama {
    for (k, v) in extra.as_object().unwrap() {
        s.extra.insert(k.clone(), v.clone());
    }
    s
}

#[test]
fn llama_plain() {
    check("llama", SyntheticLlama::tiny("LlamaForCausalLM"));
}

#[test]
fn llama_biases_tied_head_llama3_rope() {
    let s = with(
        SyntheticLlama::tiny("LlamaForCausalLM"),
        serde_json::json!({
            "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": true,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        }),
    );
    check("llama+biases+tied+llama3", s);
}

#[test]
fn llama_linear_rope_new_style() {
    let mut s = with(
        SyntheticLlama::tiny("LlamaForCausalLM"),
        serde_json::json!({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}}),
    );
    s.dtype = pumice::DType::BF16;
    check("llama+linear rope (bf16)", s);
}

#[test]
fn qwen2_qkv_biases() {
    check(
        "qwen2",
        with(
            SyntheticLlama::tiny("Qwen2ForCausalLM"),
            serde_json::json!({"tie_word_embeddings": true}),
        ),
    );
}

#[test]
fn mistral_sliding_window() {
    let mut s = with(
        SyntheticLlama::tiny("MistralForCausalLM"),
        serde_json::json!({"sliding_window": 5}),
    );
    s.dtype = pumice::DType::F16;
    check("mistral+window", s);
}

/// Streaming layers from the memory map every batch gives the same logits as keeping them
/// resident, and holds less GPU memory at its peak.
#[test]
fn streamed_layers_match_resident() {
    let dir = project_root().join("assets/models/gutenberg-llama");
    let ck = Checkpoint::open(&dir).unwrap();
    let toks = ids(64 * 2, ck.config().vocab_size, 3);
    let g1 = gpu();
    let resident = gpu_logits(&g1, &ck, &toks, 64, true);
    let peak_resident = g1.memory().peak_bytes;
    let g2 = gpu();
    let streamed = gpu_logits(&g2, &ck, &toks, 64, false);
    let peak_streamed = g2.memory().peak_bytes;
    assert_eq!(resident, streamed);
    assert!(
        peak_streamed < peak_resident,
        "streamed peak {peak_streamed} ≥ resident peak {peak_resident}"
    );
}

/// Activations and weights split into small chunks give the same logits.
#[test]
fn chunked_model_matches() {
    let dir = project_root().join("assets/models/gutenberg-llama");
    let ck = Checkpoint::open(&dir).unwrap();
    let toks = ids(32 * 3, ck.config().vocab_size, 5);
    let full = gpu_logits(&gpu(), &ck, &toks, 32, true);
    // 64 KiB bindings: the embedding (4096×192 bf16 = 1.5 MiB) and every activation matrix
    // beyond a few rows are split.
    let chunked = gpu_logits(&gpu_limited(64 << 10), &ck, &toks, 32, true);
    let err = full
        .iter()
        .zip(&chunked)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err < 1e-4, "max |Δ| {err}");
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let g = gpu();
    let dir = project_root().join("assets/models/gutenberg-llama");
    let ck = Checkpoint::open(&dir).unwrap();
    let mut e = Engine::new(
        &g,
        &ck,
        &EngineOptions {
            max_positions: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let err = e.hidden_states(&[1, 2, 4096, 3], 4).unwrap_err();
    assert!(err.to_string().contains("4096"), "{err}");
    let err = e.hidden_states(&[1; 16], 16).unwrap_err();
    assert!(err.to_string().contains("positions"), "{err}");
}

/// Lockstep decoding of several sequences through an interleaved batch cache gives the same
/// logits as the full forward pass of each sequence.
#[test]
fn batch_cache_matches_full_forward() {
    let g = gpu();
    let dir = project_root().join("assets/models/gutenberg-llama");
    let ck = Checkpoint::open(&dir).unwrap();
    let v = ck.config().vocab_size;
    let (nseq, len) = (3, 12);
    let seqs: Vec<Vec<u32>> = (0..nseq).map(|b| ids(len, v, 10 + b as u64)).collect();
    let mut e = Engine::new(
        &g,
        &ck,
        &EngineOptions {
            max_positions: 16,
            ..Default::default()
        },
    )
    .unwrap();
    let flat: Vec<u32> = seqs.concat();
    let h = e.hidden_states(&flat, len).unwrap();
    let full = e.logits(&h, 0..nseq * len).unwrap().to_f32(&g).unwrap();
    let mut cache = e.new_batch_cache(nseq, 16).unwrap();
    for p in 0..len {
        let step: Vec<u32> = seqs.iter().map(|s| s[p]).collect();
        let h = e.extend_batch(&mut cache, &step).unwrap();
        let z = e.logits(&h, 0..nseq).unwrap().to_f32(&g).unwrap();
        for b in 0..nseq {
            let want = &full[(b * len + p) * v..(b * len + p + 1) * v];
            let d = z[b * v..(b + 1) * v]
                .iter()
                .zip(want)
                .fold(0.0f32, |m, (a, c)| m.max((a - c).abs()));
            assert!(d < 1e-4, "sequence {b} position {p}: max |Δ| {d}");
        }
    }
}
