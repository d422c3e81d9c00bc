//! Loading real checkpoints: the asset model (always), stories260k from ../shared (skipped with
//! a printed reason when absent), sharded layouts, the architecture description, the tokenizer.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{project_root, shared, write_safetensors, RawTensor};
use pumice::model::{Checkpoint, Family, InputGroup, LinearKind, RopeScaling, Tokenizer};
use pumice::DType;

fn asset_model() -> PathBuf {
    project_root().join("assets/models/gutenberg-llama")
}

fn inspect_json(dir: &std::path::Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(["inspect", dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn asset_model_loads() {
    let ck = Checkpoint::open(asset_model()).unwrap();
    let c = ck.config();
    assert_eq!(c.family, Family::Llama);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_layers),
        (192, 512, 6)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (6, 2, 32));
    // transformers ≥ 5 style `rope_parameters`.
    assert_eq!(c.rope.theta, 10000.0);
    assert_eq!(c.rope.scaling, RopeScaling::Default);
    assert!(!c.tie_word_embeddings);
    assert_eq!(ck.dtype(), DType::BF16);
    assert_eq!(ck.parameter_count(), 3_934_656);

    let layer = &ck.arch().layers[3];
    let groups = layer.groups();
    assert_eq!(groups[0].0, InputGroup::AttnIn);
    assert_eq!(
        groups[0].1.iter().map(|l| l.kind).collect::<Vec<_>>(),
        [LinearKind::QProj, LinearKind::KProj, LinearKind::VProj]
    );
    assert_eq!(layer.linear(LinearKind::KProj).out_features, 64);
    assert_eq!(layer.linear(LinearKind::DownProj).in_features, 512);

    let w = ck.tensor("model.layers.3.mlp.down_proj.weight").unwrap();
    assert_eq!(w.shape, &[192, 512]);
    let vals = w.to_f32().unwrap();
    assert_eq!(vals.len(), 192 * 512);
    assert!(vals.iter().any(|v| *v != 0.0));
    ck.check_finite().unwrap();

    let v = inspect_json(&asset_model());
    assert_eq!(v["parameters"], 3_934_656);
    assert_eq!(v["architecture"], "LlamaForCausalLM");
    assert_eq!(v["layers"], 6);
    assert_eq!(v["hidden_size"], 192);
    assert_eq!(v["dtype"], "bfloat16");
}

#[test]
fn stories260k_loads() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared is absent (stories260k lives there)");
        return;
    };
    let dir = shared.join("models/stories260k");
    let ck = Checkpoint::open(&dir).unwrap();
    let c = ck.config();
    // Older top-level `rope_theta`, `torch_dtype`, tied embeddings.
    assert_eq!(c.rope.theta, 10000.0);
    assert!(c.tie_word_embeddings);
    assert!(ck.arch().lm_head.is_none());
    assert_eq!(ck.lm_head().unwrap().name, "model.embed_tokens.weight");
    assert_eq!(ck.dtype(), DType::F32);
    assert_eq!(ck.parameter_count(), 260_032);
    assert_eq!(inspect_json(&dir)["parameters"], 260_032);
}

/// The asset model re-written as two shards plus an index loads to the same tensors.
#[test]
fn sharded_checkpoint_matches_single_file() {
    let single = Checkpoint::open(asset_model()).unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        asset_model().join("config.json"),
        d.path().join("config.json"),
    )
    .unwrap();
    let specs = single.arch().tensors();
    let half = specs.len() / 2;
    let mut map = serde_json::Map::new();
    for (shard, part) in [(1, &specs[..half]), (2, &specs[half..])] {
        let fname = format!("model-0000{shard}-of-00002.safetensors");
        let raws: Vec<RawTensor> = part
            .iter()
            .map(|s| {
                let t = single.tensor(&s.name).unwrap();
                map.insert(s.name.clone(), fname.clone().into());
                RawTensor {
                    name: s.name.clone(),
                    dtype: "BF16".into(),
                    shape: t.shape.to_vec(),
                    bytes: t.bytes.to_vec(),
                    offsets: None,
                }
            })
            .collect();
        write_safetensors(&d.path().join(&fname), &raws);
    }
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = Checkpoint::open(d.path()).unwrap();
    assert_eq!(sharded.files().len(), 2);
    assert_eq!(sharded.parameter_count(), single.parameter_count());
    for s in specs {
        assert_eq!(
            sharded.tensor(&s.name).unwrap().bytes,
            single.tensor(&s.name).unwrap().bytes,
            "{}",
            s.name
        );
    }
    assert_eq!(inspect_json(d.path())["parameters"], 3_934_656);
}

#[test]
fn tokenizer_encodes_like_transformers() {
    let tok = Tokenizer::from_model_dir(&asset_model())
        .unwrap()
        .expect("asset model has a tokenizer");
    assert_eq!(tok.vocab_size(), 4096);
    // transformers' ids for the greedy-parity prompt (../shared/reference/gutenberg-llama).
    let ids = tok.encode("It was a dark").unwrap();
    assert_eq!(ids, [866, 328, 260, 1349]);
    if let Some(shared) = shared() {
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(shared.join("reference/gutenberg-llama/reference.json"))
                .unwrap(),
        )
        .unwrap();
        let want: Vec<u32> = r["greedy"]["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want);
    }
    let text = "Elizabeth looked at her.\n\n“I am sure";
    assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
}

#[test]
fn broken_tokenizer_is_a_clean_error() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_model_dir(d.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && !e.contains('\n'), "{e}");
}
