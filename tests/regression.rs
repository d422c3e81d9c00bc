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
    use pumice::quant::{GptqOptions, Grid, GridKind};
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
        hessians_on: Default::default(),
    };
    let out = d.path().join("sym");
    let grid = Grid::new(4, 64, GridKind::Midrise).unwrap();
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
        format: pumice::format::FormatKind::Native,
        dtype: None,
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
    use pumice::quant::{GptqOptions, Grid, GridKind};
    let g = common::gpu_limited(4096);
    let (m, n) = (37, 64);
    let x = random(300 * n, 5, 0.0);
    let h = cpu::hessian_f64(&x, 300, n);
    let w = random(m * n, 6, 0.0);
    let prep = reference::prepare_hessian(&h, n, &GptqOptions::default()).unwrap();
    let grid = Grid::new(4, 32, GridKind::Asymmetric).unwrap();
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
    // merge W -o W --force (and outputs around W) once replaced the directory it read.
    let job = quick(&d.path().join("o"), &["--work-dir", w.to_str().unwrap()]);
    run_ok(&job);
    let before = entries_with(&w, "");
    for out in [w.clone(), w.join("merged"), d.path().to_path_buf()] {
        let (code, err) = pumice(&[
            "merge",
            w.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--force",
        ]);
        assert_eq!(code, Some(2), "{err}");
        assert!(error_line(&err).contains("work directory"), "{err}");
    }
    assert_eq!(entries_with(&w, ""), before);
    std::fs::remove_dir_all(d.path().join("o")).unwrap();
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

// ---- Work directories, Hessian directories and outputs under hostile conditions ----

const MODEL: &str = "assets/models/gutenberg-llama";

/// Run the binary in the project root with extra environment variables.
fn pumice_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(common::project_root())
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Exactly one error line, naming every one of `names`; exit 2; no panic.
fn refused(code: Option<i32>, err: &str, names: &[&str]) {
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    for n in names {
        assert!(errors[0].contains(n), "`{n}` not named in: {}", errors[0]);
    }
}

/// Quick GPTQ compression arguments (calibration on the model's own sample text).
fn quick(out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "compress",
        MODEL,
        "-o",
        out.to_str().unwrap(),
        "--method",
        "gptq",
        "--calib-samples",
        "2",
        "--calib-len",
        "32",
        "--eval-samples",
        "0",
    ]
    .map(String::from)
    .to_vec();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_ok(args: &[String]) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = pumice(&a);
    assert_eq!(code, Some(0), "{args:?}: {err}");
}

fn run_args(args: &[String]) -> (Option<i32>, String) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    pumice(&a)
}

/// Entries of `dir` whose names contain `part`.
fn entries_with(dir: &std::path::Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect()
}

/// A work-file container split into magic, JSON header and data (the layout ARCHITECTURE.md
/// gives: magic, u64 header length, header, blobs, SHA-256 of all before).
fn split_container(bytes: &[u8]) -> ([u8; 8], serde_json::Value, Vec<u8>) {
    let hlen = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[16..16 + hlen]).unwrap();
    (
        bytes[..8].try_into().unwrap(),
        header,
        bytes[16 + hlen..bytes.len() - 32].to_vec(),
    )
}

/// The inverse, with a correct checksum (a hostile file that is not merely damaged).
fn make_container(magic: &[u8; 8], header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut v = magic.to_vec();
    v.extend_from_slice(&(h.len() as u64).to_le_bytes());
    v.extend_from_slice(&h);
    v.extend_from_slice(data);
    let d = sha2::Sha256::digest(&v);
    v.extend_from_slice(&d);
    v
}

/// A finished quick job in `root/work` whose output `root/out` was removed again: (work
/// directory, output, the arguments that resume it).
fn finished_job(
    root: &std::path::Path,
    work: &str,
    out: &str,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<String>) {
    let (w, out) = (root.join(work), root.join(out));
    let mut job = quick(&out, &["--work-dir", w.to_str().unwrap()]);
    run_ok(&job);
    std::fs::remove_dir_all(&out).unwrap();
    job.push("--resume".into());
    (w, out, job)
}

/// `pumice hessians` of the asset model into `dir` (quick calibration).
fn save_hessians(dir: &std::path::Path) {
    run_ok(
        &[
            "hessians",
            MODEL,
            "-o",
            dir.to_str().unwrap(),
            "--calib-samples",
            "2",
            "--calib-len",
            "32",
        ]
        .map(String::from),
    );
}

