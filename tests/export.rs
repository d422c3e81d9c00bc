//! `pumice export`: the host dequantization equals the reader's bit for bit; a dense export
//! computes what the compressed checkpoint computes; every format refuses, by tensor, what it
//! cannot hold exactly; and transformers (with compressed-tensors and peft), an implementation
//! that is not ours, loads the exports and computes pumice's logits.
//!
//! The interop test needs Python with torch, transformers, compressed-tensors and peft
//! (`.ci/run` makes that environment): `PUMICE_PYTHON`, else `~/.cache/pumice-venv/bin/python`.
//! Without it the test fails, naming what is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{gpu, hf_logits_info, project_root, python, reader_weight};
use pumice::model::Checkpoint;
use pumice::quant::GridKind;

fn model() -> PathBuf {
    project_root().join("assets/models/gutenberg-llama")
}

fn pumice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .unwrap()
}

/// Run `pumice COMMAND INPUT -o work()/NAME --force --json EXTRA...`, which must succeed.
fn write(command: &str, input: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = work().join(name);
    let mut args = vec![
        command,
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--force",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = pumice(&args);
    assert!(
        o.status.success(),
        "{command} {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn work() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("export");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The recipe of the gptq 4-bit fixture.
const GPTQ4: [&str; 6] = ["--method", "gptq", "--bits", "4", "--group-size", "64"];

/// Compress the asset model into work()/NAME with a small calibration and `extra` options.
fn compress(name: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "--eval-samples",
        "0",
        "--calib-samples",
        "8",
        "--calib-len",
        "128",
    ];
    args.extend_from_slice(extra);
    write("compress", &model(), name, &args)
}

/// Compressions of the asset model shared by the tests (made once per test binary).
struct Fixtures {
    /// gptq 4-bit asymmetric, groups of 64.
    gptq4: PathBuf,
    /// gptq 4-bit symmetric (integer zero 8), groups of 32: ggml's Q4_0 grid.
    sym4: PathBuf,
    /// gptq on ggml's IQ4_NL codebook, groups of 32.
    iq4: PathBuf,
    /// caldera, asymmetric Q, no rotation, rank 8.
    caldera: PathBuf,
    /// caldera defaults (midrise Q, rotations).
    caldera_rht: PathBuf,
    /// gptq 3-bit with act-order.
    act_order: PathBuf,
    /// gptq 4-bit pruned 2:4.
    pruned: PathBuf,
    /// gptq 4-bit affine (f16 step and minimum), groups of 32: ggml's Q4_1 grid.
    affine4: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let make = compress;
        // gptq 4-bit in groups of 32 on `grid`: one ggml type's grid.
        let g32 = |name: &str, grid: &str| {
            make(
                name,
                &[
                    "--method",
                    "gptq",
                    "--bits",
                    "4",
                    "--group-size",
                    "32",
                    "--grid",
                    grid,
                ],
            )
        };
        Fixtures {
            gptq4: make("gptq4", &GPTQ4),
            sym4: g32("sym4", "symmetric"),
            iq4: make(
                "iq4",
                &["--method", "gptq", "--group-size", "32", "--grid", "iq4nl"],
            ),
            caldera: make(
                "caldera",
                &[
                    "--method",
                    "caldera",
                    "--grid",
                    "asymmetric",
                    "--no-rht",
                    "--group-size",
                    "64",
                    "--rank",
                    "8",
                ],
            ),
            caldera_rht: make("caldera-rht", &["--method", "caldera", "--rank", "8"]),
            act_order: make(
                "act-order",
                &[
                    "--method",
                    "gptq",
                    "--bits",
                    "3",
                    "--group-size",
                    "64",
                    "--act-order",
                ],
            ),
            pruned: make(
                "pruned",
                &["--method", "gptq", "--bits", "4", "--sparsity", "2:4"],
            ),
            affine4: g32("affine4", "affine"),
        }
    })
}

fn export(input: &Path, name: &str, format: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--format", format];
    args.extend_from_slice(extra);
    write("export", input, name, &args)
}

/// Token ids: two sequences of 48 drawn from the vocabulary with a fixed seed.
fn ids(vocab: usize) -> Vec<Vec<u32>> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..2)
        .map(|_| {
            (0..48)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// pumice's logits of `dir` on `seqs` (f32, [nseq·T, vocab] flattened).
fn pumice_logits(dir: &Path, seqs: &[Vec<u32>]) -> Vec<f32> {
    let ck = Checkpoint::open(dir).unwrap();
    common::engine_logits(&gpu(), &ck, &seqs.concat(), seqs[0].len())
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs() as f64))
}

fn linear_names(ck: &Checkpoint) -> Vec<String> {
    ck.arch()
        .layers
        .iter()
        .flat_map(|l| l.linears.iter().map(|lin| lin.weight.name.clone()))
        .collect()
}

#[test]
fn host_dequantization_equals_the_readers_bit_for_bit() {
    let f = fixtures();
    let g = gpu();
    for dir in [
        &f.gptq4,
        &f.sym4,
        &f.iq4,
        &f.caldera_rht,
        &f.act_order,
        &f.pruned,
    ] {
        let ck = Checkpoint::open(dir).unwrap();
        let last = ck.arch().layers.len() - 1;
        for l in [0, last] {
            let layer = pumice::format::native::read_layer(&ck, l).unwrap();
            for m in &layer.matrices {
                let host = m.backbone().unwrap();
                let gpu_w = reader_weight(&g, &ck, &m.weight);
                assert_eq!(host.len(), gpu_w.len());
                let differing = host
                    .iter()
                    .zip(&gpu_w)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differing,
                    0,
                    "{}: {} {differing} values differ",
                    dir.display(),
                    m.weight
                );
            }
        }
    }
}

#[test]
fn dense_export_computes_what_the_compressed_checkpoint_does() {
    let f = fixtures();
    let seqs = ids(4096);
    for (dir, name) in [
        (&f.caldera_rht, "dense-caldera-rht"),
        (&f.caldera, "dense-caldera"),
        (&f.act_order, "dense-act-order"),
        (&f.pruned, "dense-pruned"),
    ] {
        let out = export(dir, name, "dense", &["--dtype", "f32"]);
        // A plain checkpoint: no manifest, no quantization config, every linear dense f32.
        assert!(!out.join("pumice.json").exists());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert!(cfg.get("quantization_config").is_none());
        assert_eq!(cfg["torch_dtype"], "float32");
        let ck = Checkpoint::open(&out).unwrap();
        assert!(ck.manifest().is_none());
        for w in linear_names(&ck) {
            assert_eq!(ck.tensor(&w).unwrap().dtype, pumice::DType::F32);
        }
        let d = max_diff(&pumice_logits(dir, &seqs), &pumice_logits(&out, &seqs));
        assert!(d < 1e-4, "{name}: logits differ by {d}");
    }
}

