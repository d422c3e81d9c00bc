//! Hostile and broken inputs: each must give a one-line error naming the file and the cause,
//! exit code 1 or 2, and never a panic (exit 101). The files are generated here.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{write_safetensors, RawTensor, TinyLlama};

struct Outcome {
    code: i32,
    stderr: String,
    stdout: String,
}

fn pumice(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(args)
        .output()
        .expect("run pumice");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// `pumice inspect DIR` must fail cleanly with a message naming `names` and containing `cause`.
fn expect_clean_failure(dir: &Path, names: &str, cause: &str) {
    let o = pumice(&["inspect", dir.to_str().unwrap(), "--json"]);
    assert!(
        o.code == 1 || o.code == 2,
        "exit code {} (stderr: {})",
        o.code,
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
    assert!(
        o.stdout.is_empty(),
        "printed a result despite failing: {}",
        o.stdout
    );
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {:?}", lines);
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    assert!(
        line.contains(names),
        "message does not name `{names}`: {line}"
    );
    assert!(
        line.contains(cause),
        "message does not give the cause `{cause}`: {line}"
    );
}

fn tiny(dir: &Path) -> TinyLlama {
    let t = TinyLlama::default();
    t.write(dir);
    t
}

fn st(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

#[test]
fn valid_tiny_model_is_accepted() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let o = pumice(&["inspect", d.path().to_str().unwrap(), "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["parameters"].as_u64().unwrap() as usize, t.parameters());
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    let bytes = std::fs::read(st(d.path())).unwrap();
    std::fs::write(st(d.path()), &bytes[..bytes.len() - 100]).unwrap();
    expect_clean_failure(
        d.path(),
        "model.safetensors",
        "past the end of the data section",
    );
}

#[test]
fn shorter_than_the_length_prefix() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    std::fs::write(st(d.path()), [1u8, 2, 3]).unwrap();
    expect_clean_failure(d.path(), "model.safetensors", "truncated");
    std::fs::write(st(d.path()), []).unwrap();
    expect_clean_failure(d.path(), "model.safetensors", "truncated");
}

#[test]
fn header_length_past_end_of_file() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    let mut bytes = std::fs::read(st(d.path())).unwrap();
    let fake = (bytes.len() as u64 + 1000).to_le_bytes();
    bytes[..8].copy_from_slice(&fake);
    std::fs::write(st(d.path()), &bytes).unwrap();
    expect_clean_failure(d.path(), "model.safetensors", "header length");
    // An absurd length (would be a huge allocation if trusted).
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(st(d.path()), &bytes).unwrap();
    expect_clean_failure(d.path(), "model.safetensors", "header length");
}

#[test]
fn header_not_json() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{this is not js}");
    std::fs::write(st(d.path()), &bytes).unwrap();
    expect_clean_failure(d.path(), "model.safetensors", "header is not valid JSON");
}

#[test]
fn tensor_offsets_out_of_range() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let mut ts = t.tensors();
    let total: u64 = ts.iter().map(|t| t.bytes.len() as u64).sum();
    let last = ts.len() - 1;
    let len = ts[last].bytes.len() as u64;
    ts[last].offsets = Some((total + 64, total + 64 + len));
    write_safetensors(&st(d.path()), &ts);
    expect_clean_failure(
        d.path(),
        "lm_head.weight",
        "past the end of the data section",
    );
}

#[test]
fn tensor_offsets_overlap() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let mut ts = t.tensors();
    // Make the final norm (8 floats = 32 bytes) start inside the embedding.
    let i = ts
        .iter()
        .position(|t| t.name == "model.norm.weight")
        .unwrap();
    ts[i].offsets = Some((16, 48));
    write_safetensors(&st(d.path()), &ts);
    expect_clean_failure(d.path(), "model.safetensors", "overlap");
}

#[test]
fn byte_length_disagrees_with_shape() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let mut ts = t.tensors();
    ts[0].shape = vec![16, 9];
    write_safetensors(&st(d.path()), &ts);
    expect_clean_failure(d.path(), "model.embed_tokens.weight", "needs");
}

#[test]
fn shape_disagrees_with_config() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let mut ts = t.tensors();
    let i = ts
        .iter()
        .position(|t| t.name == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    // Same byte count, transposed shape.
    ts[i].shape = vec![8, 12];
    write_safetensors(&st(d.path()), &ts);
    expect_clean_failure(
        d.path(),
        "model.layers.1.mlp.up_proj.weight",
        "disagrees with config.json",
    );
}

