//! The transformer forward pass on the GPU, streaming decoder layers from the memory-mapped
//! checkpoint.
//!
//! Activations of the current batch live on the GPU for the whole pass; decoder layers are
//! uploaded one at a time (and kept only if the whole model fits the resident budget). Each
//! layer is one submission: while the GPU runs layer l, the host uploads layer l + 1, and a
//! helper thread pages in layer l + 2 from disk, so reading, uploading and computing overlap.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::gpu::ops::{self, AttentionShape, KvLayout, RopeTable};
use crate::gpu::{gemm_rows, Batch, GemmOp, Gpu, GpuBuffer, GpuMatrix};
use crate::model::{Checkpoint, LayerSpec, LinearKind};

mod decode;
mod exits;
mod lora;

pub use exits::ExitStates;

pub(crate) use super::weights::unrotate_linear;
use super::weights::{check_finite, dequantize_stored, dequantize_weight, upload};

/// How the engine uses GPU memory.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Keep every decoder layer on the GPU after its first upload when all of them together
    /// take at most this many bytes; otherwise stream them for every batch.
    pub resident_bytes: u64,
    /// Positions the RoPE table covers (the longest sequence plus generated tokens).
    pub max_positions: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            resident_bytes: 2 << 30,
            max_positions: 4096,
        }
    }
}

/// One decoder layer's weights on the GPU, in their stored dtype (compressed weights are
/// dequantized to f32 on upload).
pub struct LayerWeights {
    pub(crate) input_norm: GpuMatrix,
    pub(crate) post_norm: GpuMatrix,
    pub(crate) linears: Vec<Linear>,
}

/// A linear layer: its kind, weight and bias.
pub(crate) type Linear = (LinearKind, LinearWeight, Option<GpuMatrix>);

/// A linear layer's weight on the GPU: dense, or CALDERA's Q + L·R kept factored
/// (y = x Qᵀ + (x Rᵀ) Lᵀ; L·R is never densified).
pub enum LinearWeight {
    Dense(GpuMatrix),
    LowRank {
        /// out × in.
        q: GpuMatrix,
        /// Lᵀ: k × out.
        lt: GpuMatrix,
        /// R: k × in.
        r: GpuMatrix,
    },
}

impl LayerWeights {
    pub(crate) fn linear(&self, kind: LinearKind) -> (&LinearWeight, Option<&GpuMatrix>) {
        let (_, w, b) = self
            .linears
            .iter()
            .find(|(k, _, _)| *k == kind)
            .expect("all seven linears are loaded");
        (w, b.as_ref())
    }

    /// Replace a linear layer's weight (e.g. by its quantized version during compression).
    pub(crate) fn set_weight(&mut self, kind: LinearKind, w: LinearWeight) {
        if let Some(slot) = self.linears.iter_mut().find(|(k, _, _)| *k == kind) {
            slot.1 = w;
        }
    }
}

/// A key/value cache for incremental decoding of `nseq` sequences in lockstep. Rows are
/// interleaved (position p of sequence b is row p·nseq + b), so one step's new keys are
/// consecutive rows.
pub struct KvCache {
    layers: Vec<(GpuMatrix, GpuMatrix)>,
    /// Position of every cache row (row / nseq), for RoPE.
    positions: GpuBuffer,
    nseq: usize,
    len: usize,
    capacity: usize,
}

/// The part of a KV cache one layer call writes and reads.
pub(crate) struct CacheView<'c> {
    k: &'c GpuMatrix,
    v: &'c GpuMatrix,
    positions: &'c GpuBuffer,
    /// Positions already cached (the new tokens start here).
    start: usize,
    nseq: usize,
}

