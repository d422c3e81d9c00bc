//! `pumice finetune`: what is written is what was trained (CALDERA's factors rounded through
//! the stored grid and rotation: the reader's perplexity equals the trainer's), a LoRA adapter
//! that PEFT + transformers (not ours) load computes the trained model, and bad input is
//! refused before any work with nothing written.

mod common;

use std::path::{Path, PathBuf};

use common::{asset, hf_logits_info, json_summary, run, stderr};

/// Plain English prose written for these tests (no corpus needed).
const TEXT: &str = "The harbour was quiet in the early morning, and the boats lay still on \
the grey water while the gulls argued over the nets. An old man walked along the wall with a \
basket of bread, stopping now and then to look at the sky, which had the pale colour of milk. \
He had lived in the town for sixty years and had seen the river flood twice, once when he was \
a boy and once when his daughter was born. Nobody remembered the first flood but him.\n\n\
At the end of the wall there was a small house with a green door. The woman who lived there \
kept bees, and in summer the garden was loud with them. She sold honey at the market on \
Saturdays and gave the broken combs to the children, who followed her home like a procession. \
In the winter she mended sails for the fishermen and told stories about the islands to the \
north, where, she said, the sun did not set for a whole month and the birds never slept.\n\n\
One evening a stranger came to the town on the last coach. He carried a leather case and asked \
at the inn for a room facing the sea. The innkeeper, who was curious about everyone, asked him \
what his business was, and the stranger answered that he had come to count the stars, because \
somebody had to, and the sky over the harbour was the clearest he had ever found.\n";

fn work(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("finetune");
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn text_file() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("finetune-text.txt");
    std::fs::write(&p, TEXT.repeat(3)).unwrap();
    p
}

fn ok(args: &[&str]) -> serde_json::Value {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    json_summary(&o.stdout)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `pumice eval`'s perplexity of `dir` on the first 3 windows of 32 tokens of `text` (the
/// windows the fine-tunes below score).
fn eval_ppl(dir: &Path, text: &Path) -> f64 {
    eval_ppl_with(dir, text, "3", &[])
}

/// `pumice eval` on the first `windows` windows of 32 tokens, its perplexity.
fn eval_ppl_with(dir: &Path, text: &Path, windows: &str, extra: &[&str]) -> f64 {
    let mut args = vec![
        "eval",
        s(dir),
        "--text",
        s(text),
        "--ctx",
        "32",
        "--max-windows",
        windows,
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["perplexity"].as_f64().unwrap()
}

/// A small CALDERA compression of the asset model (made once per test binary).
fn caldera() -> &'static PathBuf {
    static C: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let text = text_file();
        let cal = work("caldera");
        ok(&[
            "compress",
            s(&asset()),
            "-o",
            s(&cal),
            "--json",
            "--calib",
            s(&text),
            "--calib-samples",
            "8",
            "--calib-len",
            "64",
            "--eval-samples",
            "0",
            "--outer-iters",
            "2",
        ]);
        cal
    })
}

/// finetune's arguments for a short job on `caldera()` with the test text.
fn tune_args<'a>(
    cal: &'a Path,
    out: &'a Path,
    text: &'a Path,
    steps: &'a str,
    lr: &'a str,
) -> Vec<&'a str> {
    vec![
        "finetune",
        s(cal),
        "-o",
        s(out),
        "--json",
        "--data",
        s(text),
        "--samples",
        "6",
        "--len",
        "32",
        "--batch",
        "2",
        "--steps",
        steps,
        "--lr",
        lr,
        "--eval-text",
        s(text),
        "--eval-windows",
        "3",
    ]
}

