//! Trainable parameters on the GPU and their optimizer: each an f32 master copy with its
//! gradient and AdamW moments, grouped into low-rank adapters y += s·(x·Aᵀ)·Bᵀ on linear
//! layers (CALDERA's factors A = R, B = L, s = 1; LoRA's A, B, s = α/r).

use crate::error::{Error, Result};
use crate::gpu::grad::{adamw_step, sum_squares, AdamW};
use crate::gpu::{Batch, Gpu, GpuMatrix};
use crate::model::LinearKind;

use super::store::FactorStore;

/// One trainable matrix: value, gradient, AdamW's first and second moments (all f32, one
/// shape).
pub struct Param {
    pub theta: GpuMatrix,
    pub grad: GpuMatrix,
    m: GpuMatrix,
    v: GpuMatrix,
    /// AdamW steps this parameter has taken (its bias correction: with layer windows not
    /// every parameter moves at every step).
    pub t: u32,
}

impl Param {
    /// A parameter starting from `theta` (gradient and moments zero).
    pub fn new(gpu: &Gpu, theta: GpuMatrix) -> Result<Param> {
        let [r, c] = theta.shape();
        Ok(Param {
            grad: GpuMatrix::zeros(gpu, r, c)?,
            m: GpuMatrix::zeros(gpu, r, c)?,
            v: GpuMatrix::zeros(gpu, r, c)?,
            theta,
            t: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.theta.rows() * self.theta.cols()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values of the value, the gradient and the two moments, for a checkpoint of the
    /// optimizer's state (in that order).
    pub fn state(&self, gpu: &Gpu) -> Result<[Vec<f32>; 4]> {
        Ok([
            self.theta.to_f32(gpu)?,
            self.grad.to_f32(gpu)?,
            self.m.to_f32(gpu)?,
            self.v.to_f32(gpu)?,
        ])
    }

    /// Restore what [`state`](Self::state) returned.
    pub fn restore(&mut self, gpu: &Gpu, state: &[Vec<f32>; 4]) -> Result<()> {
        let [r, c] = self.theta.shape();
        let up = |v: &[f32]| GpuMatrix::from_f32(gpu, r, c, crate::DType::F32, v);
        self.theta = up(&state[0])?;
        self.grad = up(&state[1])?;
        self.m = up(&state[2])?;
        self.v = up(&state[3])?;
        Ok(())
    }
}

/// A trainable low-rank term on one linear layer: y += scale·(x·Aᵀ)·Bᵀ, A: r × in, B: out × r.
pub struct Adapter {
    pub layer: usize,
    pub kind: LinearKind,
    pub a: Param,
    pub b: Param,
    pub scale: f32,
    /// CALDERA's factors: how they are stored.
    pub store: Option<FactorStore>,
    /// Quantization-aware training: the stored (rounded) A and B the passes use, refreshed
    /// from the f32 masters after every step; the masters take their gradients unchanged
    /// (straight-through).
    rounded: Option<(GpuMatrix, GpuMatrix)>,
}

impl Adapter {
    pub fn new(
        layer: usize,
        kind: LinearKind,
        a: Param,
        b: Param,
        scale: f32,
        store: Option<FactorStore>,
    ) -> Adapter {
        Adapter {
            layer,
            kind,
            a,
            b,
            scale,
            store,
            rounded: None,
        }
    }

    pub fn rank(&self) -> usize {
        self.a.theta.rows()
    }

    /// A as the passes use it (rounded under quantization-aware training).
    pub fn a_value(&self) -> &GpuMatrix {
        self.rounded.as_ref().map_or(&self.a.theta, |r| &r.0)
    }

    /// B as the passes use it.
    pub fn b_value(&self) -> &GpuMatrix {
        self.rounded.as_ref().map_or(&self.b.theta, |r| &r.1)
    }

    /// Round the masters through the stored grid (host RTN), for the passes.
    pub fn round(&mut self, gpu: &Gpu) -> Result<()> {
        let Some(store) = self.store else {
            return Ok(());
        };
        let k = self.rank();
        let (l, r) = store.round_trip(
            &self.b.theta.to_f32(gpu)?,
            &self.a.theta.to_f32(gpu)?,
            k,
            None,
        );
        let up = |rows, cols, v: &[f32]| GpuMatrix::from_f32(gpu, rows, cols, crate::DType::F32, v);
        self.rounded = Some((up(k, store.cols, &r)?, up(store.rows, k, &l)?));
        Ok(())
    }
}

/// An early exit (Edge-LLM's adaptive layer tuning): after `depth` decoder layers, its own
/// final norm and LM head (initialized from the model's), trained with the layers below it.
pub struct ExitHead {
    pub depth: usize,
    pub norm: Param,
    pub head: Param,
}

/// Which parameters a step trains: the adapters of layers `layers` and, when given, an exit's
/// head (None: every parameter).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub layers: std::ops::Range<usize>,
    pub exit: Option<usize>,
}

/// Every trainable parameter and the optimizer over them.
pub struct Trainable {
    pub adapters: Vec<Adapter>,
    /// Intermediate exits, shallowest first (the model's own head is the last exit).
    pub exits: Vec<ExitHead>,
    pub opt: AdamW,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
    /// Optimizer steps taken.
    pub step: u32,
    /// Quantization-aware training of adapters with a stored grid.
    pub qat: bool,
}

/// What one optimizer step saw.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    /// The global gradient norm before clipping (of the accumulated, averaged gradient).
    pub grad_norm: f64,
}

impl Trainable {
    /// Every parameter: the adapters' A and B, then each exit's norm and head.
    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.adapters
            .iter()
            .flat_map(|a| [&a.a, &a.b])
            .chain(self.exits.iter().flat_map(|e| [&e.norm, &e.head]))
    }

