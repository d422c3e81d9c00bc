//! A model being fine-tuned on the GPU: the frozen weights (as the forward pass uses them:
//! dense, dequantized, or Q + L·R), trainable low-rank adapters on chosen linears, and the
//! forward and backward passes.
//!
//! Memory: the forward keeps only the residual stream entering each decoder layer (layers ×
//! rows × hidden f32); the backward recomputes one layer's forward from its saved input,
//! keeping that layer's intermediates, and propagates the residual gradient through it in
//! place, so activation memory is one layer's plus the saved streams. The LM head's loss is
//! formed over blocks of positions (`gpu::xent`), never T × V logits.

use crate::error::{Error, Result};
use crate::gpu::attn_grad::{attention_backward, AttnGradShape};
use crate::gpu::gemm::{gemm, gemm_scaled, GemmOp};
use crate::gpu::grad::{rms_norm_backward, swiglu_backward};
use crate::gpu::linear_grad::low_rank_backward;
use crate::gpu::ops::transpose;
use crate::gpu::ops::{self, AttentionShape, KvLayout};
use crate::gpu::xent::{lm_head_loss_backward_trainable, Objective};
use crate::gpu::{Batch, Gpu, GpuBuffer, GpuMatrix};
use crate::infer::engine::{linear, LayerWeights, LinearWeight};
use crate::infer::Engine;
use crate::model::{LinearKind, ModelConfig};

use super::params::{Adapter, ExitHead, Param, Trainable, Window};
pub use hessians::HessianWalk;

mod hessians;
use super::store::FactorStore;
use crate::quant::{Grid, GridKind};

/// Which linears get trainable adapters, and how they start.
#[derive(Clone, Debug)]
pub enum AdapterPlan {
    /// CALDERA's factors: every Q + L·R weight's L and R become trainable (A = R, B = L,
    /// scale 1), starting from their stored (dequantized) values; Q stays frozen. They are
    /// stored on a grid of `factor_bits` (None: the checkpoint's); with `qat` the passes see
    /// them rounded to it (straight-through to the f32 masters).
    Factors { factor_bits: Option<u32>, qat: bool },
    /// LoRA (PEFT's semantics): A uniform in ±1/√in (seeded), B = 0, scale α/r, on the
    /// linears of `targets` in every layer.
    Lora {
        rank: usize,
        alpha: f32,
        targets: Vec<LinearKind>,
        seed: u64,
    },
}

/// The model being trained.
pub struct TrainModel<'a> {
    engine: Engine<'a>,
    /// Each layer's frozen weights, kept on the GPU while they fit the resident budget; a
    /// layer past it (None) is read again — dequantized on the GPU — at each pass that needs
    /// it ([`TrainModel::frozen`]).
    layers: Vec<Option<LayerWeights>>,
    /// Whether CALDERA's factors are the trainable adapters (the frozen weight is Q alone).
    strip_factors: bool,
    pub trainable: Trainable,
}

/// GPU bytes of a layer's frozen weights.
fn frozen_bytes(w: &LayerWeights) -> u64 {
    let m = |x: &GpuMatrix| (x.rows() * x.cols() * x.dtype().size()) as u64;
    let mut n = m(&w.input_norm) + m(&w.post_norm);
    for (_, lw, bias) in &w.linears {
        n += match lw {
            LinearWeight::Dense(q) => m(q),
            LinearWeight::LowRank { q, lt, r } => m(q) + m(lt) + m(r),
        } + bias.as_ref().map_or(0, m);
    }
    n
}

/// What a decoder layer's forward keeps for its backward.
struct Acts {
    h1: GpuMatrix,
    q: GpuMatrix,
    k: GpuMatrix,
    v: GpuMatrix,
    a: GpuMatrix,
    x1: GpuMatrix,
    h2: GpuMatrix,
    g: GpuMatrix,
    u: GpuMatrix,
    act: GpuMatrix,
    /// x·Aᵀ of each adapter, by linear.
    lowrank: Vec<(LinearKind, GpuMatrix)>,
}

impl Acts {
    fn lowrank(&self, kind: LinearKind) -> Option<&GpuMatrix> {
        self.lowrank
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, u)| u)
    }
}

