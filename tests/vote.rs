//! Edge-LLM's voting across exits at inference: the engine's vote (exits' states observed in
//! the forward pass and in cached decoding, each exit's norm and head, the GPU vote kernel)
//! against the f64 reference on synthetic checkpoints of real families' shapes; the exits file
//! validated at open; `--vote` refused without exits.

mod common;

use common::{gpu, random};
use pumice::cpu::forward::reference_vote;
use pumice::infer::eval::{evaluate, EvalOptions};
use pumice::infer::generate::{generate, GenerateOptions};
use pumice::infer::{Engine, EngineOptions};
use pumice::model::exits::{self, ExitValues};
use pumice::model::synthetic::SyntheticLlama;
use pumice::model::Checkpoint;
use pumice::DType;

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + seed * 97) % vocab as u64) as u32)
        .collect()
}

/// Exits at `depths` with random norms (around 1) and heads scaled so that the exits'
/// softmaxes are as peaked as the model's or more (each exit wins some tokens).
fn write_exits(dir: &std::path::Path, spec: &SyntheticLlama, depths: &[usize], dtype: DType) {
    let values: Vec<ExitValues> = depths
        .iter()
        .map(|&d| ExitValues {
            depth: d,
            norm: random(spec.hidden, 100 + d as u64, 1.0),
            head: random(spec.vocab * spec.hidden, 200 + d as u64, 0.0)
                .iter()
                .map(|x| x * 4.0 / (spec.hidden as f32).sqrt())
                .collect(),
        })
        .collect();
    exits::write(dir, &values, spec.hidden, dtype).unwrap();
}

/// Softmax-normalized NLL of `target` in a vote row (log max p, not renormalized).
fn vote_nll(row: &[f64], target: usize) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - row[target]
}

