//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use pumice::gpu::{Gpu, GpuOptions};

/// Open the GPU the environment selects (PUMICE_BACKEND / PUMICE_ADAPTER). GPU tests must fail,
/// never skip, when no adapter exists, so this panics with the reason.
pub fn gpu_with(opts: &GpuOptions) -> Gpu {
    match Gpu::new(opts) {
        Ok(g) => {
            static ONCE: OnceLock<()> = OnceLock::new();
            // Written to the real stderr (the harness captures eprintln!) so every test run names
            // its adapter.
            ONCE.get_or_init(|| {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "GPU tests run on adapter: {}",
                    g.describe()
                );
            });
            g
        }
        Err(e) => {
            panic!("GPU tests need an adapter (install mesa-vulkan-drivers for lavapipe): {e}")
        }
    }
}

pub fn gpu() -> Gpu {
    gpu_with(&GpuOptions::from_env().expect("valid PUMICE_* environment"))
}

/// A GPU whose bindings are artificially limited to `bytes`, to force chunking.
pub fn gpu_limited(bytes: u64) -> Gpu {
    let mut opts = GpuOptions::from_env().expect("valid PUMICE_* environment");
    opts.max_binding_bytes = Some(bytes);
    gpu_with(&opts)
}

/// Deterministic pseudo-random values (xorshift), uniform in [-1, 1) plus `bias`.
pub fn random(n: usize, seed: u64, bias: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + bias
        })
        .collect()
}

/// A GPU that plans as if invocations could run at most `iterations` loop iterations, to force
/// the split dispatches (Mesa's CPU drivers stop at 65,535) on small shapes.
pub fn gpu_loop_limited(iterations: u64) -> Gpu {
    let mut opts = GpuOptions::from_env().expect("valid PUMICE_* environment");
    opts.max_loop_iterations = Some(iterations);
    gpu_with(&opts)
}

/// The asset model (always present).
pub fn asset() -> PathBuf {
    project_root().join("assets/models/gutenberg-llama")
}

/// Run the pumice binary of this build with `args`.
pub fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
        .args(args)
        .output()
        .unwrap()
}

/// A finished command's stderr.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// ../shared beside the project, if present.
pub fn shared() -> Option<PathBuf> {
    let p = project_root().join("..").join("shared");
    p.is_dir().then_some(p)
}

/// Relative max-norm error of `got` against an f64 reference.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
        / scale
}

/// One tensor for [`write_safetensors`]: name, dtype string, shape, raw bytes, and optional
/// data offsets overriding the sequential layout (to build hostile files).
pub struct RawTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    pub offsets: Option<(u64, u64)>,
}

/// Write a safetensors file byte by byte (independent of the reader under test).
pub fn write_safetensors(path: &std::path::Path, tensors: &[RawTensor]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len() as u64;
        data.extend_from_slice(&t.bytes);
        let (b, e) = t.offsets.unwrap_or((start, data.len() as u64));
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [b, e]}),
        );
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// Shape of a tiny synthetic Llama for I/O tests.
pub struct TinyLlama {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
}

impl Default for TinyLlama {
    fn default() -> Self {
        TinyLlama {
            hidden: 8,
            intermediate: 12,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            vocab: 16,
            tied: false,
        }
    }
}

impl TinyLlama {
    pub fn config_json(&self, dtype: &str) -> String {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tied,
            "torch_dtype": dtype,
        })
        .to_string()
    }

    /// Every tensor (f32, deterministic values) in checkpoint order.
    pub fn tensors(&self) -> Vec<RawTensor> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let hd = h / self.heads;
        let mut shapes: Vec<(String, Vec<usize>)> =
            vec![("model.embed_tokens.weight".into(), vec![v, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
            shapes.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * hd, h],
            ));
            shapes.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * hd, h],
            ));
            shapes.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * hd, h],
            ));
            shapes.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.heads * hd],
            ));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            shapes.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        shapes.push(("model.norm.weight".into(), vec![h]));
        if !self.tied {
            shapes.push(("lm_head.weight".into(), vec![v, h]));
        }
        shapes
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| {
                let n: usize = shape.iter().product();
                let vals = random(n, k as u64 + 1, 0.0);
                RawTensor {
                    name,
                    dtype: "F32".into(),
                    shape,
                    bytes: vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    offsets: None,
                }
            })
            .collect()
    }

    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    /// Write config.json and model.safetensors into `dir` (created if needed).
    pub fn write(&self, dir: &std::path::Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config_json("float32")).unwrap();
        write_safetensors(&dir.join("model.safetensors"), &self.tensors());
    }
}

