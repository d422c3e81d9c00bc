//! Layer importance (LSAQ top-k Jaccard) against an f64 CPU reference, and the measurement file.

mod common;

use common::{gpu, project_root};
use pumice::budget::importance::{jaccard, lsaq};
use pumice::budget::measurement::Measurement;
use pumice::cpu;
use pumice::infer::{Engine, EngineOptions};
use pumice::model::Checkpoint;

fn asset() -> std::path::PathBuf {
    project_root().join("assets/models/gutenberg-llama")
}

/// Per-layer Jaccard on the GPU agrees with the f64 reference forward on the same tokens (exact
/// up to near-ties between the k-th and (k+1)-th logits, which f32 may order differently).
#[test]
fn lsaq_matches_f64_reference() {
    let g = gpu();
    let ck = Checkpoint::open(asset()).unwrap();
    let (seq, nseq, k) = (24usize, 3usize, 8usize);
    let vocab = ck.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..seq * nseq)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 7) % vocab)
        .collect();
    let mut e = Engine::new(
        &g,
        &ck,
        &EngineOptions {
            max_positions: seq,
            ..Default::default()
        },
    )
    .unwrap();
    let mut calls = Vec::new();
    let got = lsaq(&mut e, &tokens, seq, k, 2, &mut |d, t| calls.push((d, t))).unwrap();
    assert_eq!(calls, vec![(2, 3), (3, 3)]);
    let streams = cpu::forward::reference_layer_logits(&ck, &tokens, seq).unwrap();
    let v = vocab as usize;
    let sets: Vec<Vec<Vec<u32>>> = streams
        .iter()
        .map(|z| {
            let z32: Vec<f32> = z.iter().map(|&x| x as f32).collect();
            cpu::ops::top_k(&z32, v, k)
                .into_iter()
                .map(|s| s.into_iter().map(|i| i as u32).collect())
                .collect()
        })
        .collect();
    assert_eq!(got.len(), ck.config().num_layers);
    for (l, li) in got.iter().enumerate() {
        let want = (0..tokens.len())
            .map(|r| jaccard(&sets[l][r], &sets[l + 1][r]))
            .sum::<f64>()
            / tokens.len() as f64;
        eprintln!("layer {l}: GPU {:.4}, reference {want:.4}", li.jaccard);
        assert!(
            (li.jaccard - want).abs() < 0.01,
            "layer {l}: {} vs {want}",
            li.jaccard
        );
        assert!((li.importance - (1.0 - li.jaccard)).abs() < 1e-12);
        assert!((0.0..=1.0).contains(&li.jaccard));
    }
    // Bad k is refused with a message.
    let err = lsaq(&mut e, &tokens, seq, 0, 2, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("--top-k"));
}

/// `pumice importance -o FILE` writes a measurement file that reads back; a damaged or foreign
/// file is refused with one line naming it.
#[test]
fn importance_cli_writes_a_measurement_file() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m.json");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args([
            "importance",
            asset().to_str().unwrap(),
            "--calib-samples",
            "2",
        ])
        .args(["--calib-len", "16", "--top-k", "5", "--json", "-o"])
        .arg(&out)
        .env("XDG_RUNTIME_DIR", "/tmp/pumice-xdg-runtime")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let m = Measurement::read(&out).unwrap();
    assert_eq!(m.layers.len(), 6);
    assert_eq!(m.top_k, 5);
    assert_eq!(m.calibration.kind, "self");
    assert_eq!(printed["layers"].as_array().unwrap().len(), 6);
    // No temporary file is left beside it.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);

    let bad = d.path().join("bad.json");
    std::fs::write(&bad, "{\"format\": \"something-else\"").unwrap();
    let e = Measurement::read(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.json"), "{e}");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    v["format"] = "other".into();
    std::fs::write(&bad, v.to_string()).unwrap();
    let e = Measurement::read(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bad.json") && e.contains("pumice-measurement"),
        "{e}"
    );
}