fn refused(input: &Path, format: &str, want: &[&str]) {
    refused_with(input, format, &[], want)
}

/// `export INPUT --format FORMAT EXTRA…` exits 2 before writing anything, its message holding
/// every one of `want`.
fn refused_with(input: &Path, format: &str, extra: &[&str], want: &[&str]) {
    let out = work().join(format!(
        "refused-{}-{format}",
        input.file_name().unwrap().to_str().unwrap()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let mut args = vec![
        "export",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--format",
        format,
    ];
    args.extend_from_slice(extra);
    let o = pumice(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{format}: {err}");
    for w in want {
        assert!(err.contains(w), "{format}: `{w}` not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "{} was written", out.display());
}

#[test]
fn formats_refuse_what_they_cannot_hold_by_tensor() {
    let f = fixtures();
    refused(
        &f.caldera_rht,
        "compressed-tensors",
        &["model.layers.0.", "randomized-Hadamard"],
    );
    refused(&f.act_order, "compressed-tensors", &["act-order", "tensor"]);
    refused(&f.pruned, "compressed-tensors", &["pruned", "tensor"]);
    refused(&f.caldera_rht, "peft", &["randomized-Hadamard", "tensor"]);
    refused(&f.gptq4, "peft", &["no weight has low-rank factors"]);
    // The asset model's 192 columns are not whole groups of 128.
    let rtn = |name: &str, extra: &[&str]| {
        let mut args = vec!["--method", "rtn"];
        args.extend_from_slice(extra);
        compress(name, &args)
    };
    let g128 = rtn("gptq4-g128", &["--bits", "4"]);
    refused(
        &g128,
        "compressed-tensors",
        &["192 columns", "group size 128"],
    );
    // Midrise grids (caldera's default Q) have no integer zero point.
    let midrise = rtn(
        "rtn-midrise",
        &["--bits", "3", "--group-size", "64", "--grid", "midrise"],
    );
    refused(&midrise, "compressed-tensors", &["midrise", "tensor"]);
    refused(&f.iq4, "compressed-tensors", &["IQ4_NL codebook", "tensor"]);
    refused(&f.affine4, "compressed-tensors", &["f16 minimum", "tensor"]);
    refused(&f.affine4, "gptq", &["f16 minimum", "tensor"]);
    refused(&midrise, "gptq", &["midrise", "tensor"]);
    refused(
        &f.caldera_rht,
        "gptq-v1",
        &["randomized-Hadamard", "tensor"],
    );
    refused(&f.pruned, "gptq", &["pruned", "tensor"]);
    refused(&f.iq4, "gptq", &["ggml", "tensor"]);
    // Only a compressed checkpoint exports.
    refused(&model(), "dense", &["not a pumice-compressed checkpoint"]);
}

/// transformers' logits of `dir` on `seqs`; `extra` adds hf_logits.py options (`--adapter
/// DIR`, `--gguf FILE`).
fn hf_logits(dir: &Path, extra: &[&std::ffi::OsStr], seqs: &[Vec<u32>]) -> Vec<f32> {
    hf_logits_info(dir, extra, seqs).0
}

fn transformers_logits(dir: &Path, adapter: Option<&Path>, seqs: &[Vec<u32>]) -> Vec<f32> {
    match adapter {
        Some(a) => hf_logits(dir, &["--adapter".as_ref(), a.as_os_str()], seqs),
        None => hf_logits(dir, &[], seqs),
    }
}

#[test]
fn transformers_loads_the_exports_and_computes_pumices_logits() {
    let f = fixtures();
    let seqs = ids(4096);
    // compressed-tensors pack-quantized, dequantized by compressed-tensors on load.
    let ct = export(&f.gptq4, "ct-gptq4", "compressed-tensors", &[]);
    let d = max_diff(
        &pumice_logits(&f.gptq4, &seqs),
        &transformers_logits(&ct, None, &seqs),
    );
    assert!(d < 1e-4, "compressed-tensors gptq4: logits differ by {d}");
    // The symmetric grid is compressed-tensors' `symmetric: true` (no zero points stored).
    let ct = export(&f.sym4, "ct-sym4", "compressed-tensors", &[]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ct.join("config.json")).unwrap()).unwrap();
    let groups = &config["quantization_config"]["config_groups"];
    assert_eq!(groups["group_0"]["weights"]["symmetric"], true, "{groups}");
    let d = max_diff(
        &pumice_logits(&f.sym4, &seqs),
        &transformers_logits(&ct, None, &seqs),
    );
    assert!(d < 1e-4, "compressed-tensors sym4: logits differ by {d}");
    // `inspect` reports its size and bits per weight: 4-bit codes + an f32 scale per 32.
    let o = pumice(&["inspect", ct.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["linear_bits_per_parameter"], 5.0);
    assert_eq!(
        s["bytes"],
        std::fs::metadata(ct.join("model.safetensors"))
            .unwrap()
            .len()
    );
    // CALDERA: the quantized Q in compressed-tensors, L·R as a PEFT adapter beside it.
    let ct = export(&f.caldera, "ct-caldera", "compressed-tensors", &[]);
    assert!(ct.join("adapter/adapter_config.json").exists());
    let d = max_diff(
        &pumice_logits(&f.caldera, &seqs),
        &transformers_logits(&ct, Some(&ct.join("adapter")), &seqs),
    );
    assert!(
        d < 1e-4,
        "compressed-tensors + peft caldera: logits differ by {d}"
    );
    // The adapter alone (--format peft) is the same adapter.
    let peft = export(&f.caldera, "peft-caldera", "peft", &[]);
    let d = max_diff(
        &pumice_logits(&f.caldera, &seqs),
        &transformers_logits(&ct, Some(&peft), &seqs),
    );
    assert!(d < 1e-4, "peft caldera: logits differ by {d}");
    // Dense f32 of CALDERA with rotations: everything undone on the host.
    let dense = export(
        &f.caldera_rht,
        "dense-caldera-rht-hf",
        "dense",
        &["--dtype", "f32"],
    );
    let d = max_diff(
        &pumice_logits(&f.caldera_rht, &seqs),
        &transformers_logits(&dense, None, &seqs),
    );
    assert!(d < 1e-4, "dense caldera (rht): logits differ by {d}");
}

/// GPTQ checkpoints, loaded by transformers through optimum + GPTQModel: GPTQModel's own
/// dequantization gives pumice's weights (in f32 with its scales widened, and bit for bit in its
/// native f16), so the logits equal pumice's; v2 and v1, asymmetric and symmetric, act-order
/// (g_idx), and CALDERA with its PEFT adapter.
#[test]
fn gptq_exports_load_in_gptqmodel_and_compute_pumices_logits() {
    let f = fixtures();
    let seqs = ids(4096);
    for (fixture, name, format, adapter) in [
        (&f.gptq4, "gptq-gptq4", "gptq", false),
        (&f.sym4, "gptq-v1-sym4", "gptq-v1", false),
        (&f.act_order, "gptq-act-order", "gptq", false),
        (&f.caldera, "gptq-caldera", "gptq", true),
    ] {
        let out = export(fixture, name, format, &[]);
        let qc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("quantize_config.json")).unwrap())
                .unwrap();
        assert_eq!(
            qc["checkpoint_format"],
            if format == "gptq" { "gptq_v2" } else { "gptq" },
            "{name}: {qc}"
        );
        assert_eq!(qc["desc_act"], fixture == &f.act_order, "{name}: {qc}");
        assert_eq!(qc["sym"], fixture == &f.sym4, "{name}: {qc}");
        let adapter_dir = out.join("adapter");
        assert_eq!(adapter_dir.exists(), adapter, "{name}");
        let extra: Vec<&std::ffi::OsStr> = match adapter {
            true => vec!["--adapter".as_ref(), adapter_dir.as_os_str()],
            false => vec![],
        };
        let (logits, info) = hf_logits_info(&out, &extra, &seqs);
        assert_eq!(info["gptq_modules"], 42, "{name}: {info}");
        assert!(
            info["gptq_kernel"]
                .as_str()
                .is_some_and(|k| k.starts_with("gptqmodel.")),
            "{name}: {info}"
        );
        assert_eq!(info["gptq_f16_max_diff"], 0.0, "{name}: {info}");
        let d = max_diff(&pumice_logits(fixture, &seqs), &logits);
        assert!(d < 1e-4, "{name}: logits differ by {d}");
    }
    // `inspect`: 4-bit codes + an f16 scale and a 4-bit zero per 64 weights = 4.3125 bits.
    let out = work().join("gptq-gptq4");
    let o = pumice(&["inspect", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["format"], "GPTQ");
    assert_eq!(s["linear_bits_per_parameter"], 4.3125, "{s}");
    assert_eq!(s["schemes"][0]["targets"], 42, "{s}");
    let source = pumice::model::ModelSummary::of(&Checkpoint::open(model()).unwrap());
    assert_eq!(s["parameters"], source.parameters, "{s}");
    assert_eq!(s["linear_parameters"], source.linear_parameters, "{s}");
    // The adapter beside a CALDERA export, and the adapter directory on its own.
    let out = work().join("gptq-caldera");
    let o = pumice(&["inspect", out.join("adapter").to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (a["r"].as_u64(), a["tensors"].as_u64()),
        (Some(8), Some(84)),
        "{a}"
    );
}

#[test]
fn compress_writes_any_format_through_the_same_writer() {
    let f = fixtures();
    // The same compression written straight to compressed-tensors is byte for byte the
    // export of the pumice checkpoint.
    let mut args = GPTQ4.to_vec();
    args.extend(["--format", "compressed-tensors"]);
    let direct = compress("direct-ct", &args);
    let exported = export(&f.gptq4, "exported-ct", "compressed-tensors", &[]);
    for file in ["model.safetensors", "config.json"] {
        assert_eq!(
            std::fs::read(direct.join(file)).unwrap(),
            std::fs::read(exported.join(file)).unwrap(),
            "{file}"
        );
    }
    // And GGUF (its general.name is the source model's either way).
    let mut args = GPTQ4.to_vec();
    args.extend(["--format", "gguf"]);
    let direct = compress("direct-gguf", &args);
    let exported = export(&f.gptq4, "exported-gguf", "gguf", &[]);
    assert!(
        std::fs::read(direct.join("model.gguf")).unwrap()
            == std::fs::read(exported.join("model.gguf")).unwrap(),
        "compress --format gguf and export wrote different files"
    );
    // And GPTQ.
    let mut args = GPTQ4.to_vec();
    args.extend(["--format", "gptq"]);
    let direct = compress("direct-gptq", &args);
    let exported = export(&f.gptq4, "exported-gptq", "gptq", &[]);
    for file in ["model.safetensors", "config.json", "quantize_config.json"] {
        assert!(
            std::fs::read(direct.join(file)).unwrap()
                == std::fs::read(exported.join(file)).unwrap(),
            "compress --format gptq and export wrote different {file}"
        );
    }
    // A recipe the format cannot hold is refused before any work, naming the tensor.
    let refused = work().join("direct-refused");
    let _ = std::fs::remove_dir_all(&refused);
    let o = pumice(&[
        "compress",
        model().to_str().unwrap(),
        "-o",
        refused.to_str().unwrap(),
        "--method",
        "caldera",
        "--format",
        "compressed-tensors",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("model.layers.0.")
            && (err.contains("midrise") || err.contains("randomized-Hadamard")),
        "{err}"
    );
    assert!(!err.contains("calibrat"), "work started: {err}");
    assert!(!refused.exists());
}

/// A synthetic bf16 `arch` in work()/NAME whose widths are whole k-quant super-blocks (hidden
/// 256, intermediate 512, 2 layers, 4/2 heads, vocabulary 4096; bos 0, eos 1, and `extra`
/// config keys), with the asset model's tokenizer.
fn synthetic_256(name: &str, arch: &str, extra: &[(&str, serde_json::Value)]) -> PathBuf {
    let src = work().join(name);
    let mut m = pumice::model::synthetic::SyntheticLlama::tiny(arch);
    (
        m.hidden,
        m.intermediate,
        m.layers,
        m.heads,
        m.kv_heads,
        m.vocab,
    ) = (256, 512, 2, 4, 2, 4096);
    m.dtype = pumice::DType::BF16;
    m.extra.insert("bos_token_id".into(), serde_json::json!(0));
    m.extra.insert("eos_token_id".into(), serde_json::json!(1));
    for (k, v) in extra {
        m.extra.insert((*k).into(), v.clone());
    }
    let _ = std::fs::remove_dir_all(&src);
    m.write(&src).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model().join(f), src.join(f)).unwrap();
    }
    src
}

/// GGUF tensors by name: numpy shape and f32 values.
type GgufTensors = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Every tensor of a GGUF file as gguf-py dequantizes it (name → (numpy shape, f32 values)),
/// and its ggml type names.
fn gguf_py(file: &Path) -> (GgufTensors, serde_json::Value) {
    let py = python();
    assert!(py.exists(), "{} not found (see python())", py.display());
    let out = file.with_extension("dequant.safetensors");
    let o = Command::new(&py)
        .arg(project_root().join("tools/interop/gguf_dequant.py"))
        .arg(file)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "gguf_dequant.py {}: {}",
        file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let f = pumice::model::safetensors::SafetensorsFile::open(&out).unwrap();
    let mut m = std::collections::HashMap::new();
    for name in info["types"].as_object().unwrap().keys() {
        let ti = f.info(name).unwrap();
        let v: Vec<f32> = f
            .bytes(ti)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        m.insert(name.clone(), (ti.shape.clone(), v));
    }
    (m, info)
}

/// llama.cpp's q/k row order (convert_hf_to_gguf's permute: reshape(heads, 2, d/2, in),
/// swap axes 1 and 2): GGUF row i holds HF row order[i].
fn llama_rows(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..d / 2 {
                order[h * d + i * 2 + half] = h * d + half * (d / 2) + i;
            }
        }
    }
    order
}

fn bits_equal(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

#[test]
fn gguf_holds_pumices_values_bit_for_bit_and_transformers_agrees() {
    let f = fixtures();
    let seqs = ids(4096);
    // (checkpoint, output, the type every linear gets, whether the model file alone is the
    // whole model: CALDERA's L·R is in the adapter, which transformers does not load).
    for (dir, name, want_type, whole, extra) in [
        // Asymmetric 4-bit levels q − z ∈ [−15, 15] fit Q5_0's [−16, 15].
        (&f.gptq4, "gguf-gptq4", "Q5_0", true, &[][..]),
        // The symmetric 4-bit grid in groups of 32 is Q4_0's own.
        (&f.sym4, "gguf-sym4", "Q4_0", true, &[]),
        // The iq4nl grid in groups of 32 is IQ4_NL's.
        (&f.iq4, "gguf-iq4", "IQ4_NL", true, &[]),
        (&f.caldera, "gguf-caldera", "Q4_0", false, &[]),
        (&f.pruned, "gguf-pruned", "Q5_0", true, &[]),
        // The affine 4-bit grid in groups of 32 is Q4_1's (and Q5_1 holds it too).
        (&f.affine4, "gguf-affine4", "Q4_1", true, &[]),
        (
            &f.affine4,
            "gguf-affine4-q5_1",
            "Q5_1",
            true,
            &["--gguf-type", "q5_1"],
        ),
    ] {
        let out = export(dir, name, "gguf", extra);
        let (tensors, info) = gguf_py(&out.join("model.gguf"));
        assert_eq!(info["metadata"]["general.architecture"], "llama");
        // llama.cpp knows GPT-2's pre-tokenizer as "gpt-2"; "gpt2" made it refuse the file
        // ("unknown pre-tokenizer type"), which gguf-py and transformers did not notice.
        assert_eq!(info["metadata"]["tokenizer.ggml.pre"], "gpt-2");
        let ck = Checkpoint::open(dir).unwrap();
        let cfg = ck.config().clone();
        let kinds = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        for l in 0..ck.arch().layers.len() {
            let layer = pumice::format::native::read_layer(&ck, l).unwrap();
            for (lin, kind) in ck.arch().layers[l].linears.iter().zip(kinds) {
                let m = layer
                    .matrices
                    .iter()
                    .find(|m| m.weight == lin.weight.name)
                    .unwrap();
                let gname = format!("blk.{l}.{kind}.weight");
                assert_eq!(info["types"][&gname], want_type, "{name} {gname}");
                let (shape, got) = &tensors[&gname];
                assert_eq!(shape, &vec![lin.out_features, lin.in_features]);
                let v = m.backbone().unwrap();
                let heads = match kind {
                    "attn_q" => cfg.num_heads,
                    "attn_k" => cfg.num_kv_heads,
                    _ => 1,
                };
                let order: Vec<usize> = if heads > 1 {
                    llama_rows(lin.out_features, heads)
                } else {
                    (0..lin.out_features).collect()
                };
                let n = lin.in_features;
                let want: Vec<f32> = order
                    .iter()
                    .flat_map(|&r| v[r * n..(r + 1) * n].iter().copied())
                    .collect();
                assert_eq!(
                    bits_equal(got, &want),
                    0,
                    "{name}: {gname} differs from pumice's values"
                );
            }
        }
        // The embedding as the source stores it (bf16, read as f32).
        let emb = ck
            .tensor("model.embed_tokens.weight")
            .unwrap()
            .to_f32()
            .unwrap();
        assert_eq!(bits_equal(&tensors["token_embd.weight"].1, &emb), 0);
        // transformers' GGUF loader (gguf-py's dequantization, the llama q/k order undone)
        // computes pumice's logits.
        if whole {
            let d = max_diff(
                &pumice_logits(dir, &seqs),
                &transformers_gguf_logits(&out, &seqs),
            );
            assert!(
                d < 1e-4,
                "{name}: transformers' logits of the GGUF differ by {d}"
            );
        }
    }
    // CALDERA's factors: the LoRA adapter holds R (lora_a) and L (lora_b, q/k rows in GGUF
    // order) exactly; alpha = rank.
    let out = work().join("gguf-caldera");
    let (lora, info) = gguf_py(&out.join("adapter.gguf"));
    assert_eq!(info["metadata"]["general.type"], "adapter");
    assert_eq!(info["metadata"]["adapter.type"], "lora");
    assert_eq!(info["metadata"]["adapter.lora.alpha"], 8.0);
    let ck = Checkpoint::open(&f.caldera).unwrap();
    let layer = pumice::format::native::read_layer(&ck, 2).unwrap();
    let m = layer
        .matrices
        .iter()
        .find(|m| m.weight.ends_with("q_proj.weight"))
        .unwrap();
    let (lt, r) = pumice::format::weights::factors(&m.entry, &m.data)
        .unwrap()
        .unwrap();
    let (rows, k) = (m.entry.rows, m.entry.rank);
    let (ashape, a) = &lora["blk.2.attn_q.weight.lora_a"];
    assert_eq!(ashape, &vec![k, m.entry.cols]);
    assert_eq!(bits_equal(a, &r), 0);
    let order = llama_rows(rows, ck.config().num_heads);
    let (bshape, b) = &lora["blk.2.attn_q.weight.lora_b"];
    assert_eq!(bshape, &vec![rows, k]);
    let want: Vec<f32> = order
        .iter()
        .flat_map(|&hr| (0..k).map(move |t| (hr, t)))
        .map(|(hr, t)| lt[t * rows + hr])
        .collect();
    assert_eq!(bits_equal(b, &want), 0);
    // `--dtype f16` halves the adapter: its factors rounded to f16 once.
    let half = export(&f.caldera, "gguf-caldera-f16", "gguf", &["--dtype", "f16"]);
    let (lora16, info16) = gguf_py(&half.join("adapter.gguf"));
    assert_eq!(info16["types"]["blk.2.attn_q.weight.lora_a"], "F16");
    let rounded: Vec<f32> = r.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    assert_eq!(
        bits_equal(&lora16["blk.2.attn_q.weight.lora_a"].1, &rounded),
        0
    );
    // `--dtype q8_0`: lora_a (rows of the input width) as ggml's Q8_0 — equal to gguf-py's own
    // Q8_0 of R — and lora_b, whose rows are the rank 8, in f16.
    let q8 = export(&f.caldera, "gguf-caldera-q8", "gguf", &["--dtype", "q8_0"]);
    let (lora8, info8) = gguf_py(&q8.join("adapter.gguf"));
    assert_eq!(info8["types"]["blk.2.attn_q.weight.lora_a"], "Q8_0");
    assert_eq!(info8["types"]["blk.2.attn_q.weight.lora_b"], "F16");
    let r_file = work().join("gguf-caldera-q8-r.safetensors");
    let ref_file = work().join("gguf-caldera-q8-ref.safetensors");
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![k, m.entry.cols],
        bytemuck::cast_slice(&r),
    )
    .unwrap();
    safetensors::serialize_to_file([("r", view)], None, &r_file).unwrap();
    let o = Command::new(python())
        .arg(project_root().join("tools/interop/gguf_q8_0.py"))
        .arg(&r_file)
        .arg(&ref_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rf = pumice::model::safetensors::SafetensorsFile::open(&ref_file).unwrap();
    let want: Vec<f32> = bytemuck::pod_collect_to_vec(rf.bytes(rf.info("r").unwrap()));
    assert_eq!(bits_equal(&lora8["blk.2.attn_q.weight.lora_a"].1, &want), 0);
    assert!(
        std::fs::metadata(q8.join("adapter.gguf")).unwrap().len()
            < std::fs::metadata(half.join("adapter.gguf")).unwrap().len()
    );
    assert!(
        pumice(&[
            "export",
            f.caldera.to_str().unwrap(),
            "-o",
            work().join("dense-q8-refused").to_str().unwrap(),
            "--format",
            "dense",
            "--dtype",
            "q8_0"
        ])
        .status
        .code()
            == Some(2)
    );
    // Ranks chosen by the budget differ between modules. llama.cpp scales each pair by
    // alpha / (its rank), alpha being the largest rank r_max: in f16 every module keeps its own
    // rank with lora_b times r / r_max; in f32 (exact) a module whose r_max / r is not a power
    // of two is zero-padded to r_max.
    let mixed = compress(
        "caldera-mixed-ranks",
        &[
            "--method",
            "caldera",
            "--grid",
            "asymmetric",
            "--no-rht",
            "--group-size",
            "64",
            "--target-bpw",
            "2.6",
        ],
    );
    let ck = Checkpoint::open(&mixed).unwrap();
    let layer = pumice::format::native::read_layer(&ck, 1).unwrap();
    let ranks: Vec<usize> = layer.matrices.iter().map(|m| m.entry.rank).collect();
    let r_max = ck
        .manifest()
        .unwrap()
        .tensors
        .values()
        .map(|e| e.rank)
        .max()
        .unwrap();
    assert!(ranks.iter().any(|&r| r < r_max), "{ranks:?} (max {r_max})");
    for dtype in ["f16", "f32"] {
        let o = export(
            &mixed,
            &format!("gguf-mixed-{dtype}"),
            "gguf",
            &["--dtype", dtype],
        );
        let (lora, info) = gguf_py(&o.join("adapter.gguf"));
        assert_eq!(info["metadata"]["adapter.lora.alpha"], r_max as f64);
        for (m, kind) in layer
            .matrices
            .iter()
            .zip(["attn_q", "attn_k", "attn_v", "attn_output"])
        {
            let r = m.entry.rank;
            let padded = dtype == "f32" && !((r_max / r).is_power_of_two() && r_max % r == 0);
            let sr = if padded { r_max } else { r };
            let (shape, b) = &lora[&format!("blk.1.{kind}.weight.lora_b")];
            assert_eq!(shape, &vec![m.entry.rows, sr], "{dtype} {kind}");
            let (lt, _) = pumice::format::weights::factors(&m.entry, &m.data)
                .unwrap()
                .unwrap();
            let heads = match kind {
                "attn_q" => ck.config().num_heads,
                "attn_k" => ck.config().num_kv_heads,
                _ => 1,
            };
            let rows = m.entry.rows;
            let order = if heads > 1 {
                llama_rows(rows, heads)
            } else {
                (0..rows).collect()
            };
            let scale = sr as f32 / r_max as f32;
            let want: Vec<f32> = order
                .iter()
                .flat_map(|&hr| (0..sr).map(move |t| (hr, t)))
                .map(|(hr, t)| {
                    if t < r {
                        lt[t * rows + hr] * scale
                    } else {
                        0.0
                    }
                })
                .map(|x| {
                    if dtype == "f16" {
                        half::f16::from_f32(x).to_f32()
                    } else {
                        x
                    }
                })
                .collect();
            assert_eq!(bits_equal(b, &want), 0, "{dtype} {kind}");
        }
    }
    // `inspect` reports the GGUF output's sizes and bits per weight, adapter included.
    let o = pumice(&["inspect", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["linear_bits_per_parameter"], 4.5);
    assert_eq!(s["types"]["q4_0"][0], 42);
    let model_bytes = std::fs::metadata(out.join("model.gguf")).unwrap().len();
    let adapter_bytes = std::fs::metadata(out.join("adapter.gguf")).unwrap().len();
    assert_eq!(s["bytes"], model_bytes + adapter_bytes);
    // What GGUF cannot hold is refused by tensor.
    refused(&f.caldera_rht, "gguf", &["randomized-Hadamard", "tensor"]);
    refused(&f.act_order, "gguf", &["act-order", "tensor"]);
    let o = pumice(&[
        "export",
        f.gptq4.to_str().unwrap(),
        "-o",
        work().join("gguf-q4-refused").to_str().unwrap(),
        "--format",
        "gguf",
        "--gguf-type",
        "q4_0",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("q4_0 cannot hold its 4-bit"), "{err}");
}

/// A PEFT LoRA adapter for `ck` in `dir` (rank 4, α 8, v_proj α 16 by alpha_pattern) on the
/// linears whose weights `pick` chooses, random A and B.
fn write_peft_adapter(dir: &Path, ck: &Checkpoint, pick: impl Fn(usize, &str) -> bool) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut targets = Vec::new();
    for (l, spec) in ck.arch().layers.iter().enumerate() {
        for lin in &spec.linears {
            let w = &lin.weight.name;
            if !pick(l, w) {
                continue;
            }
            let m = w.trim_end_matches(".weight");
            targets.push(m.to_string());
            let seed = tensors.len() as u64;
            let (o, i) = (lin.out_features, lin.in_features);
            tensors.push((
                format!("base_model.model.{m}.lora_A.weight"),
                vec![4, i],
                common::random(4 * i, 100 + seed, 0.0),
            ));
            tensors.push((
                format!("base_model.model.{m}.lora_B.weight"),
                vec![o, 4],
                common::random(o * 4, 200 + seed, 0.0),
            ));
        }
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, shape, v)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytemuck::cast_slice(v),
                )
                .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"v_proj": 16},
        "target_modules": targets,
        "task_type": "CAUSAL_LM", "bias": "none", "use_rslora": false, "use_dora": false,
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    tensors.len() / 2
}

/// PEFT's own delta (s·B·A, its scale) for every module of `adapter`, by weight name.
fn peft_deltas(adapter: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    let out = adapter.join("peft-delta.safetensors");
    let o = Command::new(python())
        .arg(project_root().join("tools/interop/peft_delta.py"))
        .arg(model())
        .arg(adapter)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "peft_delta.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let f = pumice::model::safetensors::SafetensorsFile::open(&out).unwrap();
    let names: Vec<String> = f.tensors().map(|t| t.name.clone()).collect();
    names
        .into_iter()
        .map(|n| {
            let v = bytemuck::pod_collect_to_vec(f.bytes(f.info(&n).unwrap()));
            (n, v)
        })
        .collect()
}

/// `export --format gguf --lora ADAPTER`: adapter.gguf computes, the way llama.cpp applies it
/// (alpha / the pair's rank · B·A, q/k rows in GGUF order), CALDERA's L·R (where the weight has
/// factors) plus what PEFT itself computes for the tuned adapter — on a CALDERA checkpoint
/// (ranks 8 + 4 padded to the largest, 12) and on a GPTQ one (the adapter alone); the model
/// file is the one written without it; `--lora` elsewhere is refused.
#[test]
fn gguf_lora_carries_a_peft_adapter_stacked_on_calderas_factors() {
    let f = fixtures();
    for (input, name) in [(&f.caldera, "caldera"), (&f.gptq4, "gptq4")] {
        let ck = Checkpoint::open(input).unwrap();
        let adapter = work().join(format!("peft-{name}"));
        let _ = std::fs::remove_dir_all(&adapter);
        let n = write_peft_adapter(&adapter, &ck, |l, w| {
            (l == 0 && w.contains("self_attn")) || (l == 3 && w.contains("mlp"))
        });
        assert_eq!(n, 7);
        let peft = peft_deltas(&adapter);
        assert_eq!(peft.len(), 7, "{:?}", peft.keys());
        let out = export(
            input,
            &format!("gguf-lora-{name}"),
            "gguf",
            &["--lora", adapter.to_str().unwrap()],
        );
        let plain = export(input, &format!("gguf-plain-{name}"), "gguf", &[]);
        assert_eq!(
            std::fs::read(out.join("model.gguf")).unwrap(),
            std::fs::read(plain.join("model.gguf")).unwrap(),
            "{name}: the model file changed"
        );
        let (lora, info) = gguf_py(&out.join("adapter.gguf"));
        let alpha = info["metadata"]["adapter.lora.alpha"].as_f64().unwrap();
        let caldera = name == "caldera";
        assert_eq!(alpha, if caldera { 12.0 } else { 4.0 }, "{name}");
        let cfg = ck.config();
        let mut checked = 0;
        for (l, spec) in ck.arch().layers.iter().enumerate() {
            let layer = pumice::format::native::read_layer(&ck, l).unwrap();
            for lin in &spec.linears {
                let w = &lin.weight.name;
                let kind = w.split('.').nth(4).unwrap();
                let gname = match kind {
                    "q_proj" => "attn_q",
                    "k_proj" => "attn_k",
                    "v_proj" => "attn_v",
                    "o_proj" => "attn_output",
                    "gate_proj" => "ffn_gate",
                    "up_proj" => "ffn_up",
                    _ => "ffn_down",
                };
                let key = format!("blk.{l}.{gname}.weight");
                let (rows, cols) = (lin.out_features, lin.in_features);
                // The delta pumice should carry, in HF row order, f64.
                let mut want = vec![0.0f64; rows * cols];
                let m = layer.matrices.iter().find(|m| &m.weight == w).unwrap();
                if let Some((lt, r)) = pumice::format::weights::factors(&m.entry, &m.data).unwrap()
                {
                    let k = m.entry.rank;
                    for i in 0..rows {
                        for j in 0..cols {
                            want[i * cols + j] += (0..k)
                                .map(|t| lt[t * rows + i] as f64 * r[t * cols + j] as f64)
                                .sum::<f64>();
                        }
                    }
                }
                let tuned = peft.get(w.as_str());
                if let Some(d) = tuned {
                    for (x, &y) in want.iter_mut().zip(d) {
                        *x += y as f64;
                    }
                }
                let Some((ashape, a)) = lora.get(&format!("{key}.lora_a")) else {
                    assert!(tuned.is_none() && !caldera, "{name}: {key} missing");
                    continue;
                };
                let (bshape, b) = &lora[&format!("{key}.lora_b")];
                let sr = ashape[0];
                assert_eq!(ashape, &vec![sr, cols]);
                assert_eq!(bshape, &vec![rows, sr]);
                let order = match kind {
                    "q_proj" => llama_rows(rows, cfg.num_heads),
                    "k_proj" => llama_rows(rows, cfg.num_kv_heads),
                    _ => (0..rows).collect(),
                };
                let scale = alpha / sr as f64;
                let mut worst = 0.0f64;
                let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt() / (rows * cols) as f64;
                for (gi, &hr) in order.iter().enumerate() {
                    for j in 0..cols {
                        let got = scale
                            * (0..sr)
                                .map(|t| b[gi * sr + t] as f64 * a[t * cols + j] as f64)
                                .sum::<f64>();
                        worst = worst.max((got - want[hr * cols + j]).abs());
                    }
                }
                let top = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                assert!(
                    worst <= 1e-5 * top.max(1e-30),
                    "{name} {key}: llama.cpp's delta differs by {worst} (largest {top}, {norm})"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, if caldera { 42 } else { 7 }, "{name}");
    }
    // Other formats load the PEFT directory as it is: --lora is refused there, before work.
    let adapter = work().join("peft-gptq4");
    let a = adapter.to_str().unwrap();
    refused_with(
        &f.gptq4,
        "dense",
        &["--lora", a],
        &["--lora is for --format gguf"],
    );
    // An adapter that does not fit the model is refused by file and tensor.
    let bad = work().join("peft-bad");
    let _ = std::fs::remove_dir_all(&bad);
    let ck = Checkpoint::open(&f.gptq4).unwrap();
    write_peft_adapter(&bad, &ck, |l, w| l == 1 && w.contains("o_proj"));
    let st = bad.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = bytes.len();
    for i in 0..n - 9 {
        if &bytes[i..i + 9] == b"layers.1." {
            bytes[i + 7] = b'9';
        }
    }
    std::fs::write(&st, bytes).unwrap();
    refused_with(
        &f.gptq4,
        "gguf",
        &["--lora", bad.to_str().unwrap()],
        &["adapter_model.safetensors", "layers.9"],
    );
}

fn transformers_gguf_logits(dir: &Path, seqs: &[Vec<u32>]) -> Vec<f32> {
    hf_logits(dir, &["--gguf".as_ref(), "model.gguf".as_ref()], seqs)
}

/// A Qwen2-shaped model (head_dim 64, q/k/v biases, tied embeddings, θ 1e6) with the asset
/// tokenizer: GGUF keeps Qwen2's row order and biases and omits the tied head; compressed-tensors
/// keeps the biases; transformers computes pumice's logits from both.
#[test]
fn qwen2_shaped_exports_keep_biases_tied_head_and_row_order() {
    let src = synthetic_256(
        "qwen2-src",
        "Qwen2ForCausalLM",
        &[
            ("tie_word_embeddings", serde_json::json!(true)),
            ("rope_theta", serde_json::json!(1e6)),
        ],
    );
    let q = write(
        "compress",
        &src,
        "qwen2-gptq4",
        &[
            "--eval-samples",
            "0",
            "--calib-samples",
            "4",
            "--calib-len",
            "64",
        ]
        .iter()
        .chain(GPTQ4.iter())
        .copied()
        .collect::<Vec<_>>(),
    );
    let ck = Checkpoint::open(&q).unwrap();
    assert!(ck.arch().lm_head.is_none() && ck.config().attention_bias);
    let seqs = ids(4096);
    let want = pumice_logits(&q, &seqs);
    // GGUF: qwen2, no output.weight, biases f32, q/k rows as transformers has them.
    let g = export(&q, "qwen2-gguf", "gguf", &[]);
    let (tensors, info) = gguf_py(&g.join("model.gguf"));
    assert_eq!(info["metadata"]["general.architecture"], "qwen2");
    assert!(!tensors.contains_key("output.weight"));
    let layer = pumice::format::native::read_layer(&ck, 1).unwrap();
    for (kind, gname) in [("q_proj", "attn_q"), ("k_proj", "attn_k")] {
        let w = format!("model.layers.1.self_attn.{kind}");
        let mm = layer
            .matrices
            .iter()
            .find(|x| x.weight == format!("{w}.weight"))
            .unwrap();
        assert_eq!(
            bits_equal(
                &tensors[&format!("blk.1.{gname}.weight")].1,
                &mm.backbone().unwrap()
            ),
            0
        );
        let bias = ck.tensor(&format!("{w}.bias")).unwrap().to_f32().unwrap();
        assert_eq!(
            bits_equal(&tensors[&format!("blk.1.{gname}.bias")].1, &bias),
            0
        );
    }
    let d = max_diff(&want, &transformers_gguf_logits(&g, &seqs));
    assert!(d < 1e-4, "qwen2 GGUF: transformers' logits differ by {d}");
    let ct = export(&q, "qwen2-ct", "compressed-tensors", &[]);
    let d = max_diff(&want, &transformers_logits(&ct, None, &seqs));
    assert!(d < 1e-4, "qwen2 compressed-tensors: logits differ by {d}");
    // GPTQ keeps the biases beside the quantized modules; GPTQModel's dequantization agrees.
    let gq = export(&q, "qwen2-gptq", "gptq", &[]);
    let (logits, info) = hf_logits_info(&gq, &[], &seqs);
    assert_eq!(info["gptq_f16_max_diff"], 0.0, "{info}");
    let d = max_diff(&want, &logits);
    assert!(d < 1e-4, "qwen2 GPTQ: logits differ by {d}");
}

/// ggml's k-quant grids on a Llama whose widths are whole super-blocks (hidden 256,
/// intermediate 512): `--grid k --bits 4|2|3|5|6` exports as Q4_K, Q2_K, Q3_K, Q5_K, Q6_K; every linear
/// tensor gguf-py dequantizes equals pumice's value bit for bit (llama's q/k row order
/// applied), the reader's dequantization equals the host's, and transformers' GGUF loader
/// computes pumice's logits. compressed-tensors refuses the grid by tensor.
#[test]
fn k_grids_export_as_ggml_k_quants_bit_for_bit() {
    let src = synthetic_256("llama256-src", "LlamaForCausalLM", &[]);
    let g = gpu();
    let seqs = ids(4096);
    for (bits, ty) in [
        ("4", "Q4_K"),
        ("2", "Q2_K"),
        ("3", "Q3_K"),
        ("5", "Q5_K"),
        ("6", "Q6_K"),
    ] {
        let name = format!("llama256-k{bits}");
        let q = write(
            "compress",
            &src,
            &name,
            &[
                "--eval-samples",
                "0",
                "--calib-samples",
                "4",
                "--calib-len",
                "64",
                "--method",
                "gptq",
                "--grid",
                "k",
                "--bits",
                bits,
            ],
        );
        let ck = Checkpoint::open(&q).unwrap();
        let cfg = ck.config().clone();
        let out = export(&q, &format!("{name}-gguf"), "gguf", &[]);
        let (tensors, info) = gguf_py(&out.join("model.gguf"));
        for l in 0..ck.arch().layers.len() {
            let layer = pumice::format::native::read_layer(&ck, l).unwrap();
            for m in &layer.matrices {
                let host = m.backbone().unwrap();
                let reader = reader_weight(&g, &ck, &m.weight);
                assert_eq!(bits_equal(&host, &reader), 0, "{name}: {}", m.weight);
                let kind = m.weight.split('.').nth(4).unwrap();
                let (gname, heads) = match kind {
                    "q_proj" => ("attn_q", cfg.num_heads),
                    "k_proj" => ("attn_k", cfg.num_kv_heads),
                    "v_proj" => ("attn_v", 1),
                    "o_proj" => ("attn_output", 1),
                    "gate_proj" => ("ffn_gate", 1),
                    "up_proj" => ("ffn_up", 1),
                    _ => ("ffn_down", 1),
                };
                let gname = format!("blk.{l}.{gname}.weight");
                assert_eq!(info["types"][&gname], ty, "{name} {gname}");
                let (rows, n) = (m.entry.rows, m.entry.cols);
                let order: Vec<usize> = if heads > 1 {
                    llama_rows(rows, heads)
                } else {
                    (0..rows).collect()
                };
                let want: Vec<f32> = order
                    .iter()
                    .flat_map(|&r| host[r * n..(r + 1) * n].iter().copied())
                    .collect();
                assert_eq!(
                    bits_equal(&tensors[&gname].1, &want),
                    0,
                    "{name}: {gname} differs from pumice's values"
                );
            }
        }
        let d = max_diff(
            &pumice_logits(&q, &seqs),
            &transformers_gguf_logits(&out, &seqs),
        );
        assert!(
            d < 1e-4,
            "{name}: transformers' logits of the GGUF differ by {d}"
        );
        refused(
            &q,
            "compressed-tensors",
            &["k-quant super-blocks", "tensor"],
        );
    }
    // The asset model's 192-wide inputs are not whole super-blocks: those weights fall back to
    // the iq4nl grid (IQ4_NL, as llama.cpp falls back for Q2_K), the 512-wide down
    // projections keep Q2_K; both exact.
    let q = compress(
        "asset-k2",
        &["--method", "gptq", "--grid", "k", "--bits", "2"],
    );
    let ck = Checkpoint::open(&q).unwrap();
    let m = ck.manifest().unwrap();
    for (name, e) in &m.tensors {
        let want = if name.contains("down_proj") {
            GridKind::K
        } else {
            GridKind::Iq4nl
        };
        assert_eq!(e.kind, want, "{name}");
    }
    let out = export(&q, "asset-k2-gguf", "gguf", &[]);
    let (tensors, info) = gguf_py(&out.join("model.gguf"));
    let layer = pumice::format::native::read_layer(&ck, 1).unwrap();
    for (kind, gname, ty) in [
        ("mlp.down_proj", "ffn_down", "Q2_K"),
        ("mlp.up_proj", "ffn_up", "IQ4_NL"),
    ] {
        let gname = format!("blk.1.{gname}.weight");
        assert_eq!(info["types"][&gname], ty);
        let mm = layer
            .matrices
            .iter()
            .find(|x| x.weight == format!("model.layers.1.{kind}.weight"))
            .unwrap();
        assert_eq!(bits_equal(&tensors[&gname].1, &mm.backbone().unwrap()), 0);
    }
    // Q5_K falls back to the symmetric 5-bit grid in groups of 32: Q5_0.
    let q = compress(
        "asset-k5",
        &["--method", "gptq", "--grid", "k", "--bits", "5"],
    );
    let out = export(&q, "asset-k5-gguf", "gguf", &[]);
    let (tensors, info) = gguf_py(&out.join("model.gguf"));
    let ck = Checkpoint::open(&q).unwrap();
    let layer = pumice::format::native::read_layer(&ck, 0).unwrap();
    for (kind, gname, ty) in [
        ("mlp.down_proj", "ffn_down", "Q5_K"),
        ("mlp.up_proj", "ffn_up", "Q5_0"),
    ] {
        let gname = format!("blk.0.{gname}.weight");
        assert_eq!(info["types"][&gname], ty);
        let mm = layer
            .matrices
            .iter()
            .find(|x| x.weight == format!("model.layers.0.{kind}.weight"))
            .unwrap();
        assert_eq!(bits_equal(&tensors[&gname].1, &mm.backbone().unwrap()), 0);
    }
}

/// A SentencePiece-style tokenizer (BPE with byte fallback, "▁" for spaces: Llama 2, TinyLlama,
/// Mistral) goes to GGUF as llama.cpp's "llama" vocabulary: gguf-py reads back every piece,
/// score and type of the model's tokenizer.model (parsed by transformers' copy of
/// SentencePiece's schema) — without tokenizer.model, tokenizer.json's tokens with scores in
/// merge order — and, where llama-cpp-python is installed, llama.cpp tokenizes the messy texts
/// exactly as transformers does from the source.
#[test]
fn sentencepiece_tokenizers_become_llama_vocabularies() {
    let data = project_root().join("tests/data/tokenizers");
    let texts: Vec<PathBuf> = std::fs::read_dir(data.join("texts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for (name, tok_dir, files, vocab, from) in [
        (
            "spm-model",
            "spm_llama",
            &["tokenizer.json", "tokenizer_config.json", "tokenizer.model"][..],
            1000,
            "tokenizer.model",
        ),
        (
            "spm-merges",
            "spm_llama",
            &["tokenizer.json", "tokenizer_config.json"][..],
            1000,
            "tokenizer.json merges",
        ),
        (
            "spm-hf-trained",
            "sentencepiece",
            &["tokenizer.json"][..],
            1500,
            "tokenizer.json merges",
        ),
    ] {
        let src = work().join(format!("{name}-src"));
        let mut m = pumice::model::synthetic::SyntheticLlama::tiny("LlamaForCausalLM");
        (m.hidden, m.intermediate, m.vocab) = (64, 96, vocab);
        m.extra.insert("bos_token_id".into(), serde_json::json!(1));
        m.extra.insert("eos_token_id".into(), serde_json::json!(2));
        let _ = std::fs::remove_dir_all(&src);
        m.write(&src).unwrap();
        for f in files {
            std::fs::copy(data.join(tok_dir).join(f), src.join(f)).unwrap();
        }
        let q = write(
            "compress",
            &src,
            &format!("{name}-gguf"),
            &[
                "--eval-samples",
                "0",
                "--calib-samples",
                "4",
                "--calib-len",
                "64",
                "--method",
                "rtn",
                "--bits",
                "4",
                "--group-size",
                "32",
                "--grid",
                "symmetric",
                "--format",
                "gguf",
            ],
        );
        let o = Command::new(python())
            .arg(project_root().join("tools/interop/gguf_spm_check.py"))
            .arg(q.join("model.gguf"))
            .arg(&src)
            .args(&texts)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "gguf_spm_check.py {name}: {stdout} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(r["model"], "llama", "{name}: {r}");
        assert_eq!(r["source"], from, "{name}: {r}");
        assert_eq!(r["pieces_equal"], true, "{name}: {r}");
        assert_eq!(r["n"], vocab, "{name}: {r}");
        assert_eq!(r["add_space_prefix"], true, "{name}: {r}");
        assert_eq!((r["bos"].as_u64(), r["eos"].as_u64()), (Some(1), Some(2)));
        assert_eq!(r["unk"], 0, "{name}: {r}");
        if let Some(eq) = r["llama_cpp_tokens_equal"].as_object() {
            assert_eq!(eq.len(), texts.len());
            for (text, v) in eq {
                assert_eq!(v[0], true, "{name}: llama.cpp tokenizes {text} differently");
            }
        } else {
            println!(
                "{name}: llama-cpp-python not installed; llama.cpp's tokenization not compared"
            );
        }
    }
}