/// The f32 weight `name` of a compressed checkpoint as the reader (the engine) dequantizes it.
pub fn reader_weight(g: &Gpu, ck: &pumice::model::Checkpoint, name: &str) -> Vec<f32> {
    let e = pumice::infer::Engine::new(
        g,
        ck,
        &pumice::infer::EngineOptions {
            max_positions: 8,
            ..Default::default()
        },
    )
    .unwrap();
    e.dequantized_weight(name).unwrap().to_f32(g).unwrap()
}

/// Every line of a command's stdout as JSON (panics naming the first line that does not parse).
#[allow(dead_code)]
pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// The summary object that ends a JSON-lines command's stdout.
#[allow(dead_code)]
pub fn json_summary(stdout: &[u8]) -> serde_json::Value {
    let lines = json_lines(stdout);
    let last = lines.last().cloned().expect("stdout has at least one line");
    assert_eq!(last["event"], "summary", "last line: {last}");
    last
}

/// The engine's logits of `ck` on `ids` (sequences of `t` tokens back to back), f32
/// [ids.len() × vocab].
#[allow(dead_code)]
pub fn engine_logits(g: &Gpu, ck: &pumice::model::Checkpoint, ids: &[u32], t: usize) -> Vec<f32> {
    let mut engine = pumice::infer::Engine::new(
        g,
        ck,
        &pumice::infer::EngineOptions {
            max_positions: t,
            ..Default::default()
        },
    )
    .unwrap();
    let hidden = engine.hidden_states(ids, t).unwrap();
    engine
        .logits(&hidden, 0..ids.len())
        .unwrap()
        .to_f32(g)
        .unwrap()
}

/// The Python of the interop checks: `PUMICE_PYTHON`, else `~/.cache/pumice-venv/bin/python`.
pub fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PUMICE_PYTHON") {
        return std::path::PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    std::path::PathBuf::from(home).join(".cache/pumice-venv/bin/python")
}

/// transformers' logits of `dir` on `seqs` (tools/interop/hf_logits.py; `extra` adds its
/// options: `--adapter DIR`, `--gguf FILE`) and the JSON line it prints (what was loaded and
/// how).
pub fn hf_logits_info(
    dir: &std::path::Path,
    extra: &[&std::ffi::OsStr],
    seqs: &[Vec<u32>],
) -> (Vec<f32>, serde_json::Value) {
    let py = python();
    assert!(
        py.exists(),
        "{} not found: the interop tests need Python with torch, transformers, \
         compressed-tensors and peft (.ci/run makes ~/.cache/pumice-venv; or set PUMICE_PYTHON)",
        py.display()
    );
    // Written under the target directory, never beside `dir` (which may be in the repository).
    let scratch = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hf-logits");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = scratch.join(format!(
        "{}.logits{}.safetensors",
        dir.to_string_lossy().replace(['/', '\\'], "_"),
        extra.len()
    ));
    let ids: Vec<String> = seqs
        .iter()
        .map(|s| {
            s.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let o = std::process::Command::new(&py)
        .arg(project_root().join("tools/interop/hf_logits.py"))
        .arg(dir)
        .arg(&out)
        .arg("--ids")
        .arg(ids.join(";"))
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "hf_logits.py {}: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let info = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or_else(|| panic!("hf_logits.py printed no JSON line: {stdout}"));
    let f = pumice::model::safetensors::SafetensorsFile::open(&out).unwrap();
    let li = f.info("logits").unwrap();
    assert_eq!(li.dtype_name, "F32");
    let logits = f
        .bytes(li)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (logits, info)
}
