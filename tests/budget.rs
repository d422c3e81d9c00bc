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
        .args([
            "--calib-len",
            "16",
            "--top-k",
            "5",
            "--no-sensitivity",
            "--json",
            "-o",
        ])
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

fn pumice(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(args)
        .env("XDG_RUNTIME_DIR", "/tmp/pumice-xdg-runtime")
        .output()
        .unwrap()
}

/// Measure cheap options once, then: `--memory-budget` yields weights + KV cache within the
/// budget; an impossible budget fails with one line naming the smallest feasible one and
/// writes nothing; every rule stays within a bits-per-parameter target; the report is written.
#[test]
fn allocation_meets_budgets() {
    use pumice::budget::allocate::{fixed_bytes, kv_cache_bytes};
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m.json");
    let model = asset();
    let model = model.to_str().unwrap();
    let calib = ["--calib-samples", "4", "--calib-len", "32"];
    let o = pumice(
        &[
            &[
                "importance",
                model,
                "--options",
                "rtn-2-g64,gptq-3-g128,gptq-4-g128",
                "-o",
            ],
            &[m.to_str().unwrap()][..],
            &calib[..],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meas = Measurement::read(&m).unwrap();
    assert_eq!(meas.options.len(), 3);
    for l in &meas.layers {
        // More bits, less damage (per layer, measured).
        assert!(l.sensitivity[0].kl > l.sensitivity[2].kl, "{l:?}");
        assert!(l.sensitivity[0].bits < l.sensitivity[1].bits);
    }
    let ck = Checkpoint::open(asset()).unwrap();
    let linear_params = 6 * meas.layer_params;
    let context = 256;
    let kv = kv_cache_bytes(&ck, context);
    let budget = fixed_bytes(&ck).unwrap() + kv + 3 * linear_params / 8;
    let compress = |name: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let o = pumice(
            &[
                &[
                    "compress",
                    model,
                    "-o",
                    out.to_str().unwrap(),
                    "--measurement",
                ],
                &[m.to_str().unwrap(), "--eval-samples", "0", "--json"][..],
                &calib[..],
                extra,
            ]
            .concat(),
        );
        (out, o)
    };
    let b = budget.to_string();
    let ctx = context.to_string();
    let (out, o) = compress("mem", &["--memory-budget", &b, "--context", &ctx]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let weights = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(weights + kv <= budget, "{weights} + {kv} > {budget}");
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<circle").count(), 6);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pumice.json")).unwrap()).unwrap();
    assert_eq!(manifest["allocation"]["rule"], "optimal");
    assert_eq!(
        manifest["allocation"]["layers"].as_array().unwrap().len(),
        6
    );

    // Impossible: a budget below the weights alone.
    let (out, o) = compress("tiny", &["--memory-budget", "100K", "--context", &ctx]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("smallest feasible budget is"), "{err}");
    assert!(!out.exists());

    // LUC with pruning around a mean sparsity: the least sensitive layers are pruned, the
    // budget holds.
    let (out, o) = compress(
        "luc-pruned",
        &[
            "--allocate",
            "luc",
            "--sparsity",
            "0.4",
            "--target-bpw",
            "4.5",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = common::json_summary(&o.stdout);
    assert!(s["linear_bits_per_parameter"].as_f64().unwrap() <= 4.5);
    let man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pumice.json")).unwrap()).unwrap();
    let pruned = man["tensors"]
        .as_object()
        .unwrap()
        .values()
        .filter(|e| e.get("sparsity").is_some())
        .count();
    assert!((7..42).contains(&pruned), "{pruned} pruned matrices");

    // Every rule within a bits-per-parameter target.
    for rule in ["uniform", "lsaq", "luc", "optimal"] {
        let (out, o) = compress(rule, &["--allocate", rule, "--target-bpw", "3.0"]);
        assert!(
            o.status.success(),
            "{rule}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let s = common::json_summary(&o.stdout);
        let bpw = s["linear_bits_per_parameter"].as_f64().unwrap();
        assert!(bpw <= 3.0, "{rule}: {bpw}");
        assert!(out.join("report.svg").exists());
    }
}