#[test]
fn caldera_factors_written_are_the_factors_trained() {
    let text = text_file();
    let cal = caldera().clone();
    let out = work("caldera-tuned");
    let sum = ok(&tune_args(&cal, &out, &text, "3", "2e-3"));
    let (before, after) = (&sum["before"], &sum["after"]);
    assert!(after["kl"].as_f64().unwrap().is_finite(), "{sum}");
    assert_eq!(sum["factor_bits"], 4, "{sum}");
    // The reader's perplexity of the written checkpoint on the same windows equals the
    // trainer's (quantization-aware: the passes used the factors as stored, rotation undone).
    let (p_in, p_out) = (eval_ppl(&cal, &text), eval_ppl(&out, &text));
    let want_before = before["perplexity"].as_f64().unwrap();
    let want_after = after["perplexity"].as_f64().unwrap();
    assert!(
        (p_in - want_before).abs() < 1e-4 * want_before,
        "before: eval {p_in} vs trainer {want_before}"
    );
    assert!(
        (p_out - want_after).abs() < 1e-4 * want_after,
        "after: eval {p_out} vs trainer {want_after}"
    );
    assert!(
        (p_out - p_in).abs() > 1e-6 * p_in,
        "training changed nothing: {p_in} → {p_out}"
    );
    // Same stored layout and size; the manifest records the fine-tune.
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert_eq!(size(&cal), size(&out));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pumice.json")).unwrap()).unwrap();
    assert_eq!(m["params"]["finetune"]["steps"], 3, "{}", m["params"]);
    let inspect = run(&["inspect", s(&out), "--check-weights"]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
}

#[test]
fn lora_adapter_loads_in_peft_and_computes_the_trained_model() {
    let text = text_file();
    let out = work("lora");
    let sum = ok(&[
        "finetune",
        s(&asset()),
        "-o",
        s(&out),
        "--json",
        "--lora-rank",
        "4",
        "--loss",
        "ce",
        "--data",
        s(&text),
        "--samples",
        "6",
        "--len",
        "32",
        "--batch",
        "2",
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--eval-text",
        s(&text),
        "--eval-windows",
        "2",
    ]);
    let want = sum["after"]["perplexity"].as_f64().unwrap();
    assert!(
        (want - sum["before"]["perplexity"].as_f64().unwrap()).abs() > 1e-6,
        "{sum}"
    );
    // The same windows through transformers + PEFT.
    let tok = pumice::model::Tokenizer::from_model_dir(&asset())
        .unwrap()
        .unwrap();
    let ids = tok
        .encode(&pumice::text::read_text(&text, pumice::text::Newlines::Universal).unwrap())
        .unwrap();
    let seqs: Vec<Vec<u32>> = ids.chunks(32).take(2).map(|c| c.to_vec()).collect();
    let (logits, info) = hf_logits_info(&asset(), &["--adapter".as_ref(), out.as_os_str()], &seqs);
    let v = logits.len() / 64;
    let mut nll = 0.0;
    for (b, seq) in seqs.iter().enumerate() {
        for i in 0..31 {
            let z = &logits[(b * 32 + i) * v..(b * 32 + i + 1) * v];
            let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            nll += lse - z[seq[i + 1] as usize] as f64;
        }
    }
    let got = (nll / 62.0).exp();
    assert!(
        (got - want).abs() < 1e-4 * want,
        "transformers + peft perplexity {got} vs the trainer's {want} ({info})"
    );
    // pumice's own forward with the adapter applied (`eval --lora`) agrees.
    let mine = eval_ppl_with(&asset(), &text, "2", &["--lora", s(&out)]);
    assert!(
        (mine - want).abs() < 1e-4 * want,
        "eval --lora {mine} vs {want}"
    );
}

/// A LoRA adapter trained on a CALDERA checkpoint: `eval --lora` stacks its factors with
/// the weight's own (Q + L·R + s·B·A) and scores what the trainer scored.
#[test]
fn lora_on_a_caldera_checkpoint_evaluates_as_trained() {
    let text = text_file();
    let cal = caldera().clone();
    let out = work("caldera-lora");
    let mut args = tune_args(&cal, &out, &text, "3", "1e-2");
    args.extend_from_slice(&["--lora-rank", "2"]);
    let sum = ok(&args);
    let want = sum["after"]["perplexity"].as_f64().unwrap();
    let before = sum["before"]["perplexity"].as_f64().unwrap();
    assert!((want - before).abs() > 1e-6, "{sum}");
    let got = eval_ppl_with(&cal, &text, "3", &["--lora", s(&out)]);
    assert!(
        (got - want).abs() < 1e-4 * want,
        "eval --lora {got} vs trainer {want}"
    );
    // A damaged adapter is refused before any work, naming the file and tensor.
    let bad = work("caldera-lora-bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(out.join(f), bad.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(bad.join("adapter_config.json")).unwrap();
    std::fs::write(
        bad.join("adapter_config.json"),
        cfg.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let o = run(&[
        "eval",
        s(&cal),
        "--text",
        s(&text),
        "--ctx",
        "32",
        "--lora",
        s(&bad),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("use_dora"), "{}", stderr(&o));
}

/// `--no-qat`: f32 factors rounded once when written, against the tuned model's own input
/// Hessians (R by LDLQ, L re-solved in the weighted norm): the same stored size, a checkpoint
/// the reader accepts, and the written model scores close to the f32 factors the trainer
/// scored (held-out perplexity within 2 %).
#[test]
fn factors_trained_in_f32_are_rounded_against_their_inputs() {
    let text = text_file();
    let cal = caldera().clone();
    let out = work("no-qat");
    let mut args = tune_args(&cal, &out, &text, "3", "2e-3");
    args.push("--no-qat");
    let sum = ok(&args);
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert_eq!(size(&cal), size(&out));
    let f32_ppl = sum["after"]["perplexity"].as_f64().unwrap();
    let stored = eval_ppl(&out, &text);
    assert!(
        (stored - f32_ppl).abs() < 0.02 * f32_ppl,
        "stored {stored} vs f32 {f32_ppl}"
    );
    assert!((stored - eval_ppl(&cal, &text)).abs() > 1e-6 * stored);
    let inspect = run(&["inspect", s(&out), "--check-weights"]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
}

/// `--max-resident-mb 0`: no frozen layer stays on the GPU — each pass reads and dequantizes
/// the layer again — and the result is the same bytes, for CALDERA's factors (the frozen
/// weight is Q alone) and for a LoRA on the same checkpoint (Q + L·R frozen), with less GPU
/// memory at the peak.
#[test]
fn streamed_layers_train_the_same_bytes_as_resident_ones() {
    let text = text_file();
    let cal = caldera().clone();
    for (name, extra, file) in [
        ("factors", &[][..], "model.safetensors"),
        (
            "lora",
            &["--lora-rank", "2"][..],
            "adapter_model.safetensors",
        ),
    ] {
        let mut runs = Vec::new();
        for mb in ["2048", "0"] {
            let out = work(&format!("streamed-{name}-{mb}"));
            let mut args = tune_args(&cal, &out, &text, "2", "1e-2");
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--max-resident-mb", mb]);
            let sum = ok(&args);
            runs.push((sum, std::fs::read(out.join(file)).unwrap()));
        }
        let ((held, a), (streamed, b)) = (&runs[0], &runs[1]);
        assert_eq!(held["resident_layers"], 6, "{name}: {held}");
        assert_eq!(streamed["resident_layers"], 0, "{name}: {streamed}");
        assert!(a == b, "{name}: the streamed run wrote other bytes");
        assert_eq!(held["after"]["kl"], streamed["after"]["kl"], "{name}");
        let peak = |v: &serde_json::Value| v["peak_gpu_bytes"].as_u64().unwrap();
        assert!(
            peak(streamed) < peak(held),
            "{name}: peak {} streamed vs {} resident",
            peak(streamed),
            peak(held)
        );
    }
}

#[test]
fn bad_finetune_input_is_refused_before_any_work() {
    let text = text_file();
    let out = work("refused");
    let model = asset();
    let cases: [(&[&str], &str); 4] = [
        // A plain model has no factors to tune.
        (&["--data", s(&text)], "not a pumice-compressed checkpoint"),
        (
            &[
                "--lora-rank",
                "2",
                "--lora-targets",
                "qkv",
                "--teacher",
                s(&model),
            ],
            "unknown linear",
        ),
        (
            &["--lora-rank", "2", "--loss", "ce"],
            "--loss ce needs --data",
        ),
        (
            &["--lora-rank", "2", "--teacher", s(&model), "--len", "1"],
            "--len must be at least 2",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["finetune", s(&model), "-o", s(&out)];
        args.extend_from_slice(extra);
        let o = run(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
}

#[test]
fn sigkill_then_resume_is_byte_identical() {
    let text = text_file();
    let cal = caldera().clone();
    let whole = work("resume-whole");
    ok(&tune_args(&cal, &whole, &text, "6", "2e-3"));
    let out = work("resume-out");
    let wd = work("resume-wd");
    let mut args = tune_args(&cal, &out, &text, "6", "2e-3");
    args.extend_from_slice(&["--work-dir", s(&wd), "--save-every", "1"]);
    // Kill at spread-out moments; every later run resumes.
    let mut kills = 0;
    let mut finished = false;
    for (i, delay_ms) in [700u64, 1300, 1900, 2600, 3400].into_iter().enumerate() {
        let mut a = args.clone();
        if i > 0 {
            a.push("--resume");
        }
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
            .args(&a)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
        } else {
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            finished = true;
            break;
        }
    }
    if !finished {
        let mut a = args.clone();
        a.push("--resume");
        ok(&a);
    }
    assert!(kills > 0, "every run finished before its kill");
    for f in ["model.safetensors", "pumice.json"] {
        assert_eq!(
            std::fs::read(whole.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f} differs after {kills} kills"
        );
    }
    // A work directory is never reused silently.
    let mut again = args.clone();
    again.push("--force");
    let o = run(&again);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    let mut other = tune_args(&cal, &out, &text, "6", "1e-3");
    other.extend_from_slice(&["--work-dir", s(&wd), "--resume", "--force"]);
    let o = run(&other);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("other inputs or options"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn adaptive_layer_tuning_writes_what_it_trained() {
    let text = text_file();
    let cal = caldera().clone();
    let out = work("windows");
    let mut args = tune_args(&cal, &out, &text, "3", "2e-3");
    args.extend_from_slice(&["--exit-every", "2", "--window", "2"]);
    let sum = ok(&args);
    let after = sum["after"]["perplexity"].as_f64().unwrap();
    let got = eval_ppl(&out, &text);
    assert!(
        (got - after).abs() < 1e-4 * after,
        "eval {got} vs trainer {after}"
    );
    assert!(
        (after - sum["before"]["perplexity"].as_f64().unwrap()).abs() > 1e-6,
        "{sum}"
    );
    // The exits are stored (after layers 2 and 4 of 6), checksummed and counted in the size.
    let exits = out.join("exits.safetensors");
    let bytes = std::fs::metadata(&exits).unwrap().len();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pumice.json")).unwrap()).unwrap();
    assert_eq!(manifest["files"]["exits.safetensors"]["bytes"], bytes);
    let model_bytes = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(manifest["total"]["bits"], (model_bytes + bytes) * 8);
    assert_eq!(sum["output_bytes"], model_bytes + bytes, "{sum}");
    let o = run(&["inspect", s(&out), "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["exits"], serde_json::json!([2, 4]), "{info}");
    assert_eq!(info["bytes_on_disk"], model_bytes + bytes, "{info}");
    // Voting reads them: a different perplexity from the model's head alone.
    let o = run(&[
        "eval",
        s(&out),
        "--text",
        s(&text),
        "--ctx",
        "32",
        "--max-windows",
        "3",
        "--json",
        "--vote",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["vote_exits"], serde_json::json!([2, 4]), "{v}");
    let voted = v["perplexity"].as_f64().unwrap();
    assert!(
        voted.is_finite() && (voted - got).abs() > 1e-6,
        "{voted} vs {got}"
    );
}