fn check(name: &str, spec: SyntheticLlama, depths: &[usize], seq_len: usize, nseq: usize) {
    let g = gpu();
    let d = tempfile::tempdir().unwrap();
    spec.write(d.path()).unwrap();
    write_exits(d.path(), &spec, depths, spec.dtype);
    let ck = Checkpoint::open(d.path()).unwrap();
    let ex = ck.exits().expect("exits found");
    assert_eq!(ex.depths(), depths);
    let toks = ids(seq_len * nseq, spec.vocab, 3);
    let want = reference_vote(&ck, ex, None, &toks, seq_len).unwrap();
    let opts = EngineOptions {
        resident_bytes: u64::MAX,
        max_positions: seq_len,
    };
    let mut e = Engine::new(&g, &ck, &opts).unwrap();
    e.load_exits(ex).unwrap();
    let states = e.exit_hidden_states(&toks, seq_len).unwrap();
    let got = e
        .voted_logits(&states, 0..toks.len())
        .unwrap()
        .to_f32(&g)
        .unwrap();
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    assert!(err < 2e-4, "{name}: max |Δ log vote| {err:.3e}");
    // The vote is not any one head: exits win some tokens' argmax over the model's head.
    let v = spec.vocab;
    let plain = e.hidden_states(&toks, seq_len).unwrap();
    let z = e.logits(&plain, 0..toks.len()).unwrap().to_f32(&g).unwrap();
    let argmax = |r: &[f32]| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
    let differ = (0..toks.len())
        .filter(|&r| argmax(&got[r * v..(r + 1) * v]) != argmax(&z[r * v..(r + 1) * v]))
        .count();
    assert!(
        differ > 0,
        "{name}: the vote never differs from the model's head"
    );

    // Evaluation scores the renormalized vote.
    let rep = evaluate(
        &mut e,
        None,
        &toks,
        &EvalOptions {
            ctx: seq_len,
            max_windows: None,
            batch: 2,
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(rep.vote_exits, depths);
    let mut nll = 0.0;
    let mut n = 0;
    for r in 0..toks.len() {
        if r % seq_len < seq_len - 1 {
            nll += vote_nll(&want[r * v..(r + 1) * v], toks[r + 1] as usize);
            n += 1;
        }
    }
    let nll = nll / n as f64;
    assert!(
        (rep.mean_nll - nll).abs() < 1e-4 * nll.max(1.0),
        "{name}: eval NLL {} vs reference {nll}",
        rep.mean_nll
    );

    // One exit alone: its own log-softmax, the model's head left out.
    let d0 = depths[0];
    let mut alone = Engine::new(&g, &ck, &opts).unwrap();
    alone.load_exit_alone(ex, d0).unwrap();
    assert!(alone.load_exit_alone(ex, spec.layers).is_err());
    let st = alone.exit_hidden_states(&toks, seq_len).unwrap();
    let got1 = alone
        .voted_logits(&st, 0..toks.len())
        .unwrap()
        .to_f32(&g)
        .unwrap();
    let want1 = reference_vote(&ck, ex, Some(d0), &toks, seq_len).unwrap();
    let err = got1
        .iter()
        .zip(&want1)
        .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    assert!(err < 2e-4, "{name}: exit {d0} alone: max |Δ| {err:.3e}");

    // Cached decoding votes too: every greedy token is the reference vote's argmax.
    let prompt = &toks[..5];
    let new = generate(
        &mut e,
        prompt,
        &GenerateOptions {
            max_tokens: 4,
            temperature: 0.0,
            stop_at_eos: false,
            ..Default::default()
        },
        &mut |_| Ok(()),
    )
    .unwrap();
    let mut seq = prompt.to_vec();
    seq.extend(&new[..3]);
    let r = reference_vote(&ck, ex, None, &seq, seq.len()).unwrap();
    for (i, &t) in new.iter().enumerate() {
        let row = &r[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
        let best = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        assert_eq!(t as usize, best, "{name}: generated token {i}");
    }
}

#[test]
fn llama_two_exits_match_reference() {
    let mut s = SyntheticLlama::tiny("LlamaForCausalLM");
    s.layers = 4;
    check("llama", s, &[1, 3], 13, 3);
}

#[test]
fn qwen2_bf16_tied_exit_matches_reference() {
    let mut s = SyntheticLlama::tiny("Qwen2ForCausalLM");
    s.layers = 3;
    s.dtype = DType::BF16;
    s.extra
        .insert("tie_word_embeddings".into(), serde_json::json!(true));
    check("qwen2", s, &[2], 11, 2);
}

/// SmolLM2-135M's shape (hidden 576, 9/3 heads of 64, 49,152 tokens, tied): one exit after the
/// first of two layers, at a real context.
#[test]
fn real_shape_exit_matches_reference() {
    let s = SyntheticLlama::family("smollm2-135m", 2).unwrap();
    check("smollm2-135m", s, &[1], 64, 1);
}

#[test]
fn bad_exits_files_are_refused_by_name() {
    let spec = SyntheticLlama::tiny("LlamaForCausalLM");
    let cases: [(&[usize], usize, &str); 3] = [
        (&[2], spec.hidden, "between 1 and 1"),
        (&[0], spec.hidden, "between 1 and 1"),
        (&[1], spec.hidden + 1, "shape"),
    ];
    for (depths, hidden, want) in cases {
        let d = tempfile::tempdir().unwrap();
        spec.write(d.path()).unwrap();
        let values: Vec<ExitValues> = depths
            .iter()
            .map(|&dep| ExitValues {
                depth: dep,
                norm: vec![1.0; hidden],
                head: vec![0.0; spec.vocab * hidden],
            })
            .collect();
        exits::write(d.path(), &values, hidden, DType::F32).unwrap();
        let err = Checkpoint::open(d.path()).unwrap_err().to_string();
        assert!(err.contains(exits::EXITS_FILE), "{err}");
        assert!(err.contains(want), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn vote_without_exits_is_refused_before_any_work() {
    let model = common::project_root().join("assets/models/gutenberg-llama");
    for args in [
        vec!["eval", "--vote", "--text", "README.md", "--ctx", "16"],
        vec!["generate", "--vote", "--max-tokens", "2"],
    ] {
        let mut a = vec![args[0], model.to_str().unwrap()];
        a.extend_from_slice(&args[1..]);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_pumice"))
            .args(&a)
            .current_dir(common::project_root())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("has no exits"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// Qwen2.5-0.5B's shape (896 wide, q/k/v biases, 151,936 tokens, bf16, tied): an exit head
/// larger than a 128 MiB binding (chunked), the vote over vocabulary-wide rows.
#[test]
fn qwen25_shape_exit_matches_reference() {
    let s = SyntheticLlama::family("qwen2.5-0.5b", 2).unwrap();
    check("qwen2.5-0.5b", s, &[1], 16, 1);
}