#[test]
fn dtype_disagrees_with_config() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    std::fs::write(d.path().join("config.json"), t.config_json("bfloat16")).unwrap();
    expect_clean_failure(
        d.path(),
        "model.embed_tokens.weight",
        "config.json says bfloat16",
    );
}

#[test]
fn non_float_weight_dtype() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let mut ts = t.tensors();
    let i = ts
        .iter()
        .position(|t| t.name == "model.norm.weight")
        .unwrap();
    ts[i].dtype = "I32".into();
    write_safetensors(&st(d.path()), &ts);
    expect_clean_failure(d.path(), "model.norm.weight", "I32");
}

#[test]
fn missing_tensor() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let ts: Vec<RawTensor> = t
        .tensors()
        .into_iter()
        .filter(|t| t.name != "lm_head.weight")
        .collect();
    write_safetensors(&st(d.path()), &ts);
    expect_clean_failure(d.path(), "lm_head.weight", "missing");
}

#[test]
fn missing_shard_named_by_index() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    std::fs::remove_file(st(d.path())).unwrap();
    let ts = t.tensors();
    let (a, b) = ts.split_at(ts.len() / 2);
    let a: Vec<RawTensor> = a
        .iter()
        .map(|t| RawTensor {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            bytes: t.bytes.clone(),
            offsets: None,
        })
        .collect();
    write_safetensors(&d.path().join("model-00001-of-00002.safetensors"), &a);
    let mut map = serde_json::Map::new();
    for t in &a {
        map.insert(t.name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for t in b {
        map.insert(t.name.clone(), "model-00002-of-00002.safetensors".into());
    }
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    expect_clean_failure(
        d.path(),
        "model.safetensors.index.json",
        "model-00002-of-00002.safetensors",
    );
}

#[test]
fn unsupported_architecture() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let cfg = t
        .config_json("float32")
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    expect_clean_failure(
        d.path(),
        "config.json",
        "unsupported architecture `GPTNeoXForCausalLM`",
    );
}

#[test]
fn config_missing_required_field() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let mut v: serde_json::Value = serde_json::from_str(&t.config_json("float32")).unwrap();
    v.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(d.path().join("config.json"), v.to_string()).unwrap();
    expect_clean_failure(
        d.path(),
        "config.json",
        "missing required field `num_hidden_layers`",
    );
}

#[test]
fn config_not_json() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    std::fs::write(d.path().join("config.json"), "hidden_size: 8\n").unwrap();
    expect_clean_failure(d.path(), "config.json", "not valid JSON");
}

#[test]
fn config_wrong_type() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let cfg = t
        .config_json("float32")
        .replace("\"hidden_size\":8", "\"hidden_size\":\"eight\"");
    assert!(cfg.contains("eight"));
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    expect_clean_failure(
        d.path(),
        "config.json",
        "`hidden_size` must be a positive integer",
    );
}

#[test]
fn empty_and_missing_directories() {
    let d = tempfile::tempdir().unwrap();
    expect_clean_failure(d.path(), d.path().to_str().unwrap(), "empty");
    let missing = d.path().join("nope");
    expect_clean_failure(&missing, "nope", "no such directory");
    std::fs::write(d.path().join("file.txt"), "x").unwrap();
    expect_clean_failure(&d.path().join("file.txt"), "file.txt", "not a directory");
    expect_clean_failure(d.path(), d.path().to_str().unwrap(), "no config.json");
    std::fs::write(
        d.path().join("config.json"),
        TinyLlama::default().config_json("float32"),
    )
    .unwrap();
    expect_clean_failure(d.path(), d.path().to_str().unwrap(), "no model.safetensors");
}

#[test]
fn nan_weights_are_refused_when_checked() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let mut ts = t.tensors();
    let i = ts
        .iter()
        .position(|t| t.name == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    ts[i].bytes[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    write_safetensors(&st(d.path()), &ts);
    let o = pumice(&["inspect", d.path().to_str().unwrap(), "--check-weights"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("model.layers.0.self_attn.k_proj.weight")
            && o.stderr.contains("element 3 is NaN"),
        "{}",
        o.stderr
    );
}

#[test]
fn bad_arguments_exit_2() {
    let o = pumice(&["inspect"]);
    assert_eq!(o.code, 2);
    let o = pumice(&["--backend", "glide", "devices"]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("unknown backend"), "{}", o.stderr);
    let o = pumice(&["--adapter", "no-such-adapter-name", "devices"]);
    assert_eq!(
        o.code, 0,
        "devices lists adapters even when the selector matches none"
    );
}
