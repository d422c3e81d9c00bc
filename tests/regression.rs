//! One test per fixed bug.

mod common;

use common::{gpu, random};
use pumice::cpu;
use pumice::gpu::{gemm, Batch, GemmOp, GpuMatrix};
use pumice::DType;

/// A buffer dropped by its owner after a dispatch reading it was recorded, but before the batch
/// was submitted, went back to the pool; the next allocation of its size class got it and a
/// queued upload overwrote it before the recorded dispatch ran (and, with a full pool, it was
/// destroyed: "Buffer has been destroyed" at bind-group creation). Seen in `compress`, whose
/// layer stages drop q/k/v before the layer's batch is submitted.
#[test]
fn buffers_recorded_in_a_batch_outlive_their_owner_until_submit() {
    let g = gpu();
    let n = 32;
    let a_vals = random(n * n, 1, 0.0);
    let b_vals = random(n * n, 2, 0.0);
    let b = GpuMatrix::from_f32(&g, n, n, DType::F32, &b_vals).unwrap();
    let c = GpuMatrix::uninit(&g, n, n).unwrap();
    let mut batch = Batch::new(&g);
    {
        let a = GpuMatrix::from_f32(&g, n, n, DType::F32, &a_vals).unwrap();
        gemm(&mut batch, &a, &b, GemmOp::NN, &c, false).unwrap();
        // `a` is dropped here, before submission.
    }
    // Same size class, uploaded (queue write) before the batch is submitted.
    let other = GpuMatrix::from_f32(&g, n, n, DType::F32, &vec![1000.0; n * n]).unwrap();
    batch.submit().unwrap();
    let got = c.to_f32(&g).unwrap();
    let want = cpu::gemm_f64(&a_vals, &b_vals, n, n, n, false);
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    assert!(
        err < 1e-4,
        "the recorded dispatch read recycled memory (max |Δ| {err})"
    );
    drop(other);
}

/// `compress` rebuilt the zero points of symmetric grids itself (as 2^bits/2) when it
/// dequantized a packed matrix to propagate activations and report errors, while the reader
/// used the grid's own zero (midrise (2^bits − 1)/2): every propagated weight was off by half a
/// step and the reported errors were wrong. Now one function builds them; here the error the
/// manifest reports for layer 0's q_proj must be the H-weighted error of what the reader
/// dequantizes, with H recomputed on the CPU from the same calibration tokens.
#[test]
fn compress_and_reader_agree_on_symmetric_zero_points() {
    use pumice::compress::calib::{self, CalibOptions};
    use pumice::compress::pipeline::{compress, CalibSource, CompressOptions, Method};
    use pumice::model::checkpoint::Checkpoint;
    use pumice::model::tokenizer::Tokenizer;
    use pumice::quant::reference::weighted_error;
    use pumice::quant::{GptqOptions, Grid};
    let g = gpu();
    let model = common::project_root().join("assets/models/gutenberg-llama");
    let src = Checkpoint::open(&model).unwrap();
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("calib.txt");
    let para = "It was the best of times, it was the worst of times; the river ran cold and grey \
                under the old stone bridge, and nobody in the village could say why. ";
    std::fs::write(&text, para.repeat(20)).unwrap();
    let copts = CalibOptions {
        samples: 4,
        len: 32,
        seed: 3,
        newlines: Default::default(),
    };
    let out = d.path().join("sym");
    let grid = Grid::new(4, 64, true).unwrap();
    let o = CompressOptions {
        layers: Vec::new(),
        allocation: None,
        sparsity: Default::default(),
        method: Method::Rtn,
        grid,
        gptq: GptqOptions::default(),
        calib_source: CalibSource::Text(vec![text.clone()]),
        calib: copts.clone(),
        caldera: Default::default(),
        output: out.clone(),
        force: false,
        rht: false,
        hessians: None,
        work_dir: None,
        resume: false,
        shard: None,
    };
    compress(&g, &src, &o, &mut |_| {}).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let w = src.tensor(name).unwrap().to_f32().unwrap();
    let got = common::reader_weight(&g, &ck, name);
    let q = ck.quantized(name).unwrap();
    let (m, n) = (q.rows, q.cols);
    assert_eq!(
        got,
        pumice::quant::reference::rtn(&w, m, n, grid).dequantize()
    );
    // H of layer 0's attention input: RMSNorm(embedding) of the calibration tokens.
    let tok = Tokenizer::from_model_dir(&model).unwrap().unwrap();
    let c = calib::from_text(&tok, &[text], &copts).unwrap();
    let emb = src
        .tensor("model.embed_tokens.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    let norm = src
        .tensor("model.layers.0.input_layernorm.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    let eps = src.config().rms_norm_eps;
    let mut h = vec![0.0f64; n * n];
    for &t in &c.tokens {
        let x = &emb[t as usize * n..(t as usize + 1) * n];
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
        let r = 1.0 / (ms + eps).sqrt();
        let y: Vec<f64> = x
            .iter()
            .zip(&norm)
            .map(|(a, b)| *a as f64 * r * *b as f64)
            .collect();
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] += y[i] * y[j];
            }
        }
    }
    let actual = weighted_error(&w, &got, m, &h) / weighted_error(&w, &vec![0.0; m * n], m, &h);
    let reported = q.relative_error.expect("error reported");
    assert!(
        (reported - actual).abs() <= 1e-3 * actual,
        "reported {reported}, error of the stored weight {actual}"
    );
}