impl KvCache {
    pub fn sequences(&self) -> usize {
        self.nseq
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A model ready to run on a GPU.
pub struct Engine<'a> {
    gpu: &'a Gpu,
    ck: &'a Checkpoint,
    embed: GpuMatrix,
    final_norm: GpuMatrix,
    lm_head: Option<GpuMatrix>,
    layers: Vec<Option<LayerWeights>>,
    verified: Vec<bool>,
    resident: bool,
    rope: RopeTable,
    /// Edge-LLM's exits loaded for voting ([`load_exits`](Self::load_exits)), shallowest first.
    exits: Vec<exits::ExitWeights>,
    /// Predict from the one loaded exit, without the model's head.
    exit_alone: bool,
    /// A LoRA adapter's modules ([`apply_lora`](Self::apply_lora)).
    lora: Vec<lora::LoraWeights>,
}

impl<'a> Engine<'a> {
    pub fn new(gpu: &'a Gpu, ck: &'a Checkpoint, opts: &EngineOptions) -> Result<Engine<'a>> {
        let c = ck.config();
        let arch = ck.arch();
        let e = ck.tensor(&arch.embed_tokens.name)?;
        check_finite(&e)?;
        let embed = upload(gpu, &e, c.vocab_size, c.hidden_size)?;
        let n = ck.tensor(&arch.final_norm.name)?;
        check_finite(&n)?;
        let final_norm = upload(gpu, &n, 1, c.hidden_size)?;
        let lm_head = match &arch.lm_head {
            Some(h) => {
                let t = ck.tensor(&h.name)?;
                check_finite(&t)?;
                Some(upload(gpu, &t, c.vocab_size, c.hidden_size)?)
            }
            None => None,
        };
        // What the layers take on the GPU: stored bytes, or f32 for compressed weights (they
        // are dequantized on upload).
        let layer_bytes: u64 = arch
            .layers
            .iter()
            .flat_map(|l| l.tensors())
            .map(|t| match ck.quantized(&t.name) {
                Some(q) => (q.rows * q.cols * 4) as u64,
                None => ck
                    .tensor(&t.name)
                    .map(|r| r.bytes.len() as u64)
                    .unwrap_or(0),
            })
            .sum();
        let max_positions = opts.max_positions.max(1);
        let rope = RopeTable::new(gpu, &c.rope_inv_freq(), max_positions)?;
        Ok(Engine {
            gpu,
            ck,
            embed,
            final_norm,
            lm_head,
            layers: (0..c.num_layers).map(|_| None).collect(),
            verified: vec![false; c.num_layers],
            resident: layer_bytes <= opts.resident_bytes,
            rope,
            exits: Vec::new(),
            exit_alone: false,
            lora: Vec::new(),
        })
    }

    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ck
    }

    /// A compressed linear weight dequantized on the GPU (f32), as the forward pass uses it.
    pub fn dequantized_weight(&self, name: &str) -> Result<GpuMatrix> {
        let q = self.ck.quantized(name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{name} is not a compressed weight of {}",
                self.ck.dir().display()
            ))
        })?;
        dequantize_stored(
            self.gpu,
            self.ck,
            name,
            q,
            crate::model::compressed::Factor::Backbone,
        )
    }

    /// The LM head (the embedding when tied), the final norm's weight, the embedding and the
    /// RoPE table, as the forward pass uses them (fine-tuning shares them).
    pub(crate) fn head(&self) -> &GpuMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
    pub(crate) fn final_norm_weight(&self) -> &GpuMatrix {
        &self.final_norm
    }
    pub(crate) fn rope_table(&self) -> &RopeTable {
        &self.rope
    }

    /// Whether decoder layers stay on the GPU between batches.
    pub fn resident(&self) -> bool {
        self.resident
    }

    pub fn max_positions(&self) -> usize {
        self.rope.positions()
    }

    fn load_layer(&mut self, l: usize) -> Result<()> {
        if self.layers[l].is_some() {
            return Ok(());
        }
        let w = self.read_layer(l)?;
        self.layers[l] = Some(w);
        self.verified[l] = true;
        Ok(())
    }

    /// Upload decoder layer `l` from the checkpoint (not cached).
    pub(crate) fn read_layer(&self, l: usize) -> Result<LayerWeights> {
        let spec: &LayerSpec = &self.ck.arch().layers[l];
        let verify = !self.verified[l];
        let get = |name: &str, rows: usize, cols: usize| -> Result<GpuMatrix> {
            let t = self.ck.tensor(name)?;
            if verify {
                check_finite(&t)?;
            }
            upload(self.gpu, &t, rows, cols)
        };
        let h = self.ck.config().hidden_size;
        let mut linears = Vec::with_capacity(7);
        for lin in &spec.linears {
            let w = match self.ck.quantized(&lin.weight.name) {
                Some(q) => dequantize_weight(self.gpu, self.ck, &lin.weight.name, q)?,
                None => {
                    LinearWeight::Dense(get(&lin.weight.name, lin.out_features, lin.in_features)?)
                }
            };
            let b = match &lin.bias {
                Some(b) => Some(get(&b.name, 1, lin.out_features)?),
                None => None,
            };
            linears.push((lin.kind, w, b));
        }
        self.with_lora(
            l,
            LayerWeights {
                input_norm: get(&spec.input_norm.name, 1, h)?,
                post_norm: get(&spec.post_attention_norm.name, 1, h)?,
                linears,
            },
        )
    }

    /// Touch every page of a layer's tensors so a later upload reads from memory, not disk.
    fn prefetch_pages(ck: &Checkpoint, l: usize) {
        let Some(spec) = ck.arch().layers.get(l) else {
            return;
        };
        let mut sum = 0u8;
        for t in spec.tensors() {
            if let Ok(r) = ck.tensor(&t.name) {
                for b in r.bytes.iter().step_by(4096) {
                    sum = sum.wrapping_add(*b);
                }
            }
        }
        std::hint::black_box(sum);
    }

    /// `tokens` are whole sequences of `seq_len` ids of the vocabulary, within the positions
    /// this engine was built for.
    pub(crate) fn check_sequences(&self, tokens: &[u32], seq_len: usize) -> Result<()> {
        if seq_len == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(seq_len) {
            return Err(Error::Shape(format!(
                "{} tokens are not whole sequences of {seq_len}",
                tokens.len()
            )));
        }
        if seq_len > self.rope.positions() {
            return Err(Error::InvalidArgument(format!(
                "sequence length {seq_len} exceeds the {} positions this engine was built for",
                self.rope.positions()
            )));
        }
        self.validate_ids(tokens)
    }

    fn validate_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.ck.config().vocab_size;
        match ids.iter().find(|&&t| t as usize >= v) {
            Some(bad) => Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {} ({v} tokens)",
                self.ck.dir().display()
            ))),
            None => Ok(()),
        }
    }

    /// Run `tokens.len() / seq_len` sequences of `seq_len` tokens (positions 0..seq_len each)
    /// through every decoder layer and the final norm. Returns the normed hidden states
    /// [n · seq_len, hidden], chunked by whole sequences.
    pub fn hidden_states(&mut self, tokens: &[u32], seq_len: usize) -> Result<GpuMatrix> {
        self.hidden_states_observed(tokens, seq_len, &mut |_, _, _| Ok(()))
    }

    /// [`hidden_states`](Self::hidden_states), calling `observe(engine, l, x)` with the residual
    /// stream x entering decoder layer l for every l, and `observe(num_layers, x)` with the
    /// stream leaving the last layer (before the final norm).
    pub fn hidden_states_observed(
        &mut self,
        tokens: &[u32],
        seq_len: usize,
        observe: &mut dyn FnMut(&Self, usize, &GpuMatrix) -> Result<()>,
    ) -> Result<GpuMatrix> {
        let c = self.ck.config().clone();
        self.check_sequences(tokens, seq_len)?;
        let gpu = self.gpu;
        let rows = tokens.len();
        let ids = ops::upload_u32(gpu, tokens)?;
        let positions: Vec<u32> = (0..rows).map(|r| (r % seq_len) as u32).collect();
        let pos = ops::upload_u32(gpu, &positions)?;
        let x = GpuMatrix::uninit_grouped(gpu, rows, c.hidden_size, seq_len)?;
        let mut b = Batch::new(gpu);
        ops::embed(&mut b, &ids, &self.embed, &x)?;
        b.submit()?;

        let n_layers = c.num_layers;
        std::thread::scope(|scope| -> Result<()> {
            let ck = self.ck;
            let mut prefetch = None;
            for l in 0..n_layers {
                if !self.resident || self.layers[l].is_none() {
                    if let Some(h) = prefetch.take() {
                        let _ = std::thread::ScopedJoinHandle::join(h);
                    }
                    if l + 1 < n_layers && (!self.resident || self.layers[l + 1].is_none()) {
                        prefetch = Some(scope.spawn(move || Self::prefetch_pages(ck, l + 1)));
                    }
                }
                observe(self, l, &x)?;
                self.load_layer(l)?;
                let w = self.layers[l].as_ref().expect("just loaded");
                self.layer(w, &x, &pos, seq_len, None)?;
                if !self.resident {
                    self.layers[l] = None;
                    self.ck.release_layer(l);
                }
            }
            Ok(())
        })?;
        observe(self, n_layers, &x)?;
        self.final_normed(&x, seq_len)
    }

    /// Run decoder layers `layers` on the residual stream `x` in place: whole sequences of
    /// `seq_len` rows starting at position 0, `pos` holding r % seq_len for every row.
    pub fn forward_layers(
        &mut self,
        layers: Range<usize>,
        x: &GpuMatrix,
        pos: &GpuBuffer,
        seq_len: usize,
    ) -> Result<()> {
        for l in layers {
            self.load_layer(l)?;
            let w = self.layers[l].as_ref().expect("just loaded");
            self.layer(w, x, pos, seq_len, None)?;
            if !self.resident {
                self.layers[l] = None;
                self.ck.release_layer(l);
            }
        }
        Ok(())
    }

    /// The final RMSNorm of a residual stream whose chunks hold whole groups of `group` rows
    /// (as [`hidden_states`](Self::hidden_states) allocates them): what the LM head reads.
    pub fn final_normed(&self, x: &GpuMatrix, group: usize) -> Result<GpuMatrix> {
        let c = self.ck.config();
        let y = GpuMatrix::uninit_grouped(self.gpu, x.rows(), c.hidden_size, group)?;
        let mut b = Batch::new(self.gpu);
        ops::rms_norm(&mut b, x, &self.final_norm, c.rms_norm_eps as f32, &y)?;
        b.submit()?;
        Ok(y)
    }

    /// One decoder layer on `x` (rows grouped by `t`), in place. Without a cache, each group
    /// of t rows is a sequence starting at position 0. With a cache of nseq sequences, x holds
    /// the new tokens (t per sequence, interleaved like the cache: with nseq > 1, t = 1) at
    /// positions start.., whose keys and values are appended.
    fn layer(
        &self,
        w: &LayerWeights,
        x: &GpuMatrix,
        pos: &GpuBuffer,
        t: usize,
        cache: Option<CacheView<'_>>,
    ) -> Result<()> {
        let mut b = Batch::new(self.gpu);
        let h = self.stage_attn_input(&mut b, w, x, t)?;
        let attn = self.stage_attention(&mut b, w, &h, pos, t, cache)?;
        self.stage_residual(&mut b, w, LinearKind::OProj, &attn, x)?;
        let h2 = self.stage_mlp_input(&mut b, w, x, t)?;
        let act = self.stage_mlp_act(&mut b, w, &h2, t)?;
        self.stage_residual(&mut b, w, LinearKind::DownProj, &act, x)?;
        b.submit()
    }

    // The stages of a decoder layer, exposed separately so calibration can observe the input of
    // every linear layer (and swap in quantized weights between stages).

    /// The normed input of q/k/v.
    pub(crate) fn stage_attn_input(
        &self,
        b: &mut Batch<'_>,
        w: &LayerWeights,
        x: &GpuMatrix,
        t: usize,
    ) -> Result<GpuMatrix> {
        self.stage_norm(b, &w.input_norm, x, t)
    }

    /// RMSNorm of the residual stream `x` with `weight` (sequences of `t` rows stay whole).
    fn stage_norm(
        &self,
        b: &mut Batch<'_>,
        weight: &GpuMatrix,
        x: &GpuMatrix,
        t: usize,
    ) -> Result<GpuMatrix> {
        let c = self.ck.config();
        let h = GpuMatrix::uninit_grouped(self.gpu, x.rows(), c.hidden_size, t)?;
        ops::rms_norm(b, x, weight, c.rms_norm_eps as f32, &h)?;
        Ok(h)
    }

    /// q/k/v projections, RoPE and attention: the input of o_proj.
    pub(crate) fn stage_attention(
        &self,
        b: &mut Batch<'_>,
        w: &LayerWeights,
        h: &GpuMatrix,
        pos: &GpuBuffer,
        t: usize,
        cache: Option<CacheView<'_>>,
    ) -> Result<GpuMatrix> {
        let c = self.ck.config();
        let gpu = self.gpu;
        let rows = h.rows();
        let (qd, kd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let q = GpuMatrix::uninit_grouped(gpu, rows, qd, t)?;
        linear(b, h, 0..rows, w.linear(LinearKind::QProj), &q, 0, false)?;
        ops::rope(b, &q, 0..rows, c.num_heads, pos, &self.rope)?;
        let attn = GpuMatrix::uninit_grouped(gpu, rows, qd, t)?;
        let window = c.sliding_window.unwrap_or(0);
        match cache {
            None => {
                let k = GpuMatrix::uninit_grouped(gpu, rows, kd, t)?;
                let v = GpuMatrix::uninit_grouped(gpu, rows, kd, t)?;
                linear(b, h, 0..rows, w.linear(LinearKind::KProj), &k, 0, false)?;
                linear(b, h, 0..rows, w.linear(LinearKind::VProj), &v, 0, false)?;
                ops::rope(b, &k, 0..rows, c.num_kv_heads, pos, &self.rope)?;
                let sh = AttentionShape {
                    t,
                    s: t,
                    heads: c.num_heads,
                    kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                    q_pos0: 0,
                    window,
                    kv_layout: KvLayout::Contiguous,
                };
                ops::attention(b, &q, &k, &v, &attn, sh)?;
            }
            Some(cv) => {
                let row0 = cv.start * cv.nseq;
                let tq = rows / cv.nseq;
                linear(
                    b,
                    h,
                    0..rows,
                    w.linear(LinearKind::KProj),
                    cv.k,
                    row0,
                    false,
                )?;
                linear(
                    b,
                    h,
                    0..rows,
                    w.linear(LinearKind::VProj),
                    cv.v,
                    row0,
                    false,
                )?;
                ops::rope(
                    b,
                    cv.k,
                    row0..row0 + rows,
                    c.num_kv_heads,
                    cv.positions,
                    &self.rope,
                )?;
                let sh = AttentionShape {
                    t: tq,
                    s: cv.start + tq,
                    heads: c.num_heads,
                    kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                    q_pos0: cv.start,
                    window,
                    kv_layout: KvLayout::Interleaved,
                };
                ops::attention(b, &q, cv.k, cv.v, &attn, sh)?;
            }
        }
        Ok(attn)
    }

    /// x += inp · Wᵀ (+ b) for the residual-writing linear `kind`: o_proj on the attention
    /// output, down_proj on the SwiGLU product.
    pub(crate) fn stage_residual(
        &self,
        b: &mut Batch<'_>,
        w: &LayerWeights,
        kind: LinearKind,
        inp: &GpuMatrix,
        x: &GpuMatrix,
    ) -> Result<()> {
        linear(b, inp, 0..inp.rows(), w.linear(kind), x, 0, true)
    }

    /// The normed input of gate/up.
    pub(crate) fn stage_mlp_input(
        &self,
        b: &mut Batch<'_>,
        w: &LayerWeights,
        x: &GpuMatrix,
        t: usize,
    ) -> Result<GpuMatrix> {
        self.stage_norm(b, &w.post_norm, x, t)
    }

    /// silu(gate) ⊙ up: the input of down_proj.
    pub(crate) fn stage_mlp_act(
        &self,
        b: &mut Batch<'_>,
        w: &LayerWeights,
        h2: &GpuMatrix,
        t: usize,
    ) -> Result<GpuMatrix> {
        let c = self.ck.config();
        let rows = h2.rows();
        let gate = GpuMatrix::uninit_grouped(self.gpu, rows, c.intermediate_size, t)?;
        let up = GpuMatrix::uninit_grouped(self.gpu, rows, c.intermediate_size, t)?;
        linear(
            b,
            h2,
            0..rows,
            w.linear(LinearKind::GateProj),
            &gate,
            0,
            false,
        )?;
        linear(b, h2, 0..rows, w.linear(LinearKind::UpProj), &up, 0, false)?;
        ops::swiglu(b, &gate, &up)?;
        Ok(gate)
    }

    /// Embed tokens (sequences of `t`) into a new hidden-state matrix grouped by `t`.
    pub(crate) fn embed_tokens(&self, tokens: &[u32], t: usize) -> Result<GpuMatrix> {
        self.validate_ids(tokens)?;
        let ids = ops::upload_u32(self.gpu, tokens)?;
        let x = GpuMatrix::uninit_grouped(self.gpu, tokens.len(), self.ck.config().hidden_size, t)?;
        let mut b = Batch::new(self.gpu);
        ops::embed(&mut b, &ids, &self.embed, &x)?;
        b.submit()?;
        Ok(x)
    }
}

