//! Fine-tuning on the GPU: the gradient of the whole model's loss with respect to its adapters
//! (composed of the backward kernels through every decoder layer, recomputed layer by layer)
//! against central finite differences of the f64 reference loss (cpu::train), on tiny
//! checkpoints of the real families' structure (GQA, Qwen2 biases with a tied head, a sliding
//! window), for cross-entropy and distillation objectives.

mod common;

use common::{gpu, random};
use pumice::cpu::grad::{finite_differences, Scored};
use pumice::cpu::train::{model_loss, RefAdapter};
use pumice::gpu::grad::AdamW;
use pumice::gpu::xent::Objective;
use pumice::gpu::{Gpu, GpuMatrix};
use pumice::infer::{Engine, EngineOptions};
use pumice::model::synthetic::SyntheticLlama;
use pumice::model::{Checkpoint, LinearKind};
use pumice::train::finetune::next_tokens;
use pumice::train::{AdapterPlan, TrainModel, Trainable};
use pumice::DType;

fn trainable() -> Trainable {
    Trainable {
        adapters: Vec::new(),
        exits: Vec::new(),
        opt: AdamW::default(),
        max_grad_norm: 0.0,
        step: 0,
        qat: false,
    }
}

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + seed * 97) % vocab as u64) as u32)
        .collect()
}

/// Write `spec` into a temporary directory and open it.
fn checkpoint(spec: &SyntheticLlama) -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    spec.write(dir.path()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    (dir, ck)
}

/// `ck` with LoRA adapters of `plan`, layers resident, for sequences of up to `t`.
fn model<'a>(g: &'a Gpu, ck: &'a Checkpoint, t: usize, plan: &AdapterPlan) -> TrainModel<'a> {
    let opts = EngineOptions {
        resident_bytes: u64::MAX,
        max_positions: t,
    };
    TrainModel::new(
        Engine::new(g, ck, &opts).unwrap(),
        plan,
        trainable(),
        u64::MAX,
    )
    .unwrap()
}