/// GPTQ bound only the first chunk of the block's diagonal of U: with a binding limit below
/// block² · 4 bytes (here 4 KiB for a 64-column block) the kernel read past the chunk and the
/// result was garbage (relative error ~3 instead of ~1e-4). Blocks now shrink to fit.
#[test]
fn gptq_block_larger_than_a_binding() {
    use pumice::gpu::quant::gptq;
    use pumice::quant::reference::{self, weighted_error, weighted_norm};
    use pumice::quant::{GptqOptions, Grid};
    let g = common::gpu_limited(4096);
    let (m, n) = (37, 64);
    let x = random(300 * n, 5, 0.0);
    let h = cpu::hessian_f64(&x, 300, n);
    let w = random(m * n, 6, 0.0);
    let prep = reference::prepare_hessian(&h, n, &GptqOptions::default()).unwrap();
    let grid = Grid::new(4, 32, false).unwrap();
    let want = reference::gptq(&w, m, n, &prep, grid, 64);
    let got = gptq(&g, &w, m, n, &prep, grid, 64)
        .unwrap()
        .download(&g)
        .unwrap();
    let norm = weighted_norm(&w, m, &h);
    let (e_ref, e_gpu) = (
        weighted_error(&w, &want.dequantize(), m, &h) / norm,
        weighted_error(&w, &got.dequantize(), m, &h) / norm,
    );
    assert!(
        (e_gpu - e_ref).abs() <= 0.01 * e_ref,
        "GPU {e_gpu:.4e} vs reference {e_ref:.4e}"
    );
}

/// A missing file's OS error was printed twice ("…: No such file or directory (os error 2): No
/// such file or directory (os error 2)"): the binary printed the error chain, whose cause our
/// own message already quotes.
#[test]
fn missing_file_error_names_its_cause_once() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args([
            "eval",
            "assets/models/gutenberg-llama",
            "--text",
            "/nonexistent/pumice.txt",
        ])
        .current_dir(common::project_root())
        .output()
        .unwrap();
    // A missing input file is bad input (exit 2), see `unreadable_inputs_are_bad_input`.
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .expect("an error line");
    assert!(line.contains("/nonexistent/pumice.txt"), "{line}");
    assert_eq!(line.matches("os error 2").count(), 1, "{line}");
}

/// Work-directory layer files keep manifest entries as JSON. serde_json's default float parser
/// can be one ULP off, so a resumed run wrote a relative error of 0.0009729464511345144 where
/// the uninterrupted run wrote …145 and the manifests differed. Floats must round-trip exactly.
#[test]
fn json_floats_round_trip_bit_for_bit() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut values = vec![0.000_972_946_451_134_514_5_f64, 0.001_022_803_314_777_241_5];
    values.extend((0..20_000).map(|_| rng.random::<f64>() * 10f64.powi(rng.random_range(-12..4))));
    for v in values {
        let text = serde_json::to_string(&v).unwrap();
        let back: f64 = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back.to_bits(),
            v.to_bits(),
            "{v:e} came back as {back:e} via {text}"
        );
    }
}

