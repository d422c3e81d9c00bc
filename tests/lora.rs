//! `eval`/`generate --lora`: a PEFT LoRA adapter applied by the engine computes what the model
//! with the adapter merged into its weights (W + s·B·A, s = α/r, α/√r with rsLoRA, per-module α
//! from alpha_pattern) computes; adapters that do not fit the model are refused by file and
//! tensor.

mod common;

use common::{gpu, random};
use pumice::format::lora;
use pumice::infer::{Engine, EngineOptions};
use pumice::model::compressed::{PlannedTensor, StreamingWriter};
use pumice::model::synthetic::SyntheticLlama;
use pumice::model::Checkpoint;

/// A module of an adapter: its name, out and in features, rank.
type Module<'a> = (&'a str, usize, usize, usize);

/// Write a PEFT adapter into `dir`: `modules`, the config's extra fields.
fn write_adapter(
    dir: &std::path::Path,
    modules: &[Module<'_>],
    config: serde_json::Value,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut plan = Vec::new();
    let mut values = Vec::new();
    for (i, &(m, o, inp, r)) in modules.iter().enumerate() {
        let a = random(r * inp, 10 + i as u64, 0.0);
        let b: Vec<f32> = random(o * r, 20 + i as u64, 0.0)
            .iter()
            .map(|x| x * 0.5)
            .collect();
        for (which, shape) in [("A", vec![r, inp]), ("B", vec![o, r])] {
            plan.push(PlannedTensor {
                name: format!("base_model.model.{m}.lora_{which}.weight"),
                dtype: "F32".into(),
                bytes: shape.iter().product::<usize>() * 4,
                shape,
            });
        }
        values.push((a, b));
    }
    let mut w = StreamingWriter::create(&dir.join("adapter_model.safetensors"), plan).unwrap();
    for (i, (a, b)) in values.iter().enumerate() {
        let m = modules[i].0;
        w.write(
            &format!("base_model.model.{m}.lora_A.weight"),
            bytemuck::cast_slice(a),
        )
        .unwrap();
        w.write(
            &format!("base_model.model.{m}.lora_B.weight"),
            bytemuck::cast_slice(b),
        )
        .unwrap();
    }
    w.finish().unwrap();
    let mut cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8});
    for (k, v) in config.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    values
}

/// A copy of the f32 checkpoint in `src` with `merge` applied to named weights.
fn merged_copy(src: &std::path::Path, dst: &std::path::Path, merge: &[(String, Vec<f32>)]) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let ck = Checkpoint::open(src).unwrap();
    let f = &ck.files()[0];
    let tensors: Vec<_> = f.tensors().cloned().collect();
    let plan = tensors
        .iter()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype_name.clone(),
            shape: t.shape.clone(),
            bytes: t.end - t.start,
        })
        .collect();
    let mut w = StreamingWriter::create(&dst.join("model.safetensors"), plan).unwrap();
    for t in &tensors {
        let mut v: Vec<f32> = bytemuck::cast_slice(f.bytes(t)).to_vec();
        if let Some((_, d)) = merge.iter().find(|(n, _)| *n == t.name) {
            for (x, y) in v.iter_mut().zip(d) {
                *x += y;
            }
        }
        w.write(&t.name, bytemuck::cast_slice(&v)).unwrap();
    }
    w.finish().unwrap();
}

fn logits(ck: &Checkpoint, adapter: Option<&lora::LoraAdapter>, ids: &[u32], t: usize) -> Vec<f32> {
    let g = gpu();
    let mut e = Engine::new(
        &g,
        ck,
        &EngineOptions {
            resident_bytes: u64::MAX,
            max_positions: t,
        },
    )
    .unwrap();
    if let Some(a) = adapter {
        e.apply_lora(a).unwrap();
    }
    let h = e.hidden_states(ids, t).unwrap();
    e.logits(&h, 0..ids.len()).unwrap().to_f32(&g).unwrap()
}