/// The loss of one batch and, for a backward pass, nothing else to report.
#[derive(Clone, Copy, Debug)]
pub struct BatchLoss {
    /// Mean loss over the counted positions.
    pub loss: f64,
}

impl<'a> TrainModel<'a> {
    /// Load every layer of `engine`'s checkpoint and attach adapters. Layers' frozen weights
    /// stay on the GPU while their total is at most `resident_bytes`; the rest are read again
    /// when a pass needs them.
    pub fn new(
        engine: Engine<'a>,
        plan: &AdapterPlan,
        trainable: Trainable,
        resident_bytes: u64,
    ) -> Result<Self> {
        let gpu = engine.gpu();
        let n = engine.checkpoint().config().num_layers;
        let mut layers = Vec::with_capacity(n);
        let mut adapters = Vec::new();
        let mut held = 0u64;
        for l in 0..n {
            let mut layer = engine.read_layer(l)?;
            engine.checkpoint().release_layer(l);
            let mut linears = Vec::with_capacity(layer.linears.len());
            for (kind, w, bias) in std::mem::take(&mut layer.linears) {
                let w = match (plan, w) {
                    (
                        AdapterPlan::Factors { factor_bits, qat },
                        LinearWeight::LowRank { q, lt, r },
                    ) => {
                        let name = &engine.checkpoint().arch().layers[l]
                            .linear(kind)
                            .weight
                            .name;
                        let store = match engine.checkpoint().quantized(name) {
                            Some(e) => Some(FactorStore {
                                grid: Grid::new(
                                    factor_bits.unwrap_or(e.lr_bits),
                                    e.lr_group_size,
                                    GridKind::Asymmetric,
                                )?
                                .with_clip(true),
                                rht: e.rht,
                                rows: e.rows,
                                cols: e.cols,
                                // The refit is not differentiated through: under QAT the
                                // straight-through step would train L for a rounding it
                                // does not get (measured worse); rounding once at the end,
                                // it only helps.
                                refit: !*qat,
                            }),
                            None => None,
                        };
                        let b = Param::new(gpu, transpose(gpu, &lt)?)?;
                        adapters.push(Adapter::new(l, kind, Param::new(gpu, r)?, b, 1.0, store));
                        LinearWeight::Dense(q)
                    }
                    (
                        AdapterPlan::Lora {
                            rank,
                            alpha,
                            targets,
                            seed,
                        },
                        w,
                    ) if targets.contains(&kind) => {
                        let (out, inp) = match &w {
                            LinearWeight::Dense(m) => (m.rows(), m.cols()),
                            LinearWeight::LowRank { q, .. } => (q.rows(), q.cols()),
                        };
                        let r = (*rank).max(1);
                        let bound = 1.0 / (inp as f32).sqrt();
                        let mut rng = crate::base::rng::Rng::new(
                            seed ^ ((l as u64) << 8 | kind as u64).wrapping_mul(0x9E37_79B9),
                        );
                        let a: Vec<f32> = (0..r * inp)
                            .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * bound)
                            .collect();
                        adapters.push(Adapter::new(
                            l,
                            kind,
                            Param::new(
                                gpu,
                                GpuMatrix::from_f32(gpu, r, inp, crate::DType::F32, &a)?,
                            )?,
                            Param::new(gpu, GpuMatrix::zeros(gpu, out, r)?)?,
                            alpha / r as f32,
                            None,
                        ));
                        w
                    }
                    (_, w) => w,
                };
                linears.push((kind, w, bias));
            }
            layer.linears = linears;
            held += frozen_bytes(&layer);
            layers.push((held <= resident_bytes).then_some(layer));
        }
        if adapters.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: nothing to train ({})",
                engine.checkpoint().dir().display(),
                match plan {
                    AdapterPlan::Factors { .. } =>
                        "no weight has CALDERA factors; use LoRA adapters for this model",
                    AdapterPlan::Lora { .. } => "no linear matches the LoRA targets",
                }
            )));
        }
        let mut trainable = trainable;
        trainable.adapters = adapters;
        // The stored factors are used as they are until the first step moves them.
        trainable.qat = matches!(plan, AdapterPlan::Factors { qat: true, .. });
        Ok(TrainModel {
            engine,
            layers,
            strip_factors: matches!(plan, AdapterPlan::Factors { .. }),
            trainable,
        })
    }

    /// Layers whose frozen weights are kept on the GPU.
    pub fn resident_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.is_some()).count()
    }

    /// Layer `l`'s frozen weights: the resident copy, or read again into `held` (as `new`
    /// read them: with CALDERA's factors trainable, the weight is Q alone).
    fn frozen<'s>(
        &'s self,
        l: usize,
        held: &'s mut Option<LayerWeights>,
    ) -> Result<&'s LayerWeights> {
        if let Some(w) = &self.layers[l] {
            return Ok(w);
        }
        let mut w = self.engine.read_layer(l)?;
        self.engine.checkpoint().release_layer(l);
        if self.strip_factors {
            w.linears = std::mem::take(&mut w.linears)
                .into_iter()
                .map(|(kind, lw, bias)| match lw {
                    LinearWeight::LowRank { q, .. } => (kind, LinearWeight::Dense(q), bias),
                    dense => (kind, dense, bias),
                })
                .collect();
        }
        Ok(held.insert(w))
    }

    pub fn gpu(&self) -> &'a Gpu {
        self.engine.gpu()
    }

    pub fn engine(&self) -> &Engine<'a> {
        &self.engine
    }

    fn config(&self) -> &ModelConfig {
        self.engine.checkpoint().config()
    }

    /// Add an exit after every `every` decoder layers below the last (Edge-LLM's adaptive
    /// layer tuning), each with a trainable final norm and LM head starting from the model's
    /// (f32 copies).
    pub fn add_exits(&mut self, every: usize) -> Result<()> {
        let gpu = self.gpu();
        let n = self.layers.len();
        let norm = self.engine.final_norm_weight().to_f32(gpu)?;
        let head = self.engine.head();
        let (v, d) = (head.rows(), head.cols());
        let head = head.to_f32(gpu)?;
        let up = |r, c, x: &[f32]| GpuMatrix::from_f32(gpu, r, c, crate::DType::F32, x);
        let mut depth = every.max(1);
        while depth < n {
            self.trainable.exits.push(ExitHead {
                depth,
                norm: Param::new(gpu, up(1, d, &norm)?)?,
                head: Param::new(gpu, up(v, d, &head)?)?,
            });
            depth += every.max(1);
        }
        Ok(())
    }

    /// The loss of `tokens` (whole sequences of `t`) against `objective` without a backward
    /// pass (evaluation), at the model's head or at intermediate exit `exit`.
    pub fn loss(&self, tokens: &[u32], t: usize, objective: &Objective<'_>) -> Result<f64> {
        self.run(tokens, t, objective, false, None).map(|l| l.loss)
    }

    /// [`loss`](Self::loss) at exit `exit` (None: the model's own head).
    pub fn loss_at(
        &self,
        tokens: &[u32],
        t: usize,
        objective: &Objective<'_>,
        exit: Option<usize>,
    ) -> Result<f64> {
        let w = Window { layers: 0..0, exit };
        self.run(tokens, t, objective, false, Some(&w))
            .map(|l| l.loss)
    }

    /// The loss and, added to every adapter's gradient, its gradient.
    pub fn loss_and_backward(
        &self,
        tokens: &[u32],
        t: usize,
        objective: &Objective<'_>,
    ) -> Result<BatchLoss> {
        self.run(tokens, t, objective, true, None)
    }

    /// The loss at `window`'s exit (None: the model's head), the gradient added to the
    /// adapters of the window's layers and to the exit's norm and head; backpropagation stops
    /// at the window's lowest layer, and only the streams entering the window's layers are
    /// kept.
    pub fn loss_and_backward_window(
        &self,
        tokens: &[u32],
        t: usize,
        objective: &Objective<'_>,
        window: &Window,
    ) -> Result<BatchLoss> {
        self.run(tokens, t, objective, true, Some(window))
    }

    fn run(
        &self,
        tokens: &[u32],
        t: usize,
        objective: &Objective<'_>,
        backward: bool,
        window: Option<&Window>,
    ) -> Result<BatchLoss> {
        let n_layers = self.layers.len();
        let exit = match window.and_then(|w| w.exit) {
            Some(e) => Some(
                self.trainable
                    .exits
                    .get(e)
                    .ok_or_else(|| Error::InvalidArgument(format!("exit {e} does not exist")))?,
            ),
            None => None,
        };
        let depth = exit.map_or(n_layers, |e| e.depth);
        let lo = window.map_or(0, |w| w.layers.start.min(depth));
        let c = self.config().clone();
        let gpu = self.gpu();
        let rows = tokens.len();
        let (mut x, pos) = self.stream_start(tokens, t)?;
        let mut saved = Vec::with_capacity(depth - lo);
        for l in 0..depth {
            let (out, _) = self.layer_forward(l, &x, &pos, t)?;
            if backward && l >= lo {
                saved.push(std::mem::replace(&mut x, out));
            } else {
                x = out;
            }
        }
        let eps = c.rms_norm_eps as f32;
        let (norm_w, head) = match exit {
            Some(e) => (&e.norm.theta, &e.head.theta),
            None => (self.engine.final_norm_weight(), self.engine.head()),
        };
        let hf = GpuMatrix::uninit_grouped(gpu, rows, c.hidden_size, t)?;
        let mut b = Batch::new(gpu);
        ops::rms_norm(&mut b, &x, norm_w, eps, &hf)?;
        b.submit()?;
        let dh = GpuMatrix::uninit(gpu, rows, c.hidden_size)?;
        let dhead = exit.filter(|_| backward).map(|e| &e.head.grad);
        let loss = lm_head_loss_backward_trainable(gpu, &hf, head, objective, &dh, dhead, None)?;
        if !backward {
            return Ok(BatchLoss { loss });
        }
        let dres = GpuMatrix::uninit_grouped(gpu, rows, c.hidden_size, t)?;
        let dw = GpuMatrix::zeros(gpu, 1, c.hidden_size)?;
        let dnorm = exit.map_or(&dw, |e| &e.norm.grad);
        let mut b = Batch::new(gpu);
        rms_norm_backward(&mut b, &x, norm_w, &dh, eps, &dres, false, dnorm)?;
        b.submit()?;
        drop((hf, dh, x));
        for l in (lo..depth).rev() {
            let xl = saved.pop().expect("one saved stream per layer");
            let (_, acts) = self.layer_forward(l, &xl, &pos, t)?;
            self.layer_backward(l, &xl, &acts, &pos, t, &dres, &dw)?;
        }
        Ok(BatchLoss { loss })
    }

    /// The embedded `tokens` (sequences of `t`) and their positions: where a forward starts.
    fn stream_start(&self, tokens: &[u32], t: usize) -> Result<(GpuMatrix, GpuBuffer)> {
        self.engine.check_sequences(tokens, t)?;
        let positions: Vec<u32> = (0..tokens.len()).map(|r| (r % t) as u32).collect();
        let pos = ops::upload_u32(self.gpu(), &positions)?;
        Ok((self.engine.embed_tokens(tokens, t)?, pos))
    }

    /// Decoder layer `l` on the residual stream `x` (rows grouped by `t`): the stream it
    /// leaves and its intermediates.
    fn layer_forward(
        &self,
        l: usize,
        x: &GpuMatrix,
        pos: &GpuBuffer,
        t: usize,
    ) -> Result<(GpuMatrix, Acts)> {
        let c = self.config();
        let gpu = self.gpu();
        let mut held = None;
        let w = self.frozen(l, &mut held)?;
        let rows = x.rows();
        let eps = c.rms_norm_eps as f32;
        let (qd, kd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let grouped = |cols: usize| GpuMatrix::uninit_grouped(gpu, rows, cols, t);
        let mut lowrank = Vec::new();
        let mut b = Batch::new(gpu);
        let h1 = grouped(c.hidden_size)?;
        ops::rms_norm(&mut b, x, &w.input_norm, eps, &h1)?;
        let (q, k, v) = (grouped(qd)?, grouped(kd)?, grouped(kd)?);
        for (kind, out) in [
            (LinearKind::QProj, &q),
            (LinearKind::KProj, &k),
            (LinearKind::VProj, &v),
        ] {
            self.apply(&mut b, w, l, kind, &h1, out, false, &mut lowrank)?;
        }
        let rope = self.engine.rope_table();
        ops::rope(&mut b, &q, 0..rows, c.num_heads, pos, rope)?;
        ops::rope(&mut b, &k, 0..rows, c.num_kv_heads, pos, rope)?;
        let a = grouped(qd)?;
        let shape = AttentionShape {
            t,
            s: t,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            q_pos0: 0,
            window: c.sliding_window.unwrap_or(0),
            kv_layout: KvLayout::Contiguous,
        };
        ops::attention(&mut b, &q, &k, &v, &a, shape)?;
        b.submit()?;
        let x1 = x.duplicate(gpu)?;
        let mut b = Batch::new(gpu);
        self.apply(&mut b, w, l, LinearKind::OProj, &a, &x1, true, &mut lowrank)?;
        let h2 = grouped(c.hidden_size)?;
        ops::rms_norm(&mut b, &x1, &w.post_norm, eps, &h2)?;
        let (g, u) = (grouped(c.intermediate_size)?, grouped(c.intermediate_size)?);
        self.apply(
            &mut b,
            w,
            l,
            LinearKind::GateProj,
            &h2,
            &g,
            false,
            &mut lowrank,
        )?;
        self.apply(
            &mut b,
            w,
            l,
            LinearKind::UpProj,
            &h2,
            &u,
            false,
            &mut lowrank,
        )?;
        b.submit()?;
        let act = g.duplicate(gpu)?;
        let x2 = x1.duplicate(gpu)?;
        let mut b = Batch::new(gpu);
        ops::swiglu(&mut b, &act, &u)?;
        self.apply(
            &mut b,
            w,
            l,
            LinearKind::DownProj,
            &act,
            &x2,
            true,
            &mut lowrank,
        )?;
        b.submit()?;
        Ok((
            x2,
            Acts {
                h1,
                q,
                k,
                v,
                a,
                x1,
                h2,
                g,
                u,
                act,
                lowrank,
            },
        ))
    }

    /// out (+)= inp·Wᵀ (+ bias) (+ s·(inp·Aᵀ)·Bᵀ with the adapter's inp·Aᵀ kept).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        b: &mut Batch<'_>,
        w: &LayerWeights,
        l: usize,
        kind: LinearKind,
        inp: &GpuMatrix,
        out: &GpuMatrix,
        accumulate: bool,
        lowrank: &mut Vec<(LinearKind, GpuMatrix)>,
    ) -> Result<()> {
        let rows = inp.rows();
        linear(b, inp, 0..rows, w.linear(kind), out, 0, accumulate)?;
        if let Some(ad) = self.trainable.get(l, kind) {
            let u = GpuMatrix::uninit(self.gpu(), rows, ad.rank())?;
            gemm(b, inp, ad.a_value(), GemmOp::NT, &u, false)?;
            gemm_scaled(b, &u, ad.b_value(), GemmOp::NT, out, true, ad.scale)?;
            lowrank.push((kind, u));
        }
        Ok(())
    }

    /// dx (+)= dy·W through linear `kind` of layer `l` (frozen weight and adapter), and the
    /// adapter's gradients from its input `inp`. Submits its work.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        w: &LayerWeights,
        l: usize,
        kind: LinearKind,
        inp: &GpuMatrix,
        u: Option<&GpuMatrix>,
        dy: &GpuMatrix,
        dx: &GpuMatrix,
        accumulate: bool,
    ) -> Result<()> {
        let gpu = self.gpu();
        let mut b = Batch::new(gpu);
        match w.linear(kind).0 {
            LinearWeight::Dense(w) => gemm(&mut b, dy, w, GemmOp::NN, dx, accumulate)?,
            LinearWeight::LowRank { q, lt, r } => {
                gemm(&mut b, dy, q, GemmOp::NN, dx, accumulate)?;
                let dl = GpuMatrix::uninit(gpu, dy.rows(), lt.rows())?;
                gemm(&mut b, dy, lt, GemmOp::NT, &dl, false)?;
                gemm(&mut b, &dl, r, GemmOp::NN, dx, true)?;
            }
        }
        b.submit()?;
        if let Some(ad) = self.trainable.get(l, kind) {
            let u = u.expect("the forward kept x·Aᵀ of every adapter");
            low_rank_backward(
                gpu,
                inp,
                ad.a_value(),
                ad.b_value(),
                ad.scale,
                u,
                dy,
                &ad.a.grad,
                &ad.b.grad,
                Some(dx),
            )?;
        }
        Ok(())
    }

    /// Propagate the residual gradient `dres` (of the stream leaving layer `l`) back through
    /// the layer in place, adding the adapters' gradients. `dw` is scratch for the norms'
    /// weight gradients (they are frozen).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        x: &GpuMatrix,
        acts: &Acts,
        pos: &GpuBuffer,
        t: usize,
        dres: &GpuMatrix,
        dw: &GpuMatrix,
    ) -> Result<()> {
        let c = self.config();
        let gpu = self.gpu();
        let mut held = None;
        let w = self.frozen(l, &mut held)?;
        let rows = x.rows();
        let eps = c.rms_norm_eps as f32;
        let (qd, kd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let grouped = |cols: usize| GpuMatrix::uninit_grouped(gpu, rows, cols, t);
        // MLP: x2 = x1 + act·Wdᵀ, act = silu(g) ⊙ u.
        let d_act = grouped(c.intermediate_size)?;
        let down = LinearKind::DownProj;
        self.linear_backward(
            w,
            l,
            down,
            &acts.act,
            acts.lowrank(down),
            dres,
            &d_act,
            false,
        )?;
        let (dg, du) = (grouped(c.intermediate_size)?, grouped(c.intermediate_size)?);
        let mut b = Batch::new(gpu);
        swiglu_backward(&mut b, &acts.g, &acts.u, &d_act, &dg, &du)?;
        b.submit()?;
        drop(d_act);
        let dh2 = grouped(c.hidden_size)?;
        let (gate, up) = (LinearKind::GateProj, LinearKind::UpProj);
        self.linear_backward(w, l, gate, &acts.h2, acts.lowrank(gate), &dg, &dh2, false)?;
        self.linear_backward(w, l, up, &acts.h2, acts.lowrank(up), &du, &dh2, true)?;
        let mut b = Batch::new(gpu);
        rms_norm_backward(&mut b, &acts.x1, &w.post_norm, &dh2, eps, dres, true, dw)?;
        b.submit()?;
        // Attention: x1 = x + a·Woᵀ.
        let da = grouped(qd)?;
        let o = LinearKind::OProj;
        self.linear_backward(w, l, o, &acts.a, acts.lowrank(o), dres, &da, false)?;
        let (dq, dk, dv) = (grouped(qd)?, grouped(kd)?, grouped(kd)?);
        let shape = AttnGradShape {
            nseq: rows / t,
            t,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window.unwrap_or(0),
        };
        let mut b = Batch::new(gpu);
        attention_backward(
            &mut b, shape, &acts.q, &acts.k, &acts.v, &acts.a, &da, &dq, &dk, &dv,
        )?;
        let rope = self.engine.rope_table();
        ops::rope_backward(&mut b, &dq, 0..rows, c.num_heads, pos, rope)?;
        ops::rope_backward(&mut b, &dk, 0..rows, c.num_kv_heads, pos, rope)?;
        b.submit()?;
        let dh1 = grouped(c.hidden_size)?;
        for (i, (kind, dy)) in [
            (LinearKind::QProj, &dq),
            (LinearKind::KProj, &dk),
            (LinearKind::VProj, &dv),
        ]
        .into_iter()
        .enumerate()
        {
            self.linear_backward(w, l, kind, &acts.h1, acts.lowrank(kind), dy, &dh1, i > 0)?;
        }
        let mut b = Batch::new(gpu);
        rms_norm_backward(&mut b, x, &w.input_norm, &dh1, eps, dres, true, dw)?;
        b.submit()
    }
}
