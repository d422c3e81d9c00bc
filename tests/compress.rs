//! The compression pipeline and the compressed checkpoint: end to end on the asset model,
//! exact round trips, atomic output, refusal to overwrite the input, and one-line errors for
//! corrupt compressed directories.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{gpu, project_root};
use pumice::compress::calib::CalibOptions;
use pumice::compress::pipeline::{compress, CalderaSettings, CalibSource, CompressOptions, Method};
use pumice::infer::eval::{evaluate, EvalOptions};
use pumice::infer::{Engine, EngineOptions};
use pumice::model::compressed::MANIFEST_FILE;
use pumice::model::{Checkpoint, Tokenizer};
use pumice::quant::grid::unpack;
use pumice::quant::{GptqOptions, Grid, GridKind};

fn asset() -> PathBuf {
    project_root().join("assets/models/gutenberg-llama")
}

fn opts(method: Method, bits: u32, group: usize, out: &Path) -> CompressOptions {
    CompressOptions {
        layers: Vec::new(),
        allocation: None,
        sparsity: Default::default(),
        method,
        grid: Grid::new(bits, group, GridKind::Asymmetric).unwrap(),
        gptq: GptqOptions::default(),
        calib_source: CalibSource::SelfGenerated,
        calib: CalibOptions {
            samples: 8,
            len: 64,
            seed: 1,
            newlines: Default::default(),
            hessians_on: Default::default(),
        },
        caldera: Default::default(),
        output: out.to_path_buf(),
        force: false,
        rht: false,
        hessians: None,
        work_dir: None,
        resume: false,
        shard: None,
        format: pumice::format::FormatKind::Native,
        dtype: None,
    }
}