/// Run the binary in the project root; returns (exit code, stderr).
fn pumice(args: &[&str]) -> (Option<i32>, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(args)
        .current_dir(common::project_root())
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn error_line(err: &str) -> String {
    err.lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_else(|| panic!("no error line in {err}"))
        .to_string()
}

/// `--text`, `--token-file` and `--calib` files that cannot be read exited 1 (a machine
/// fault); they are bad input: exit 2, naming the file.
#[test]
fn unreadable_inputs_are_bad_input() {
    let model = "assets/models/gutenberg-llama";
    for args in [
        vec!["eval", model, "--text", "/nonexistent/a.txt"],
        vec!["eval", model, "--token-file", "/nonexistent/a.txt"],
        vec![
            "compress",
            model,
            "-o",
            "/tmp/pumice-never",
            "--calib",
            "/nonexistent/a.txt",
        ],
    ] {
        let (code, err) = pumice(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(error_line(&err).contains("/nonexistent/a.txt"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A config.json with a huge `num_hidden_layers` made arch.rs allocate before checking
/// anything (abort: capacity overflow / out of memory).
#[test]
fn huge_config_dimensions_are_refused_not_allocated() {
    let d = tempfile::tempdir().unwrap();
    let src = common::project_root().join("assets/models/gutenberg-llama");
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    for (key, value) in [
        ("num_hidden_layers", "6", "1000000000000"),
        ("vocab_size", "4096", "18446744073709551615"),
    ]
    .map(|(k, old, new)| {
        (
            k,
            config.replace(&format!("\"{k}\": {old}"), &format!("\"{k}\": {new}")),
        )
    }) {
        std::fs::write(d.path().join("config.json"), &value).unwrap();
        let (code, err) = pumice(&["inspect", d.path().to_str().unwrap()]);
        assert_eq!(code, Some(2), "{key}: {err}");
        let line = error_line(&err);
        assert!(line.contains("config.json") && line.contains(key), "{line}");
    }
}

/// A huge `eval --ctx` built the RoPE table (ctx × head_dim/2 floats) before the context was
/// checked against the text: abort. It is refused first, naming the text.
#[test]
fn huge_eval_context_is_refused_before_gpu_work() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t.txt");
    std::fs::write(&t, "A short text of a few tokens.").unwrap();
    for ctx in ["18446744073709551615", "100000000", "1"] {
        let (code, err) = pumice(&[
            "eval",
            "assets/models/gutenberg-llama",
            "--text",
            t.to_str().unwrap(),
            "--ctx",
            ctx,
        ]);
        assert_eq!(code, Some(2), "--ctx {ctx}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Sampling and budget values that make no sense were accepted: --temperature NaN, --top-p 2,
/// --top-p NaN, --target-bpw NaN, --target-bpw 0.1.
#[test]
fn nonsense_numbers_are_refused() {
    let model = "assets/models/gutenberg-llama";
    for args in [
        vec!["generate", model, "--temperature", "NaN"],
        vec!["generate", model, "--temperature", "-1"],
        vec!["generate", model, "--top-p", "2"],
        vec!["generate", model, "--top-p", "NaN"],
        vec!["generate", model, "--top-p", "0"],
        vec![
            "compress",
            model,
            "-o",
            "/tmp/pumice-never",
            "--target-bpw",
            "NaN",
        ],
        vec![
            "compress",
            model,
            "-o",
            "/tmp/pumice-never",
            "--target-bpw",
            "0.1",
        ],
        vec![
            "compress",
            model,
            "-o",
            "/tmp/pumice-never",
            "--target-bpw",
            "inf",
        ],
    ] {
        let (code, err) = pumice(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new("/tmp/pumice-never").exists());
}

/// `compress -o X --work-dir X` was accepted and the work directory silently replaced at the
/// end (and `merge W -o W --force` replaced the work directory it read). An output that is,
/// contains or lies inside the work directory is refused before any work; a --work-dir that
/// is a regular file is refused by name instead of a raw OS error.
#[test]
fn output_never_replaces_the_work_directory() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("w");
    let model = "assets/models/gutenberg-llama";
    for (out, work) in [
        (w.clone(), w.clone()),
        (w.join("out"), w.clone()),
        (d.path().to_path_buf(), w.clone()),
    ] {
        let (code, err) = pumice(&[
            "compress",
            model,
            "--method",
            "rtn",
            "-o",
            out.to_str().unwrap(),
            "--work-dir",
            work.to_str().unwrap(),
            "--force",
        ]);
        assert_eq!(code, Some(2), "{err}");
        assert!(error_line(&err).contains("work directory"), "{err}");
    }
    let file = d.path().join("plain-file");
    std::fs::write(&file, "not a directory").unwrap();
    let (code, err) = pumice(&[
        "compress",
        model,
        "--method",
        "rtn",
        "-o",
        d.path().join("o").to_str().unwrap(),
        "--work-dir",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    let line = error_line(&err);
    assert!(
        line.contains("plain-file") && line.contains("not a directory"),
        "{line}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
}