/// `out[out_row0..] (+)= inp[rows] · Wᵀ (+ bias)`; for a CALDERA weight
/// `inp · Qᵀ + (inp · Rᵀ) · Lᵀ`.
pub(crate) fn linear(
    b: &mut Batch<'_>,
    inp: &GpuMatrix,
    rows: Range<usize>,
    (w, bias): (&LinearWeight, Option<&GpuMatrix>),
    out: &GpuMatrix,
    out_row0: usize,
    accumulate: bool,
) -> Result<()> {
    let n = rows.len();
    match w {
        LinearWeight::Dense(w) => {
            gemm_rows(b, inp, rows, w, GemmOp::NT, out, out_row0, accumulate)?
        }
        LinearWeight::LowRank { q, lt, r } => {
            gemm_rows(
                b,
                inp,
                rows.clone(),
                q,
                GemmOp::NT,
                out,
                out_row0,
                accumulate,
            )?;
            let xr = GpuMatrix::uninit(b.gpu(), n, r.rows())?;
            gemm_rows(b, inp, rows, r, GemmOp::NT, &xr, 0, false)?;
            gemm_rows(b, &xr, 0..n, lt, GemmOp::NN, out, out_row0, true)?;
        }
    }
    if let Some(bias) = bias {
        ops::add_bias(b, out, out_row0..out_row0 + n, bias)?;
    }
    Ok(())
}
