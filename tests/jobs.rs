//! Headless jobs through the binary: JSON lines on non-terminal stdout, interruption (SIGKILL
//! at random points, SIGTERM) and `--resume`, and Hessians → shards → merge — each final
//! checkpoint compared byte for byte with an uninterrupted single run.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{asset, json_lines, json_summary, run, stderr};
use rand::Rng;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pumice"))
}

/// A calibration text (no ../shared needed).
fn calib_text(dir: &Path) -> PathBuf {
    let p = dir.join("calib.txt");
    let text = "It was a bright cold day in April, and the clocks were striking thirteen. The \
                hallway smelt of boiled cabbage and old rag mats. At one end of it a coloured \
                poster, too large for indoor display, had been tacked to the wall. ";
    let more = "Call me Ishmael. Some years ago, never mind how long precisely, having little \
                or no money in my purse, I thought I would sail about a little. ";
    std::fs::write(&p, format!("{}{}", text.repeat(40), more.repeat(40))).unwrap();
    p
}

/// Assert two directories hold the same file names with the same bytes.
fn assert_same_dirs(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    assert_eq!(
        na,
        nb,
        "{} and {} list different files",
        a.display(),
        b.display()
    );
    for n in na {
        let (x, y) = (
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)).unwrap(),
        );
        assert!(
            x == y,
            "{n} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Entries of `dir` whose names start with `prefix`.
fn leftovers(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Compress arguments shared by a test's runs (GPTQ, text calibration: quick, deterministic).
fn gptq_args(calib: &Path) -> Vec<String> {
    [
        "--method",
        "gptq",
        "--calib",
        calib.to_str().unwrap(),
        "--calib-samples",
        "16",
        "--calib-len",
        "128",
        "--eval-samples",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn compress_stdout_is_json_lines_when_not_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = run(&[
        "compress",
        asset().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--method",
        "rtn",
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
        "--eval-samples",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Every line parses; the summary comes last.
    let lines = json_lines(&o.stdout);
    let s = json_summary(&o.stdout);
    assert_eq!(lines[0]["event"], "start");
    assert!(s["linear_bits_per_parameter"].as_f64().unwrap() > 4.0);
    let progress: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "progress" && l["stage"] == "quantize")
        .collect();
    assert_eq!(progress.len(), 42);
    let last = progress.last().unwrap();
    assert_eq!(last["fraction"].as_f64(), Some(1.0));
    assert_eq!(last["eta_s"].as_f64(), Some(0.0));
    assert!(last["elapsed_s"].as_f64().unwrap() > 0.0);
    assert!(last["matrix"]
        .as_str()
        .unwrap()
        .ends_with("down_proj.weight"));
    assert_eq!(lines.iter().filter(|l| l["event"] == "layer").count(), 6);
    // Human-readable logs go to stderr.
    assert!(stderr(&o).contains("compressing"), "{}", stderr(&o));
}

#[test]
fn sigkill_at_random_points_then_resume_is_byte_identical() {
    let d = tempfile::tempdir().unwrap();
    let calib = calib_text(d.path());
    let args = gptq_args(&calib);
    let model = asset();
    let compress = |out: &Path, extra: &[&str]| {
        let mut c = bin();
        c.arg("compress")
            .arg(&model)
            .arg("-o")
            .arg(out)
            .args(&args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    // The uninterrupted run, timed.
    let reference = d.path().join("reference");
    let t0 = Instant::now();
    let o = compress(&reference, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let t = t0.elapsed();

    let seed: u64 = rand::rng().random();
    eprintln!("kill times drawn with seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let out = d.path().join("out");
    let work = d.path().join("work");
    let w = work.to_str().unwrap();
    let mut kills = 0;
    let mut layers_seen = Vec::new();
    // Resumed runs have less left to do, so kills come early enough to land in most of them.
    for _ in 0..5 {
        let mut child = compress(&out, &["--work-dir", w, "--resume"])
            .spawn()
            .unwrap();
        std::thread::sleep(t.mul_f64(rng.random_range(0.15..0.6)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL: no chance to clean up
            kills += 1;
        }
        child.wait().unwrap();
        layers_seen.push(leftovers(&work, "layer-").len());
        // The output appears only complete (renamed into place), so it is the final one.
        if out.exists() {
            break;
        }
    }
    eprintln!("{kills} kills; finished layers after each run: {layers_seen:?}");
    if !out.exists() {
        let o = compress(&out, &["--work-dir", w, "--resume"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert!(kills > 0, "every run finished before its kill");
    assert_same_dirs(&reference, &out);
    // Temporary directories of killed runs are gone once a later run finishes.
    assert!(leftovers(d.path(), ".out.pumice-tmp").is_empty());
}

#[cfg(unix)]
#[test]
fn sigterm_stops_at_a_matrix_and_says_how_to_resume() {
    let d = tempfile::tempdir().unwrap();
    let calib = calib_text(d.path());
    let args = gptq_args(&calib);
    let out = d.path().join("out");
    let work = d.path().join("work");
    let run_args = |resume: bool| {
        let mut v: Vec<String> = vec![
            "compress".into(),
            asset().to_str().unwrap().into(),
            "-o".into(),
            out.to_str().unwrap().into(),
            "--work-dir".into(),
            work.to_str().unwrap().into(),
        ];
        v.extend(args.iter().cloned());
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let mut child = bin()
        .args(run_args(false))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the second layer's first matrix, then SIGTERM.
    let mut lines = Vec::new();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut sent = false;
    while reader.read_line(&mut line).unwrap() > 0 {
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        if !sent && v["event"] == "progress" && v["layer"] == 1 {
            let st = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            sent = true;
        }
        lines.push(v);
        line.clear();
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(sent, "no progress line for layer 1 arrived");
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["exit_code"], 130);
    assert!(!out.exists());
    assert!(leftovers(d.path(), ".out.pumice-tmp").is_empty());
    // Layer 0 was kept; the run continues from there.
    assert!(!leftovers(&work, "layer-").is_empty());
    let o = bin().args(run_args(true)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let notes: Vec<_> = json_lines(&o.stdout)
        .into_iter()
        .filter(|l| l["event"] == "note")
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n["message"].as_str().unwrap().starts_with("resuming")),
        "{notes:?}"
    );
    // Without --resume a started work directory is refused.
    let o = bin()
        .args(run_args(false))
        .args(["--force"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pass --resume"), "{}", stderr(&o));
}

#[test]
fn two_shards_and_merge_match_a_single_run() {
    let d = tempfile::tempdir().unwrap();
    let calib = calib_text(d.path());
    let model = asset();
    let m = model.to_str().unwrap();
    let h = d.path().join("hessians");
    let o = run(&[
        "hessians",
        m,
        "-o",
        h.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--calib-samples",
        "16",
        "--calib-len",
        "128",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_summary(&o.stdout)["layers"], 6);
    let common_args = [
        "--hessians",
        h.to_str().unwrap(),
        "--method",
        "caldera",
        "--outer-iters",
        "2",
        "--eval-samples",
        "0",
    ];
    let single = d.path().join("single");
    let o = run(&[
        &["compress", m, "-o", single.to_str().unwrap()][..],
        &common_args,
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));

    let work = d.path().join("work");
    let w = work.to_str().unwrap();
    let o = run(&[
        &["compress", m, "--work-dir", w, "--shard", "0/2"][..],
        &common_args,
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_summary(&o.stdout)["shard"], "0/2: layers 0..3");

    // Merging before every shard finished names what is missing.
    let merged = d.path().join("merged");
    let o = run(&["merge", w, "-o", merged.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("layers 3, 4, 5 are not finished"),
        "{}",
        stderr(&o)
    );
    assert!(!merged.exists());

    // A shard with other arguments is refused, naming the difference.
    let o = run(&[
        &[
            "compress",
            m,
            "--work-dir",
            w,
            "--shard",
            "1/2",
            "--target-bpw",
            "3",
        ][..],
        &common_args,
    ]
    .concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("caldera was"), "{}", stderr(&o));

    // The second shard takes its index from a Slurm array task's environment.
    let o = bin()
        .args([&["compress", m, "--work-dir", w][..], &common_args].concat())
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_MIN", "0")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_summary(&o.stdout)["shard"], "1/2: layers 3..6");

    let o = run(&["merge", w, "-o", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_dirs(&single, &merged);
    let man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("pumice.json")).unwrap())
            .unwrap();
    assert_eq!(man["params"]["sequential"], false);
    assert_eq!(man["calibration"]["samples"], 16);
}

/// Hessians made from one model are refused for another.
#[test]
fn hessians_of_another_model_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let h = d.path().join("h");
    let o = run(&[
        "hessians",
        asset().to_str().unwrap(),
        "-o",
        h.to_str().unwrap(),
        "--calib-samples",
        "2",
        "--calib-len",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let other = d.path().join("other");
    common::TinyLlama::default().write(&other);
    let o = run(&[
        "compress",
        other.to_str().unwrap(),
        "-o",
        d.path().join("x").to_str().unwrap(),
        "--hessians",
        h.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(errors[0].contains("Hessians of another model"), "{e}");
}

/// Peak memory while compressing synthetic checkpoints of 2 and 8 layers of the same shape:
/// the process's peak resident set and the GPU's peak grow by far less than the extra
/// weights, i.e. the pipeline holds about one layer at a time.
#[test]
fn peak_memory_stays_near_one_layer_as_the_model_grows() {
    use pumice::model::synthetic::SyntheticLlama;
    let d = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    for layers in [2usize, 8] {
        let mut s = SyntheticLlama {
            hidden: 512,
            intermediate: 1376,
            layers,
            heads: 8,
            kv_heads: 8,
            vocab: 256,
            dtype: pumice::DType::F32,
            seed: 5,
            architecture: "LlamaForCausalLM".into(),
            extra: Default::default(),
        };
        s.extra.insert("bos_token_id".into(), 1.into());
        let model = d.path().join(format!("m{layers}"));
        s.write(&model).unwrap();
        let bytes = std::fs::metadata(model.join("model.safetensors"))
            .unwrap()
            .len();
        let out = d.path().join(format!("q{layers}"));
        let o = run(&[
            "compress",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--method",
            "gptq",
            "--calib-samples",
            "4",
            "--calib-len",
            "64",
            "--eval-samples",
            "0",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = json_summary(&o.stdout);
        // Where the time went: every stage of a calibrated run took some, and together they
        // account for the run (the rest is the summary's own bookkeeping).
        let st = &s["stages"];
        let parts: Vec<f64> = [
            "calibration",
            "hessians",
            "quantization",
            "propagation",
            "writing",
        ]
        .iter()
        .map(|k| {
            st[k]
                .as_f64()
                .unwrap_or_else(|| panic!("stages.{k} in {st}"))
        })
        .collect();
        assert!(parts.iter().all(|&t| t > 0.0), "{st}");
        let total = s["seconds"].as_f64().unwrap();
        let sum: f64 = parts.iter().sum();
        assert!(
            sum <= total * 1.001 && sum >= 0.9 * total,
            "stages {st} sum to {sum}, the run took {total}"
        );
        let rss = s["peak_rss_bytes"].as_u64();
        let gpu = s["peak_gpu_bytes"].as_u64().unwrap();
        eprintln!(
            "{layers} layers: checkpoint {:.1} MiB, peak RSS {}, peak GPU {:.1} MiB",
            bytes as f64 / 1048576.0,
            rss.map(|r| format!("{:.1} MiB", r as f64 / 1048576.0))
                .unwrap_or_else(|| "n/a".into()),
            gpu as f64 / 1048576.0
        );
        peaks.push((bytes, rss, gpu));
    }
    let (small, large) = (peaks[0], peaks[1]);
    let extra_weights = (large.0 - small.0) as f64;
    // GPU: one layer's working set regardless of depth.
    assert!(
        (large.2 as f64 - small.2 as f64) < 0.05 * extra_weights,
        "GPU peak grew from {} to {} bytes for {extra_weights} more bytes of weights",
        small.2,
        large.2
    );
    // Holding every layer would add at least the extra weights (twice on a CPU adapter, whose
    // GPU buffers are host memory); allocator noise is a few tens of MiB at most.
    if let (Some(a), Some(b)) = (small.1, large.1) {
        assert!(
            (b as f64 - a as f64) < 0.5 * extra_weights,
            "peak RSS grew from {a} to {b} bytes for {extra_weights} more bytes of weights"
        );
    }
}

/// `pumice bench --quick --json` covers every adapter `pumice devices` lists (on CI: lavapipe
/// through Vulkan and llvmpipe through GL) with GEMM GFLOP/s, beside the faer baseline.
#[test]
fn bench_reports_every_adapter_and_the_cpu_baseline() {
    let o = run(&["devices", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let devices: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!devices.is_empty(), "no GPU adapter");
    let o = run(&[
        "bench", "--quick", "--json", "--only", "gemm", "--runs", "1", "--warmup", "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o.stdout);
    let s = json_summary(&o.stdout);
    let results = s["results"].as_array().unwrap();
    assert_eq!(
        lines.iter().filter(|l| l["event"] == "result").count(),
        results.len()
    );
    for d in &devices {
        let rows: Vec<_> = results
            .iter()
            .filter(|r| r["backend"] == d["backend"] && r["adapter"] == d["name"])
            .collect();
        assert_eq!(
            rows.len(),
            4,
            "GEMM shapes on {} ({})",
            d["name"],
            d["backend"]
        );
        for r in rows {
            assert!(r["error"].is_null(), "{r}");
            assert!(r["gflops"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["driver_info"].is_string());
        }
    }
    let cpu = results.iter().filter(|r| r["backend"] == "cpu").count();
    assert_eq!(cpu, 4);
    assert!(s["machine"]["cpu"].is_string());
    assert_eq!(s["adapters"].as_array().unwrap().len(), devices.len());
}

/// `--help` documents the exit codes, 130 (interrupted) included, and the JSON-lines output.
#[test]
fn help_documents_exit_codes_and_json_lines() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for code in [
        "    0  success",
        "    1  the machine failed",
        "    2  bad input",
        "  130  interrupted",
    ] {
        assert!(text.contains(code), "{code} missing from --help:\n{text}");
    }
    assert!(text.contains("JSON lines"), "{text}");
}

/// A damaged work directory (a truncated layer file, a job file that is not JSON) is refused
/// with one line naming the file, not a panic and not a silently different output.
#[test]
fn damaged_work_directory_files_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("work");
    let out = d.path().join("out");
    let args = |resume: bool| {
        let mut v = vec![
            "compress".to_string(),
            asset().to_str().unwrap().into(),
            "-o".into(),
            out.to_str().unwrap().into(),
            "--work-dir".into(),
            work.to_str().unwrap().into(),
            "--method".into(),
            "rtn".into(),
            "--calib-samples".into(),
            "2".into(),
            "--calib-len".into(),
            "32".into(),
            "--eval-samples".into(),
            "0".into(),
        ];
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let o = bin().args(args(false)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(&out).unwrap();
    let layer = work.join("layer-00002.bin");
    let bytes = std::fs::read(&layer).unwrap();
    std::fs::write(&layer, &bytes[..bytes.len() / 2]).unwrap();
    let o = bin().args(args(true)).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(
        errors[0].contains("layer-00002.bin") && errors[0].contains("truncated"),
        "{e}"
    );
    assert!(!out.exists());

    std::fs::write(work.join("job.json"), b"{ not json").unwrap();
    let o = bin().args(args(true)).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("job.json"), "{}", stderr(&o));
}