/// `compress --hessians H --work-dir W -o OUT` (quick arguments).
fn from_hessians(
    out: &std::path::Path,
    h: &std::path::Path,
    w: &std::path::Path,
) -> (Option<i32>, String) {
    run_args(&quick(
        out,
        &[
            "--hessians",
            h.to_str().unwrap(),
            "--work-dir",
            w.to_str().unwrap(),
        ],
    ))
}

fn flip_bit(path: &std::path::Path, from_end: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() - from_end;
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

/// A flipped bit in a layer file or in `activations.bin`, or an edited `layers_done`, resumed
/// silently into a different model; a damaged Hessian file was used as is. Every work and
/// Hessian file now ends in a SHA-256 of its contents that --resume, merge and --hessians
/// verify before any work.
#[test]
fn work_and_hessian_files_carry_checksums_that_are_verified() {
    let d = tempfile::tempdir().unwrap();
    let (w, out, resume) = finished_job(d.path(), "w", "out");
    let layer = w.join("layer-00002.bin");
    let acts = w.join("activations.bin");
    let (layer_ok, acts_ok) = (
        std::fs::read(&layer).unwrap(),
        std::fs::read(&acts).unwrap(),
    );

    flip_bit(&layer, 100);
    let (code, err) = run_args(&resume);
    refused(code, &err, &["layer-00002.bin", "checksum"]);
    let (code, err) = pumice(&["merge", w.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    refused(code, &err, &["layer-00002.bin", "checksum"]);
    std::fs::write(&layer, &layer_ok).unwrap();

    flip_bit(&acts, 100);
    let (code, err) = run_args(&resume);
    refused(code, &err, &["activations.bin", "checksum"]);
    let key = b"\"layers_done\":6";
    let at = acts_ok
        .windows(key.len())
        .position(|w| w == key)
        .expect("layers_done in the header")
        + key.len()
        - 1;
    let mut edited = acts_ok.clone();
    edited[at] = b'3';
    std::fs::write(&acts, edited).unwrap();
    let (code, err) = run_args(&resume);
    refused(code, &err, &["activations.bin", "checksum"]);
    std::fs::write(&acts, &acts_ok).unwrap();
    assert!(!out.exists());
    // Intact again: the resume finishes.
    run_ok(&resume);

    let h = d.path().join("h");
    save_hessians(&h);
    flip_bit(&h.join("layer-00003.hessians"), 40);
    let w2 = d.path().join("w2");
    let (code, err) = from_hessians(&d.path().join("out2"), &h, &w2);
    refused(code, &err, &["layer-00003.hessians", "checksum"]);
    // Found before any layer was compressed.
    assert!(entries_with(&w2, "layer-").is_empty());
}

/// Byte counts in a work file's header summed with wrapping arithmetic (a huge `bytes`, a huge
/// batch row count, a Hessian's `features` whose triangle overflows) and panicked or indexed
/// out of range. The sums are checked: the file is refused by name.
#[test]
fn hostile_sizes_in_work_and_hessian_files_do_not_wrap() {
    let d = tempfile::tempdir().unwrap();
    let (w, out, resume) = finished_job(d.path(), "w", "out");

    // Two tensor sizes that each add 2^63: their sum wraps to the true data length.
    let layer = w.join("layer-00001.bin");
    let good = std::fs::read(&layer).unwrap();
    let (magic, mut h, data) = split_container(&good);
    for i in 0..2 {
        let b = h["tensors"][i]["bytes"].as_u64().unwrap();
        h["tensors"][i]["bytes"] = serde_json::json!(b + (1u64 << 63));
    }
    std::fs::write(&layer, make_container(&magic, &h, &data)).unwrap();
    let (code, err) = run_args(&resume);
    refused(code, &err, &["layer-00001.bin"]);
    let (code, err) = pumice(&["merge", w.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    refused(code, &err, &["layer-00001.bin"]);
    std::fs::write(&layer, &good).unwrap();

    let acts = w.join("activations.bin");
    let (magic, mut h, data) = split_container(&std::fs::read(&acts).unwrap());
    h["batches"][0] = serde_json::json!(1u64 << 62);
    std::fs::write(&acts, make_container(&magic, &h, &data)).unwrap();
    let (code, err) = run_args(&resume);
    refused(code, &err, &["activations.bin"]);

    let hd = d.path().join("h");
    save_hessians(&hd);
    let hf = hd.join("layer-00000.hessians");
    let (magic, mut h, data) = split_container(&std::fs::read(&hf).unwrap());
    for features in [1u64 << 32, u64::MAX] {
        h["groups"][0]["features"] = serde_json::json!(features);
        std::fs::write(&hf, make_container(&magic, &h, &data)).unwrap();
        let (code, err) = run_args(&quick(
            &d.path().join("out2"),
            &["--hessians", hd.to_str().unwrap()],
        ));
        refused(code, &err, &["layer-00000.hessians"]);
    }
    assert!(!out.exists() && !d.path().join("out2").exists());
}

/// A layer file whose manifest entry was invalid (bits 7) — with a valid checksum — was merged
/// into a checkpoint that pumice then refused to load. merge checks every entry and tensor
/// against the model first.
#[test]
fn merge_refuses_a_layer_file_with_an_invalid_manifest_entry() {
    let d = tempfile::tempdir().unwrap();
    let (w, out) = (d.path().join("w"), d.path().join("out"));
    run_ok(&quick(&out, &["--work-dir", w.to_str().unwrap()]));
    let layer = w.join("layer-00001.bin");
    let good = std::fs::read(&layer).unwrap();
    let (magic, h0, data) = split_container(&good);
    let name = h0["entries"][0][0].as_str().unwrap().to_string();
    let mut edits: Vec<serde_json::Value> = Vec::new();
    let mut h = h0.clone();
    h["entries"][0][1]["bits"] = serde_json::json!(7);
    edits.push(h);
    let mut h = h0.clone();
    h["entries"][0][1]["rows"] = serde_json::json!(3);
    edits.push(h);
    let mut h = h0.clone();
    h["tensors"][0]["shape"][0] = serde_json::json!(1);
    edits.push(h);
    for h in edits {
        std::fs::write(&layer, make_container(&magic, &h, &data)).unwrap();
        let merged = d.path().join("merged");
        let (code, err) = pumice(&["merge", w.to_str().unwrap(), "-o", merged.to_str().unwrap()]);
        refused(code, &err, &["layer-00001.bin", &name]);
        assert!(!merged.exists());
        assert!(entries_with(d.path(), "pumice-").is_empty());
    }
    std::fs::write(&layer, &good).unwrap();
    let merged = d.path().join("merged");
    let (code, err) = pumice(&["merge", w.to_str().unwrap(), "-o", merged.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
}

/// A missing Hessian file was found only when its layer came (after three layers of work), a
/// missing layer file with a raw OS error. Both are found before any work, named.
#[test]
fn missing_work_and_hessian_files_are_found_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let h = d.path().join("h");
    save_hessians(&h);
    std::fs::remove_file(h.join("layer-00004.hessians")).unwrap();
    let w = d.path().join("w");
    let (code, err) = from_hessians(&d.path().join("out"), &h, &w);
    refused(code, &err, &["layer-00004.hessians", "missing"]);
    assert!(entries_with(&w, "layer-").is_empty());

    let (w, out, resume) = finished_job(d.path(), "w2", "out2");
    std::fs::remove_file(w.join("layer-00002.bin")).unwrap();
    let (code, err) = run_args(&resume);
    refused(code, &err, &["layer-00002.bin", "missing"]);
    let (code, err) = pumice(&["merge", w.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    refused(code, &err, &["2"]);
    assert!(!out.exists());
}

/// Two `compress` runs to one new -o without --force both succeeded, the second silently
/// replacing the first. The final move never replaces without --force.
#[test]
fn a_run_never_replaces_an_output_that_appeared_meanwhile() {
    use std::io::BufRead;
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let args = quick(&out, &[]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(&args)
        .current_dir(common::project_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the run is past its checks (its first layer is done), another run's output appears.
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("\"event\":\"layer\"") {
            break;
        }
    }
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("marker"), "the other run's output").unwrap();
    for _ in lines {}
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    refused(o.status.code(), &err, &["out", "--force"]);
    assert_eq!(
        std::fs::read_to_string(out.join("marker")).unwrap(),
        "the other run's output"
    );
    assert_eq!(entries_with(d.path(), "out"), ["out"]);
}

/// A SIGKILL inside a --force replace left the old output only in `.OUT.pumice-old-PID`, which
/// nothing removed (also after `-o FILE --force` on a regular file). The replace is now one
/// atomic exchange: at any instant OUT is a whole output, and what a killed run leaves is
/// removed by the next run.
#[cfg(target_os = "linux")]
#[test]
fn sigkill_during_a_forced_replace_keeps_a_whole_output_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let mut args = quick(&out, &[]);
    let t0 = std::time::Instant::now();
    run_ok(&args);
    let t = t0.elapsed();
    args.push("--force".into());
    let seed: u64 = rand::random();
    eprintln!("kill times drawn with seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    for _ in 0..6 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
            .args(&args)
            .current_dir(common::project_root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(t.mul_f64(rand::Rng::random_range(&mut rng, 0.5..1.2)));
        let _ = child.kill();
        child.wait().unwrap();
        // Whatever the instant: a whole output in place, never only an aside copy.
        let (code, err) = pumice(&["inspect", out.to_str().unwrap(), "--check-weights"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(entries_with(d.path(), "pumice-old").is_empty());
    }
    run_ok(&args);
    assert_eq!(entries_with(d.path(), "out"), ["out"]);

    let file = d.path().join("plain");
    std::fs::write(&file, "a file in the way").unwrap();
    run_ok(&quick(&file, &["--force"]));
    assert!(file.join("pumice.json").is_file());
    assert_eq!(entries_with(d.path(), "plain"), ["plain"]);
}

/// Byte range of tensor `name` in a safetensors file.
fn tensor_range(path: &std::path::Path, name: &str) -> std::ops::Range<usize> {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let o = &h[name]["data_offsets"];
    let start = 8 + n + o[0].as_u64().unwrap() as usize;
    start..8 + n + o[1].as_u64().unwrap() as usize
}

fn patch(path: &std::path::Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

/// An act-order `.perm` that was not a permutation (a repeated column) was accepted and gave a
/// wrong model. It is refused at load, naming the tensor.
#[test]
fn act_order_perm_must_be_a_permutation() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("ao");
    run_ok(&quick(&out, &["--act-order"]));
    let st = out.join("model.safetensors");
    let name = "model.layers.0.self_attn.q_proj.weight.perm";
    let r = tensor_range(&st, name);
    let first: [u8; 4] = std::fs::read(&st).unwrap()[r.start..r.start + 4]
        .try_into()
        .unwrap();
    patch(&st, r.start + 4, &first);
    let text = d.path().join("t.txt");
    std::fs::write(
        &text,
        "Some text to score, long enough for a window or two.",
    )
    .unwrap();
    let o = out.to_str().unwrap();
    for args in [
        vec!["eval", o, "--text", text.to_str().unwrap(), "--ctx", "8"],
        vec!["generate", o, "--prompt", "Once", "--max-tokens", "4"],
    ] {
        let (code, err) = pumice(&args);
        refused(code, &err, &[name, "permutation"]);
    }
}

/// NaN scales in a compressed checkpoint gave "non-finite NLL" (eval) or "token id 4294967295
/// is outside the vocabulary" (generate), and NaN scales of CALDERA factors passed `inspect
/// --check-weights`. Each names the file and tensor now.
#[test]
fn non_finite_scales_are_refused_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("t.txt");
    std::fs::write(
        &text,
        "Some text to score, long enough for a window or two.",
    )
    .unwrap();
    let gptq = d.path().join("gptq");
    run_ok(&quick(&gptq, &[]));
    let cal = d.path().join("cal");
    let mut args = quick(&cal, &[]);
    let m = args.iter().position(|a| a == "gptq").unwrap();
    args[m] = "caldera".into();
    args.extend(["--rank", "4", "--outer-iters", "1", "--inner-iters", "1"].map(String::from));
    run_ok(&args);
    let nan = half::f16::NAN.to_le_bytes();
    let inf = half::f16::INFINITY.to_le_bytes();
    for (dir, name, value) in [
        (&gptq, "model.layers.1.mlp.down_proj.weight.scales", nan),
        (&gptq, "model.layers.3.self_attn.v_proj.weight.zeros", inf),
        (&cal, "model.layers.2.mlp.up_proj.weight.L.scales", nan),
        (&cal, "model.layers.0.self_attn.o_proj.weight.R.zeros", inf),
    ] {
        let st = dir.join("model.safetensors");
        let good = std::fs::read(&st).unwrap();
        patch(&st, tensor_range(&st, name).start + 6, &value);
        let m = dir.to_str().unwrap();
        for args in [
            vec!["inspect", m, "--check-weights"],
            vec!["eval", m, "--text", text.to_str().unwrap(), "--ctx", "8"],
            vec!["generate", m, "--prompt", "Once", "--max-tokens", "4"],
        ] {
            let (code, err) = pumice(&args);
            refused(code, &err, &["model.safetensors", name]);
        }
        std::fs::write(&st, good).unwrap();
    }
}

/// Manifest `files` entries like `../../etc/passwd` were joined to the checkpoint directory
/// unchecked.
#[test]
fn manifest_file_names_must_be_plain() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("c");
    run_ok(&quick(&out, &[]));
    let mp = out.join("pumice.json");
    let good = std::fs::read_to_string(&mp).unwrap();
    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "..",
        "sub/model.safetensors",
    ] {
        let mut m: serde_json::Value = serde_json::from_str(&good).unwrap();
        let f = m["files"]["model.safetensors"].clone();
        m["files"][bad] = f;
        std::fs::write(&mp, serde_json::to_string(&m).unwrap()).unwrap();
        let (code, err) = pumice(&["inspect", out.to_str().unwrap()]);
        refused(code, &err, &["pumice.json", bad]);
    }
}

/// A run resumed on another adapter or backend mixed layers computed on both (Vulkan and GL
/// give different bytes). The adapter is part of the job's inputs; the refusal names both.
#[test]
fn resume_on_another_backend_is_refused_naming_both() {
    let d = tempfile::tempdir().unwrap();
    let (w, out) = (d.path().join("w"), d.path().join("out"));
    let mut job = quick(&out, &["--work-dir", w.to_str().unwrap()]);
    let a: Vec<&str> = job.iter().map(String::as_str).collect();
    let (code, err) = pumice_env(&a, &[("PUMICE_BACKEND", "vulkan")]);
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
    job.push("--resume".into());
    let a: Vec<&str> = job.iter().map(String::as_str).collect();
    let (code, err) = pumice_env(&a, &[("PUMICE_BACKEND", "gl")]);
    refused(code, &err, &["adapter", "(vulkan", "(gl", "w"]);
    assert!(!out.exists());
}

/// `--max-tokens 18446744073709551615` overflowed the prompt-plus-tokens sum into "the sequence
/// would reach 2 tokens, past the cache of 1". It is refused before GPU work, saying how many
/// fit.
#[test]
fn max_tokens_past_the_context_is_refused_saying_what_fits() {
    for n in ["18446744073709551615", "100000"] {
        let (code, err) = pumice(&["generate", MODEL, "--prompt", "Once", "--max-tokens", n]);
        refused(
            code,
            &err,
            &["--max-tokens", "max_position_embeddings", "at most"],
        );
    }
}

/// `--eval-text` was read only after the whole compression: a wrong path failed at the very
/// end. It is read (and tokenized) before any work, and is bad input.
#[test]
fn eval_text_is_read_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let (w, out) = (d.path().join("w"), d.path().join("out"));
    let (code, err) = run_args(&quick(
        &out,
        &[
            "--eval-text",
            "/nonexistent/eval.txt",
            "--work-dir",
            w.to_str().unwrap(),
        ],
    ));
    refused(code, &err, &["/nonexistent/eval.txt"]);
    assert!(!out.exists());
    assert!(!w.exists() || entries_with(&w, "layer-").is_empty());
}

/// `pumice importance` of the asset model over `options` (CALDERA ones at one outer and inner
/// iteration), then `compress --measurement … --target-bpw BPW --format gguf` into `dir/out`.
fn allocate_to_gguf(dir: &std::path::Path, options: &str, bpw: &str) -> std::path::PathBuf {
    let model = common::project_root().join("assets/models/gutenberg-llama");
    let (model, m) = (model.to_str().unwrap(), dir.join("measurement.json"));
    let out = dir.join("out");
    let fast = [
        "--calib-samples",
        "4",
        "--calib-len",
        "64",
        "--outer-iters",
        "1",
        "--inner-iters",
        "1",
    ];
    let mut args = vec!["importance", model, "-o", m.to_str().unwrap(), "--no-rht"];
    args.extend(["--options", options]);
    args.extend(fast);
    let (code, err) = pumice(&args);
    assert_eq!(code, Some(0), "{err}");
    let mut args = vec!["compress", model, "-o", out.to_str().unwrap()];
    args.extend(["--measurement", m.to_str().unwrap(), "--target-bpw", bpw]);
    args.extend(["--format", "gguf", "--eval-samples", "0"]);
    args.extend(fast);
    let (code, err) = pumice(&args);
    assert_eq!(code, Some(0), "{err}");
    out
}

/// `compress --measurement … --format gguf` wrote the GGUF and then failed (exit 1) reading
/// `pumice.json` for report.svg, which only the pumice format has.
#[test]
fn an_allocation_written_to_another_format_finishes() {
    let d = tempfile::tempdir().unwrap();
    let out = allocate_to_gguf(d.path(), "gptq-q4_0,gptq-q8_0", "6");
    assert!(out.join("model.gguf").exists());
    assert!(!out.join("report.svg").exists());
}

/// `compress --measurement … --format gguf` spent its budget in the pumice format's bits: a
/// CALDERA option's factors counted at the 4-bit factor grid (≈ 0.75 bits per weight at rank
/// 16 on the asset model) went into the GGUF adapter at f32 (≈ 5.3), so the written linear
/// weights plus adapter overshot `--target-bpw` several times over. The allocation now counts
/// what the target file stores.
#[test]
fn an_allocation_for_gguf_spends_the_bits_the_gguf_files_hold() {
    use pumice::format::gguf::file::{read_info, GgufInfo};
    let d = tempfile::tempdir().unwrap();
    let budget = 5.5;
    let out = allocate_to_gguf(d.path(), "gptq-q4_0,caldera-q4_0-r16", &budget.to_string());
    // Linear weights (blk.N.attn_*/ffn_* .weight) and every adapter tensor, as written.
    let bytes = |info: &GgufInfo, keep: &dyn Fn(&str) -> bool| -> (u64, u64) {
        info.tensors
            .iter()
            .filter(|(n, _, _)| keep(n))
            .map(|(_, ne, ty)| {
                let n: u64 = ne.iter().product();
                (n, GgufInfo::tensor_bytes(*ty, n).unwrap())
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let main = read_info(&out.join("model.gguf")).unwrap();
    let linear = |n: &str| {
        n.starts_with("blk.")
            && n.ends_with(".weight")
            && (n.contains(".attn_") || n.contains(".ffn_"))
            && !n.contains("_norm")
    };
    let (params, mut written) = bytes(&main, &linear);
    let adapter = out.join("adapter.gguf");
    if adapter.exists() {
        written += bytes(&read_info(&adapter).unwrap(), &|_| true).1;
    }
    let bpw = written as f64 * 8.0 / params as f64;
    assert!(
        bpw <= budget,
        "{bpw:.3} bits per linear weight written, over --target-bpw {budget}"
    );
    assert!(bpw >= 4.5, "{bpw}");
}

/// A job killed after its output was moved into place but before the process ended (CI's
/// `finetune` resume test hit this window) could not be resumed: `--resume` refused the
/// output it had itself written ("already exists"). The job now records in its work directory
/// what it is about to commit, and a resumed job replaces an output that is exactly that
/// (identically); anything else there is still refused. (A finished job resumed is the same
/// state as one killed in that window.)
#[test]
fn a_resumed_job_replaces_the_output_it_wrote_itself_and_nothing_else() {
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("data.txt");
    std::fs::write(
        &text,
        "The lamp burned low while the rain kept on at the windows of the old house. ".repeat(40),
    )
    .unwrap();
    let (out, w) = (d.path().join("out"), d.path().join("work"));
    let mut compress = quick(&out, &["--work-dir", w.to_str().unwrap()]);
    let tuned = d.path().join("tuned");
    let tw = d.path().join("tune-work");
    let mut finetune: Vec<String> = [
        "finetune",
        MODEL,
        "-o",
        tuned.to_str().unwrap(),
        "--lora-rank",
        "2",
        "--loss",
        "ce",
        "--data",
        text.to_str().unwrap(),
        "--samples",
        "4",
        "--len",
        "32",
        "--batch",
        "2",
        "--steps",
        "2",
        "--work-dir",
        tw.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    for (job, out, file) in [
        (&mut compress, &out, "model.safetensors"),
        (&mut finetune, &tuned, "adapter_model.safetensors"),
    ] {
        run_ok(job);
        let first = std::fs::read(out.join(file)).unwrap();
        job.push("--resume".into());
        run_ok(job);
        assert_eq!(std::fs::read(out.join(file)).unwrap(), first, "{job:?}");
        // An output that is not what the job wrote is never replaced.
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let (code, err) = run_args(job);
        refused(code, &err, &[out.to_str().unwrap(), "--force"]);
        assert_eq!(
            std::fs::read_to_string(out.join("notes.txt")).unwrap(),
            "mine"
        );
    }
}