fn pumice(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `pumice eval OUT --token-file (eval_tokens) --ctx 64 --ref SOURCE --json` → KL divergence.
fn cli_kl(dir: &Path, out: &Path) -> f64 {
    let tf = dir.join("ids.txt");
    if !tf.exists() {
        let ids: Vec<String> = eval_tokens().iter().map(|t| t.to_string()).collect();
        std::fs::write(&tf, ids.join(" ")).unwrap();
    }
    let (code, stdout, stderr) = pumice(&[
        "eval",
        out.to_str().unwrap(),
        "--token-file",
        tf.to_str().unwrap(),
        "--ctx",
        "64",
        "--ref",
        asset().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    v["kl_divergence"].as_f64().unwrap()
}

/// A deterministic evaluation text from the asset tokenizer (no ../shared needed).
fn eval_tokens() -> Vec<u32> {
    let tok = Tokenizer::from_model_dir(&asset()).unwrap().unwrap();
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. ";
    tok.encode(&text.repeat(12)).unwrap()
}

#[test]
fn gptq_end_to_end_and_reader() {
    let g = gpu();
    let src = Checkpoint::open(asset()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("q4");
    let summary = compress(&g, &src, &opts(Method::Gptq, 4, 64, &out), &mut |_| {}).unwrap();
    // Nothing temporary left behind; the output is complete.
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["q4"]);
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        MANIFEST_FILE,
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let ck = Checkpoint::open(&out).unwrap();
    let m = ck.manifest().unwrap();
    assert_eq!(m.tensors.len(), 42);
    assert_eq!(m.calibration.as_ref().unwrap().kind, "self");
    // Exact accounting: 4-bit codes of 192 or 512 columns fill whole words; one f16 scale and
    // zero per 64 columns: 4 + 32/64 = 4.5 bits per linear parameter.
    assert_eq!(m.linear.parameters, 2_359_296);
    assert!(
        (m.linear.bits_per_parameter - 4.5).abs() < 1e-12,
        "{}",
        m.linear.bits_per_parameter
    );
    assert_eq!(
        summary.linear_bits_per_parameter,
        m.linear.bits_per_parameter
    );
    assert!(summary.output_bytes < summary.source_bytes);
    for l in &m.layers {
        for mat in &l.matrices {
            let e = mat.relative_error.unwrap();
            assert!(e > 0.0 && e < 0.05, "{}: {e}", mat.name);
        }
    }

    // The compressed model evaluates close to the original, against which KL is small.
    let tokens = eval_tokens();
    let eo = EngineOptions {
        max_positions: 64,
        ..Default::default()
    };
    let ev = EvalOptions {
        ctx: 64,
        max_windows: None,
        batch: 4,
    };
    let mut orig = Engine::new(&g, &src, &eo).unwrap();
    let base = evaluate(&mut orig, None, &tokens, &ev, &mut |_| {}).unwrap();
    let mut comp = Engine::new(&g, &ck, &eo).unwrap();
    let rep = evaluate(&mut comp, Some(&mut orig), &tokens, &ev, &mut |_| {}).unwrap();
    let kl = rep.kl_divergence.unwrap();
    assert!(kl > 0.0 && kl < 0.05, "KL {kl}");
    assert!(
        rep.perplexity < base.perplexity * 1.1,
        "{} vs {}",
        rep.perplexity,
        base.perplexity
    );

    // inspect reports the accounting; eval --ref works from the command line.
    let (code, stdout, stderr) = pumice(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["parameters"], 3_934_656);
    assert!((v["linear_bits_per_parameter"].as_f64().unwrap() - 4.5).abs() < 1e-12);
    let bpp = v["bits_per_parameter"].as_f64().unwrap();
    let bytes = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    assert!((bpp - bytes as f64 * 8.0 / 3_934_656.0).abs() < 1e-9);
    assert!((cli_kl(d.path(), &out) - kl).abs() < 1e-6);
}

/// RTN codes stored in the file dequantize (by the reader, on the GPU) to exactly the grid
/// values the CPU computes from those codes.
#[test]
fn rtn_round_trips_exactly() {
    let g = gpu();
    let src = Checkpoint::open(asset()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("r3");
    compress(&g, &src, &opts(Method::Rtn, 3, 32, &out), &mut |_| {}).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let name = "model.layers.2.mlp.down_proj.weight";
    let q = ck.quantized(name).unwrap().clone();
    let (codes, _, shape) = ck.raw(&format!("{name}.qweight")).unwrap();
    let words = shape[1];
    let codes: Vec<u32> = codes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let scales = ck
        .tensor(&format!("{name}.scales"))
        .unwrap()
        .to_f32()
        .unwrap();
    let zeros = ck
        .tensor(&format!("{name}.zeros"))
        .unwrap()
        .to_f32()
        .unwrap();
    let ng = q.cols.div_ceil(32);
    let mut want = vec![0.0f32; q.rows * q.cols];
    for r in 0..q.rows {
        for j in 0..q.cols {
            let c = unpack(&codes[r * words..(r + 1) * words], j, 3);
            want[r * q.cols + j] = scales[r * ng + j / 32] * (c as f32 - zeros[r * ng + j / 32]);
        }
    }
    // RTN of the source weight reproduces the stored codes.
    let w = src.tensor(name).unwrap().to_f32().unwrap();
    let re = pumice::quant::reference::rtn(
        &w,
        q.rows,
        q.cols,
        Grid::new(3, 32, GridKind::Asymmetric).unwrap(),
    );
    assert_eq!(
        re.dequantize(),
        want,
        "stored codes differ from RTN of the source"
    );
    // And the engine's dequantized weight is exactly that.
    let got = common::reader_weight(&g, &ck, name);
    assert_eq!(got, want);
}

#[test]
fn act_order_and_text_calibration() {
    let g = gpu();
    let src = Checkpoint::open(asset()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world. ".repeat(20)).unwrap();
    let out = d.path().join("q3");
    let mut o = opts(Method::Gptq, 3, 0, &out);
    o.gptq.act_order = true;
    o.calib_source = CalibSource::Text(vec![text.clone()]);
    compress(&g, &src, &o, &mut |_| {}).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let m = ck.manifest().unwrap();
    assert_eq!(m.calibration.as_ref().unwrap().kind, "text");
    assert!(m.tensors.values().all(|e| e.act_order));
    let (_, dtype, shape) = ck
        .raw("model.layers.0.self_attn.q_proj.weight.perm")
        .unwrap();
    assert_eq!((dtype, shape), ("U32", &[192usize][..]));
    // Generation runs on the act-order checkpoint.
    let (code, stdout, stderr) = pumice(&[
        "generate",
        out.to_str().unwrap(),
        "--prompt",
        "Call me",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("Call me") && stdout.len() > 8,
        "{stdout}"
    );
}

#[test]
fn output_safety() {
    let g = gpu();
    let src = Checkpoint::open(asset()).unwrap();
    // Never the input.
    let e = compress(&g, &src, &opts(Method::Rtn, 4, 128, &asset()), &mut |_| {}).unwrap_err();
    assert!(
        e.to_string().contains("refusing to overwrite the input"),
        "{e}"
    );
    // An existing output needs --force; with it, the old directory is replaced whole.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("existing");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let e = compress(&g, &src, &opts(Method::Rtn, 4, 128, &out), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    assert!(
        out.join("keep.txt").exists(),
        "a refused run must not touch the output"
    );
    let mut o = opts(Method::Rtn, 4, 128, &out);
    o.force = true;
    compress(&g, &src, &o, &mut |_| {}).unwrap();
    assert!(!out.join("keep.txt").exists() && out.join(MANIFEST_FILE).exists());
    // A failing run (bad calibration path) leaves nothing behind.
    let out2 = d.path().join("never");
    let mut o = opts(Method::Gptq, 4, 128, &out2);
    o.calib_source = CalibSource::Text(vec![d.path().join("missing.txt")]);
    assert!(compress(&g, &src, &o, &mut |_| {}).is_err());
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["existing"]);
    // Compressing a compressed checkpoint is refused.
    let ck = Checkpoint::open(&out).unwrap();
    let e = compress(
        &g,
        &ck,
        &opts(Method::Rtn, 4, 128, &d.path().join("again")),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("already a compressed checkpoint"),
        "{e}"
    );
}

fn expect_one_line_failure(dir: &Path, needle: &str) {
    let (code, stdout, stderr) = pumice(&["inspect", dir.to_str().unwrap(), "--json"]);
    assert!(code == 1 || code == 2, "exit {code}: {stderr}");
    assert!(stdout.is_empty());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
}

#[test]
fn corrupt_compressed_checkpoints() {
    let g = gpu();
    let src = Checkpoint::open(asset()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("good");
    compress(&g, &src, &opts(Method::Rtn, 4, 128, &good), &mut |_| {}).unwrap();
    let copy = |name: &str| {
        let p = d.path().join(name);
        std::fs::create_dir(&p).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), p.join(e.file_name())).unwrap();
        }
        p
    };
    let manifest = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join(MANIFEST_FILE)).unwrap()).unwrap()
    };
    let write_manifest = |p: &Path, v: &serde_json::Value| {
        std::fs::write(p.join(MANIFEST_FILE), v.to_string()).unwrap()
    };

    // Truncated weights file.
    let p = copy("truncated");
    let bytes = std::fs::read(p.join("model.safetensors")).unwrap();
    std::fs::write(p.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    expect_one_line_failure(&p, "pumice.json: says model.safetensors has");

    // A byte flipped inside the header.
    let p = copy("corrupt");
    let mut bytes = std::fs::read(p.join("model.safetensors")).unwrap();
    bytes[20] = b'#';
    std::fs::write(p.join("model.safetensors"), &bytes).unwrap();
    expect_one_line_failure(&p, "model.safetensors");

    // Manifest with wrong sizes.
    let p = copy("wrong_sizes");
    let mut v = manifest(&p);
    v["tensors"]["model.layers.1.mlp.up_proj.weight"]["rows"] = 500.into();
    write_manifest(&p, &v);
    expect_one_line_failure(&p, "model.layers.1.mlp.up_proj.weight");
    let p = copy("wrong_bits");
    let mut v = manifest(&p);
    v["tensors"]["model.layers.0.self_attn.q_proj.weight"]["bits"] = 3.into();
    write_manifest(&p, &v);
    expect_one_line_failure(&p, "stored_bits");

    // A newer format version.
    let p = copy("newer");
    let mut v = manifest(&p);
    v["format_version"] = 7.into();
    write_manifest(&p, &v);
    expect_one_line_failure(&p, "format version 7 was written by a newer pumice");

    // A version-1 file with a symmetric grid (whose zero point version 2 changed).
    let p = copy("v1_symmetric");
    let mut v = manifest(&p);
    v["format_version"] = 1.into();
    v["tensors"]["model.layers.0.self_attn.q_proj.weight"]["symmetric"] = true.into();
    write_manifest(&p, &v);
    expect_one_line_failure(&p, "symmetric grid of format version 1");

    // A version-2 file spelled the grid `"symmetric": bool` (true: midrise); it reads unchanged.
    let p = copy("v2_grid");
    let mut v = manifest(&p);
    v["format_version"] = 2.into();
    for (_, e) in v["tensors"].as_object_mut().unwrap() {
        let kind = e.as_object_mut().unwrap().remove("grid").unwrap();
        e["symmetric"] = (kind == "midrise").into();
    }
    write_manifest(&p, &v);
    let ck = Checkpoint::open(&p).unwrap();
    let m = ck.manifest().unwrap();
    assert!(!m.tensors.is_empty());
    assert!(m.tensors.values().all(|e| e.kind == GridKind::Asymmetric));

    // Not a manifest at all.
    let p = copy("garbage");
    std::fs::write(p.join(MANIFEST_FILE), "{]").unwrap();
    expect_one_line_failure(&p, "pumice.json: not valid JSON");
}