#[test]
fn an_applied_adapter_computes_the_merged_model() {
    let mut spec = SyntheticLlama::tiny("Qwen2ForCausalLM");
    spec.layers = 2;
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    spec.write(&base).unwrap();
    let (h, i) = (spec.hidden, spec.intermediate);
    let kv = h / spec.heads * spec.kv_heads;
    let modules = [
        ("model.layers.0.self_attn.q_proj", h, h, 4),
        ("model.layers.0.self_attn.v_proj", kv, h, 3),
        ("model.layers.1.mlp.down_proj", h, i, 2),
    ];
    for (rslora, pattern) in [(false, false), (true, true)] {
        let ad = d.path().join(format!("adapter-{rslora}"));
        let cfg = serde_json::json!({
            "use_rslora": rslora,
            "alpha_pattern": if pattern {
                serde_json::json!({"model\\.layers\\.1\\.mlp\\.down_proj": 5.0})
            } else {
                serde_json::json!({})
            },
        });
        let values = write_adapter(&ad, &modules, cfg);
        // The merged weights, by PEFT's law.
        let merge: Vec<(String, Vec<f32>)> = modules
            .iter()
            .zip(&values)
            .map(|(&(m, o, inp, r), (a, b))| {
                let alpha = if pattern && m.ends_with("down_proj") {
                    5.0
                } else {
                    8.0
                };
                let s = if rslora {
                    alpha / (r as f64).sqrt()
                } else {
                    alpha / r as f64
                };
                let mut dw = vec![0f32; o * inp];
                for x in 0..o {
                    for y in 0..inp {
                        let v: f64 = (0..r)
                            .map(|k| b[x * r + k] as f64 * a[k * inp + y] as f64)
                            .sum();
                        dw[x * inp + y] = (s * v) as f32;
                    }
                }
                (format!("{m}.weight"), dw)
            })
            .collect();
        let merged = d.path().join(format!("merged-{rslora}"));
        merged_copy(&base, &merged, &merge);
        let (bck, mck) = (
            Checkpoint::open(&base).unwrap(),
            Checkpoint::open(&merged).unwrap(),
        );
        let adapter = lora::read(&ad, &bck).unwrap();
        let (t, ids): (usize, Vec<u32>) =
            (9, (0..18).map(|x| (x * 7 % spec.vocab) as u32).collect());
        let got = logits(&bck, Some(&adapter), &ids, t);
        let want = logits(&mck, None, &ids, t);
        let plain = logits(&bck, None, &ids, t);
        let diff =
            |x: &[f32], y: &[f32]| x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff(&got, &want) < 1e-4,
            "rslora {rslora}: {}",
            diff(&got, &want)
        );
        assert!(diff(&plain, &want) > 1e-2, "the adapter changes nothing");
    }
}

#[test]
fn adapters_that_do_not_fit_are_refused_by_file_and_tensor() {
    let spec = SyntheticLlama::tiny("LlamaForCausalLM");
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    spec.write(&base).unwrap();
    let ck = Checkpoint::open(&base).unwrap();
    let h = spec.hidden;
    let cases: [(&[Module<'_>], serde_json::Value, &str); 4] = [
        (
            &[("model.layers.0.self_attn.q_proj", h + 1, h, 2)],
            serde_json::json!({}),
            "do not fit",
        ),
        (
            &[("model.layers.9.self_attn.q_proj", h, h, 2)],
            serde_json::json!({}),
            "names no linear",
        ),
        (
            &[("model.layers.0.self_attn.q_proj", h, h, 2)],
            serde_json::json!({"use_dora": true}),
            "use_dora",
        ),
        (
            &[("model.layers.0.self_attn.q_proj", h, h, 2)],
            serde_json::json!({"alpha_pattern": {"layers\\.[0-9]+\\.q_proj": 2}}),
            "regular expression",
        ),
    ];
    for (i, (modules, cfg, want)) in cases.into_iter().enumerate() {
        let ad = d.path().join(format!("bad-{i}"));
        write_adapter(&ad, modules, cfg);
        let err = match lora::read(&ad, &ck) {
            Ok(_) => panic!("case {i} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(want), "{err}");
        assert!(err.contains(&ad.display().to_string()), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
