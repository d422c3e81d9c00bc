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
    assert_eq!(o.status.code(), Some(1));
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