/// A CALDERA checkpoint: Q + factored L·R stored within the budget, read back by the forward
/// pass without densifying, close to the source, and usable by eval and generate.
#[test]
fn caldera_end_to_end() {
    let g = gpu();
    let src = Checkpoint::open(asset()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("cal");
    let mut o = opts(Method::Caldera, 2, 128, &out);
    o.caldera = CalderaSettings {
        target_bpw: 3.5,
        outer_iters: 2,
        inner_iters: 2,
        ..Default::default()
    };
    compress(&g, &src, &o, &mut |_| {}).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let m = ck.manifest().unwrap();
    assert_eq!(
        pumice::compress::pipeline::planned_linear_bits(&src, &o).unwrap(),
        m.linear.bits
    );
    assert_eq!(m.method, "caldera");
    let q = ck.quantized("model.layers.0.mlp.down_proj.weight").unwrap();
    assert!(q.rank > 0, "a 3.5 bpw budget leaves room for factors");
    assert_eq!((q.lr_bits, q.lr_group_size), (4, 64));
    for (name, e) in &m.tensors {
        let bpw = e.stored_bits as f64 / (e.rows * e.cols) as f64;
        assert!(bpw <= 3.5, "{name}: {bpw} bits per weight over the budget");
    }
    assert!(m.linear.bits_per_parameter <= 3.5);
    // Eval against the source and generation run on the factored checkpoint.
    let kl = cli_kl(d.path(), &out);
    assert!(kl > 0.0 && kl < 0.5, "KL {kl}");
    let (code, stdout, stderr) = pumice(&[
        "generate",
        out.to_str().unwrap(),
        "--prompt",
        "It was",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("It was"), "{stdout}");
}

/// Incoherence processing: codes of the rotated weight are stored with the seeds, the rotation
/// is undone at load (factored form kept for CALDERA), and the result matches what compression
/// measured: KL against the source stays small.
#[test]
fn rht_round_trip() {
    let g = gpu();
    let src = Checkpoint::open(asset()).unwrap();
    let d = tempfile::tempdir().unwrap();
    for (method, bits) in [(Method::Gptq, 4), (Method::Caldera, 2)] {
        let out = d.path().join(format!("rht-{}", method.name()));
        let mut o = opts(method, bits, 64, &out);
        o.rht = true;
        o.caldera = CalderaSettings {
            target_bpw: 3.5,
            outer_iters: 2,
            inner_iters: 2,
            ..Default::default()
        };
        compress(&g, &src, &o, &mut |_| {}).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        let e = ck.quantized("model.layers.3.mlp.gate_proj.weight").unwrap();
        assert!(e.rht.is_some());
        assert_eq!(e.stored_bits, e.expected_bits());
        let kl = cli_kl(d.path(), &out);
        // A wrong (or missing) inverse rotation gives an unrelated model: KL of several nats.
        assert!(kl < 0.3, "{}: KL {kl}", method.name());
    }
}

/// SparseGPT 2:4 with 4-bit survivors: only kept codes and a bitmask are stored (the manifest's
/// accounting says so and the reader checks it), the reader's weights have the 2:4 pattern,
/// and the model stays close to the source. Pruning with caldera or act-order is refused.
#[test]
fn pruned_checkpoint_round_trip() {
    use pumice::quant::sparsity::Sparsity;
    let g = gpu();
    let src = Checkpoint::open(asset()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("s24");
    let mut o = opts(Method::Gptq, 4, 128, &out);
    o.sparsity = Sparsity::TwoFour;
    compress(&g, &src, &o, &mut |_| {}).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let m = ck.manifest().unwrap();
    // The size planned before compressing is the size written.
    assert_eq!(
        pumice::compress::pipeline::planned_linear_bits(&src, &o).unwrap(),
        m.linear.bits
    );
    let name = "model.layers.3.mlp.down_proj.weight";
    let q = ck.quantized(name).unwrap();
    assert_eq!(q.sparsity.as_deref(), Some("2:4"));
    assert_eq!(q.kept_per_row, q.cols / 2);
    // Codes of half the weights at 4 bits, a 1-bit mask, f16 scale + zero per 128 columns.
    let want = q.rows as u64
        * ((q.cols / 2 * 4).div_ceil(32) * 32 + q.cols.div_ceil(32) * 32) as u64
        + q.rows as u64 * q.cols.div_ceil(128) as u64 * 32;
    assert_eq!(q.stored_bits, want);
    assert!(
        m.linear.bits_per_parameter < 3.4,
        "{}",
        m.linear.bits_per_parameter
    );
    let w = common::reader_weight(&g, &ck, name);
    for group in w.chunks_exact(4) {
        assert!(group.iter().filter(|&&x| x == 0.0).count() >= 2);
    }
    let kl = cli_kl(d.path(), &out);
    assert!(kl.is_finite() && kl < 0.5, "KL {kl}");

    for (method, act) in [(Method::Caldera, false), (Method::Gptq, true)] {
        let mut o = opts(method, 4, 128, &d.path().join("bad"));
        o.sparsity = Sparsity::TwoFour;
        o.gptq.act_order = act;
        let err = compress(&g, &src, &o, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("--sparsity"), "{err}");
    }
}