    /// [`params`](Self::params), mutably, in the same order.
    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.adapters
            .iter_mut()
            .flat_map(|a| [&mut a.a, &mut a.b])
            .chain(
                self.exits
                    .iter_mut()
                    .flat_map(|e| [&mut e.norm, &mut e.head]),
            )
    }

    /// The parameters `window` trains (all of them for None), as flags in `params` order.
    fn active(&self, window: Option<&Window>) -> Vec<bool> {
        let Some(w) = window else {
            return vec![true; self.params().count()];
        };
        self.adapters
            .iter()
            .flat_map(|a| [w.layers.contains(&a.layer); 2])
            .chain((0..self.exits.len()).flat_map(|i| [w.exit == Some(i); 2]))
            .collect()
    }

    /// Number of trainable values.
    pub fn count(&self) -> usize {
        self.params().map(Param::len).sum()
    }

    /// The adapter of (layer, kind), if that linear has one.
    pub fn get(&self, layer: usize, kind: LinearKind) -> Option<&Adapter> {
        self.adapters
            .iter()
            .find(|a| a.layer == layer && a.kind == kind)
    }

    /// Zero every gradient (queued after all work submitted so far).
    pub fn zero_grad(&self, gpu: &Gpu) {
        for p in self.params() {
            for c in p.grad.chunks() {
                gpu.clear(&c.buf);
            }
        }
    }

    /// One AdamW step on gradients accumulated over `micro` micro-batches (averaged), clipped
    /// to `max_grad_norm`. A non-finite gradient is refused before anything changes.
    pub fn step(&mut self, gpu: &Gpu, micro: usize) -> Result<StepInfo> {
        self.step_window(gpu, micro, None)
    }

    /// [`step`](Self::step) of the parameters `window` trains (the others keep their values
    /// and moments).
    pub fn step_window(
        &mut self,
        gpu: &Gpu,
        micro: usize,
        window: Option<&Window>,
    ) -> Result<StepInfo> {
        let active = self.active(window);
        let grads: Vec<&GpuMatrix> = self
            .params()
            .zip(&active)
            .filter(|(_, &a)| a)
            .map(|(p, _)| &p.grad)
            .collect();
        let avg = 1.0 / micro.max(1) as f64;
        let norm = sum_squares(gpu, &grads)?.sqrt() * avg;
        if !norm.is_finite() {
            return Err(Error::Gpu {
                op: format!("optimizer step {}", self.step + 1),
                msg: format!("the gradient norm is {norm}: training diverged (lower --lr)"),
            });
        }
        let clip = if self.max_grad_norm > 0.0 && norm > self.max_grad_norm as f64 {
            self.max_grad_norm as f64 / norm
        } else {
            1.0
        };
        self.step += 1;
        let mut batch = Batch::new(gpu);
        let opt = self.opt;
        for (p, _) in self.params_mut().zip(active).filter(|(_, a)| *a) {
            p.t += 1;
            adamw_step(
                &mut batch,
                &opt,
                p.t,
                (avg * clip) as f32,
                &p.grad,
                &p.theta,
                &p.m,
                &p.v,
            )?;
        }
        batch.submit()?;
        self.round(gpu)?;
        Ok(StepInfo { grad_norm: norm })
    }

    /// Under quantization-aware training, round every stored adapter (after each step).
    pub fn round(&mut self, gpu: &Gpu) -> Result<()> {
        if self.qat {
            for a in self.adapters.iter_mut() {
                a.round(gpu)?;
            }
        }
        Ok(())
    }
}