fn rel(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// LoRA adapters of rank 2 on every linear with random A and B (B = 0 would leave A's
/// gradient zero), the GPU's loss and gradient against the f64 loss and its finite
/// differences.
fn check(name: &str, spec: SyntheticLlama, t: usize, nseq: usize, teacher: bool) {
    let g: Gpu = gpu();
    let (_dir, ck) = checkpoint(&spec);
    let c = ck.config().clone();
    let plan = AdapterPlan::Lora {
        rank: 2,
        alpha: 3.0,
        targets: LinearKind::ALL.to_vec(),
        seed: 5,
    };
    let mut model = model(&g, &ck, t, &plan);
    assert_eq!(model.trainable.adapters.len(), 7 * c.num_layers);
    let mut refs = Vec::new();
    for (i, ad) in model.trainable.adapters.iter_mut().enumerate() {
        let [m, r] = ad.b.theta.shape();
        let b = random(m * r, 100 + i as u64, 0.0);
        let b: Vec<f32> = b.iter().map(|x| x * 0.5).collect();
        ad.b.theta = GpuMatrix::from_f32(&g, m, r, DType::F32, &b).unwrap();
        refs.push(RefAdapter {
            layer: ad.layer,
            kind: ad.kind,
            a: ad
                .a
                .theta
                .to_f32(&g)
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .collect(),
            b: b.iter().map(|&x| x as f64).collect(),
            rank: r,
            scale: ad.scale as f64,
        });
    }
    let tokens = ids(t * nseq, c.vocab_size, 3);
    let rows = tokens.len();
    let targets = next_tokens(&tokens, t);
    let (th, thead) = (
        random(rows * 24, 11, 0.0),
        random(c.vocab_size * 24, 12, 0.0),
    );
    let (th_g, thead_g) = (
        GpuMatrix::from_f32(&g, rows, 24, DType::F32, &th).unwrap(),
        GpuMatrix::from_f32(&g, c.vocab_size, 24, DType::F32, &thead).unwrap(),
    );
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let (thd, theadd) = (wide(&th), wide(&thead));
    let (objective, scored) = if teacher {
        (
            Objective::Teacher {
                hidden: &th_g,
                head: &thead_g,
            },
            Scored::Teacher {
                hidden: &thd,
                head: &theadd,
                d: 24,
            },
        )
    } else {
        (Objective::Targets(&targets), Scored::Targets(&targets))
    };
    let got = model.loss_and_backward(&tokens, t, &objective).unwrap();
    let want = model_loss(&ck, &refs, &tokens, t, &scored).unwrap();
    assert!(
        (got.loss - want).abs() < 1e-5 * want.abs().max(1.0),
        "{name}: loss {} vs f64 {want}",
        got.loss
    );
    // Evaluation gives the same loss and leaves the gradients alone.
    let again = model.loss(&tokens, t, &objective).unwrap();
    assert!((again - got.loss).abs() < 1e-6 * want.abs().max(1.0));

    // Every adapter value's gradient against finite differences of the f64 loss.
    let mut all_got = Vec::new();
    let mut all_fd = Vec::new();
    for (i, ad) in model.trainable.adapters.iter().enumerate() {
        for (which, grad) in [(0, &ad.a.grad), (1, &ad.b.grad)] {
            let got = wide(&grad.to_f32(&g).unwrap());
            let start = if which == 0 {
                refs[i].a.clone()
            } else {
                refs[i].b.clone()
            };
            let fd = finite_differences(&start, 1e-5, &|v| {
                let mut r = refs.clone();
                if which == 0 {
                    r[i].a = v.to_vec();
                } else {
                    r[i].b = v.to_vec();
                }
                model_loss(&ck, &r, &tokens, t, &scored).unwrap()
            });
            all_got.extend(got);
            all_fd.extend(fd);
        }
    }
    let err = rel(&all_got, &all_fd);
    eprintln!(
        "{name}: loss {:.6} (f64 {want:.6}); {} gradient values, relative error {err:.2e}",
        got.loss,
        all_fd.len()
    );
    assert!(err < 1e-3, "{name}: gradient relative error {err:.3e}");
    assert!(
        all_fd.iter().any(|v| v.abs() > 1e-6),
        "{name}: a zero gradient checks nothing"
    );
}

#[test]
fn llama_gqa_cross_entropy_gradient_matches_finite_differences() {
    let mut s = SyntheticLlama::tiny("LlamaForCausalLM");
    s.hidden = 16;
    s.intermediate = 24;
    s.vocab = 37;
    check("llama gqa, ce", s, 7, 2, false);
}

#[test]
fn qwen2_biases_tied_head_distillation_gradient_matches_finite_differences() {
    let mut s = SyntheticLlama::tiny("Qwen2ForCausalLM");
    s.hidden = 16;
    s.intermediate = 24;
    s.vocab = 41;
    s.extra
        .insert("tie_word_embeddings".into(), serde_json::json!(true));
    s.dtype = DType::BF16;
    check("qwen2 biases tied bf16, kl", s, 5, 3, true);
}

#[test]
fn mistral_sliding_window_one_head_gradient_matches_finite_differences() {
    let mut s = SyntheticLlama::tiny("MistralForCausalLM");
    s.hidden = 8;
    s.intermediate = 13;
    s.heads = 1;
    s.kv_heads = 1;
    s.layers = 3;
    s.vocab = 23;
    s.extra
        .insert("sliding_window".into(), serde_json::json!(3));
    check("mistral window 3, one head, ce", s, 6, 1, false);
}

/// Edge-LLM's adaptive layer tuning: with exits every layer and a window of one layer below
/// exit 1 (depth 2 of 3), the gradient reaches exactly the window's adapters and the exit's
/// norm and head, and matches finite differences of the f64 loss at that exit; everything
/// below the window gets nothing. The exits start as copies of the model's norm and head.
#[test]
fn window_below_an_exit_gradient_matches_finite_differences() {
    use pumice::cpu::train::{model_loss_at, RefExit};
    use pumice::train::params::Window;
    let g: Gpu = gpu();
    let mut spec = SyntheticLlama::tiny("LlamaForCausalLM");
    spec.hidden = 8;
    spec.intermediate = 12;
    spec.layers = 3;
    spec.vocab = 19;
    let (_dir, ck) = checkpoint(&spec);
    let c = ck.config().clone();
    let t = 5;
    let plan = AdapterPlan::Lora {
        rank: 2,
        alpha: 2.0,
        targets: vec![LinearKind::QProj, LinearKind::DownProj],
        seed: 9,
    };
    let mut model = model(&g, &ck, t, &plan);
    model.add_exits(1).unwrap();
    assert_eq!(
        model
            .trainable
            .exits
            .iter()
            .map(|e| e.depth)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let mut refs = Vec::new();
    for (i, ad) in model.trainable.adapters.iter_mut().enumerate() {
        let [m, r] = ad.b.theta.shape();
        let b = random(m * r, 200 + i as u64, 0.0);
        ad.b.theta = GpuMatrix::from_f32(&g, m, r, DType::F32, &b).unwrap();
        refs.push(RefAdapter {
            layer: ad.layer,
            kind: ad.kind,
            a: wide(&ad.a.theta.to_f32(&g).unwrap()),
            b: wide(&b),
            rank: r,
            scale: ad.scale as f64,
        });
    }
    // Move exit 1's norm and head away from the model's so the test sees them used.
    let e = &mut model.trainable.exits[1];
    let norm: Vec<f32> = random(c.hidden_size, 31, 1.0);
    let head: Vec<f32> = random(c.vocab_size * c.hidden_size, 32, 0.0);
    e.norm.theta = GpuMatrix::from_f32(&g, 1, c.hidden_size, DType::F32, &norm).unwrap();
    e.head.theta = GpuMatrix::from_f32(&g, c.vocab_size, c.hidden_size, DType::F32, &head).unwrap();
    let exit = RefExit {
        depth: 2,
        norm: wide(&norm),
        head: wide(&head),
    };
    let tokens = ids(t * 2, c.vocab_size, 4);
    let targets = next_tokens(&tokens, t);
    let window = Window {
        layers: 1..2,
        exit: Some(1),
    };
    let got = model
        .loss_and_backward_window(&tokens, t, &Objective::Targets(&targets), &window)
        .unwrap();
    let scored = Scored::Targets(&targets);
    let want = model_loss_at(&ck, &refs, Some(&exit), &tokens, t, &scored).unwrap();
    assert!(
        (got.loss - want).abs() < 1e-5 * want,
        "loss {} vs {want}",
        got.loss
    );
    let at = model
        .loss_at(&tokens, t, &Objective::Targets(&targets), Some(1))
        .unwrap();
    assert!((at - got.loss).abs() < 1e-6 * want);
    let loss_with = |r: &[RefAdapter], e: &RefExit| {
        model_loss_at(&ck, r, Some(e), &tokens, t, &scored).unwrap()
    };
    let (mut got_all, mut fd_all) = (Vec::new(), Vec::new());
    for (i, ad) in model.trainable.adapters.iter().enumerate() {
        for which in 0..2 {
            let grad = if which == 0 { &ad.a.grad } else { &ad.b.grad };
            let got = wide(&grad.to_f32(&g).unwrap());
            if ad.layer != 1 {
                assert!(
                    got.iter().all(|&v| v == 0.0),
                    "layer {} is outside the window but got a gradient",
                    ad.layer
                );
                continue;
            }
            let start = if which == 0 { &refs[i].a } else { &refs[i].b };
            let fd = finite_differences(start, 1e-5, &|v| {
                let mut r = refs.clone();
                if which == 0 {
                    r[i].a = v.to_vec();
                } else {
                    r[i].b = v.to_vec();
                }
                loss_with(&r, &exit)
            });
            got_all.extend(got);
            fd_all.extend(fd);
        }
    }
    let e = &model.trainable.exits[1];
    got_all.extend(wide(&e.norm.grad.to_f32(&g).unwrap()));
    fd_all.extend(finite_differences(&exit.norm, 1e-5, &|v| {
        let mut x = exit.clone();
        x.norm = v.to_vec();
        loss_with(&refs, &x)
    }));
    got_all.extend(wide(&e.head.grad.to_f32(&g).unwrap()));
    fd_all.extend(finite_differences(&exit.head, 1e-5, &|v| {
        let mut x = exit.clone();
        x.head = v.to_vec();
        loss_with(&refs, &x)
    }));
    let other = &model.trainable.exits[0];
    assert!(other
        .head
        .grad
        .to_f32(&g)
        .unwrap()
        .iter()
        .all(|&v| v == 0.0));
    let err = rel(&got_all, &fd_all);
    eprintln!(
        "window 1..2 at exit depth 2: {} values, relative error {err:.2e}",
        fd_all.len()
    );
    assert!(err < 1e-3, "relative error {err:.3e}");
}
