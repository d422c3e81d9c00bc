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
