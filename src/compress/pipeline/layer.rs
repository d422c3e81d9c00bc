//! One decoder layer's compression: calibration batches, the layer stages in true-sequential
//! order, Hessians, quantization, propagation through the quantized layer.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::ops;
use crate::gpu::quant::{self as gq};
use crate::gpu::{matmul, Batch, GemmOp, Gpu, GpuMatrix, HessianAccumulator};
use crate::infer::engine::{unrotate_linear, LinearWeight};
use crate::infer::Engine;
use crate::model::compressed::{MatrixReport, QuantEntry, RhtSeeds};
use crate::model::{Checkpoint, LinearKind, LinearSpec};
use crate::quant::reference::prepare_hessian;
use crate::quant::rht::{rotate_hessian, rotate_weight, Rht};
use crate::quant::GptqOptions;

use crate::compress::workdir::LayerHessians;
use crate::format::{CompressedLayer, CompressedMatrix, PackedMatrix};

use super::{layout::*, options::*};

/// Sequences per activation sub-batch: each sub-batch's widest activation (intermediate size)
/// stays under this many bytes.
pub(crate) const SUBBATCH_BYTES: usize = 128 << 20;

/// tr(ΔW H ΔWᵀ) and tr(W H Wᵀ), with the products on the GPU.
pub(crate) fn weighted_errors(
    gpu: &Gpu,
    w: &[f32],
    wq: &GpuMatrix,
    h: &GpuMatrix,
) -> Result<(f64, f64)> {
    let (m, n) = (wq.rows(), wq.cols());
    let deq = wq.to_f32(gpu)?;
    let delta: Vec<f32> = w.iter().zip(&deq).map(|(a, b)| a - b).collect();
    let quad = |x: &[f32]| -> Result<f64> {
        let xm = GpuMatrix::from_f32(gpu, m, n, DType::F32, x)?;
        let xh = matmul(gpu, &xm, h, GemmOp::NN)?.to_f32(gpu)?;
        Ok(xh.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum())
    };
    Ok((quad(&delta)?, quad(w)?))
}

/// What [`run_layer_stages`] calls at each group of linears: `(kinds, inputs, weights)`.
pub(crate) type GroupHook<'a> = dyn FnMut(&[LinearKind], &[GpuMatrix], &mut crate::infer::engine::LayerWeights) -> Result<()>
    + 'a;

/// Calibration sequences in sub-batches of whole sequences, each sub-batch's widest activation
/// under [`SUBBATCH_BYTES`].
pub(crate) struct CalibBatches {
    /// Sequence index ranges of the sub-batches.
    pub ranges: Vec<std::ops::Range<usize>>,
    /// Their embeddings (the residual stream entering layer 0).
    pub xs: Vec<GpuMatrix>,
    /// Positions 0..len repeated over the largest sub-batch (smaller ones read a prefix).
    pub pos: crate::gpu::GpuBuffer,
}

/// Sequences per calibration sub-batch for sequences of `len` tokens.
pub(crate) fn sequences_per_batch(
    cfg: &crate::model::ModelConfig,
    len: usize,
    nseq: usize,
) -> usize {
    let widest = cfg
        .intermediate_size
        .max(cfg.hidden_size)
        .max(cfg.num_heads * cfg.head_dim);
    (SUBBATCH_BYTES / (len * widest * 4))
        .max(1)
        .min(nseq.max(1))
}

/// Split `tokens` (whole sequences of `len`) into sub-batches and embed them.
pub(crate) fn calibration_batches(
    engine: &Engine<'_>,
    tokens: &[u32],
    len: usize,
) -> Result<CalibBatches> {
    let nseq = tokens.len() / len;
    let per_batch = sequences_per_batch(engine.checkpoint().config(), len, nseq);
    let ranges: Vec<std::ops::Range<usize>> = (0..nseq)
        .step_by(per_batch)
        .map(|s0| s0..(s0 + per_batch).min(nseq))
        .collect();
    let xs = ranges
        .iter()
        .map(|r| engine.embed_tokens(&tokens[r.start * len..r.end * len], len))
        .collect::<Result<Vec<_>>>()?;
    let positions: Vec<u32> = (0..per_batch * len).map(|r| (r % len) as u32).collect();
    let pos = ops::upload_u32(engine.gpu(), &positions)?;
    Ok(CalibBatches { ranges, xs, pos })
}

/// Settings every layer shares.
#[derive(Clone, Copy)]
pub(crate) struct LayerShared<'a> {
    pub gpu: &'a Gpu,
    pub ck: &'a Checkpoint,
    pub gptq: GptqOptions,
    pub rht: bool,
    pub seed: u64,
    /// Tokens per calibration sequence.
    pub len: usize,
}

/// What one layer became.
pub(crate) struct LayerResult {
    pub(crate) packed: Vec<(String, PackedMatrix)>,
    pub(crate) entries: Vec<(String, QuantEntry)>,
    pub(crate) reports: Vec<MatrixReport>,
    /// Wall seconds accumulating the Hessians (the GPU drained before, so earlier
    /// propagation is not counted here).
    pub(crate) hessian_s: f64,
    /// Wall seconds quantizing (GPTQ/RTN/CALDERA, packing, errors, the weights swapped in).
    pub(crate) quantize_s: f64,
}

impl LayerResult {
    /// Manifest entries of the layer's linears.
    pub(crate) fn entries(&self) -> &[(String, QuantEntry)] {
        &self.entries
    }

    /// The format-neutral layer (what a work directory keeps and a format receives).
    pub(crate) fn into_layer(
        self,
        layer: usize,
        seconds: f64,
        device: Option<String>,
    ) -> CompressedLayer {
        let mut entries = self.entries;
        let matrices = self
            .packed
            .into_iter()
            .map(|(weight, data)| {
                let at = entries
                    .iter()
                    .position(|(n, _)| *n == weight)
                    .expect("every packed matrix has an entry");
                let (_, entry) = entries.swap_remove(at);
                CompressedMatrix {
                    weight,
                    entry,
                    data,
                }
            })
            .collect();
        CompressedLayer {
            layer,
            seconds,
            device,
            matrices,
            reports: self.reports,
        }
    }
}

/// Linear layers that share an input, in the order a layer computes them.
pub(crate) const GROUPS: [&[LinearKind]; 4] = [
    &[LinearKind::QProj, LinearKind::KProj, LinearKind::VProj],
    &[LinearKind::OProj],
    &[LinearKind::GateProj, LinearKind::UpProj],
    &[LinearKind::DownProj],
];

/// Where a layer's Hessians come from.
pub(crate) enum LayerInput<'a> {
    /// Calibration activations entering the layer, in sub-batches, and the engine that runs
    /// the layer; on return they hold what leaves the *compressed* layer.
    Activations {
        engine: &'a Engine<'a>,
        xs: &'a [GpuMatrix],
        /// Positions 0..len repeated over the largest sub-batch.
        pos: &'a crate::gpu::GpuBuffer,
    },
    /// Hessians saved by `pumice hessians` (from the original model); nothing propagates.
    Hessians(LayerHessians),
}

/// Run decoder layer `w` over the sub-batches `xs` (updated in place) stage by stage. At each
/// of the four [`GROUPS`], `group(kinds, inputs, w)` sees the inputs of those linears and may
/// replace their weights in `w`; later stages compute with what it left.
pub(crate) fn run_layer_stages(
    engine: &Engine<'_>,
    w: &mut crate::infer::engine::LayerWeights,
    xs: &[GpuMatrix],
    len: usize,
    pos: &crate::gpu::GpuBuffer,
    group: &mut GroupHook<'_>,
) -> Result<()> {
    let (gpu, n) = (engine.gpu(), xs.len());
    // q, k, v on the normed input.
    let hs = per_batch(gpu, n, |b, i| engine.stage_attn_input(b, w, &xs[i], len))?;
    group(GROUPS[0], &hs, w)?;
    // o on the attention output of the (quantized) q, k, v. `pos` covers the largest
    // sub-batch; smaller ones read a prefix.
    let attns = per_batch(gpu, n, |b, i| {
        engine.stage_attention(b, w, &hs[i], pos, len, None)
    })?;
    drop(hs);
    group(GROUPS[1], &attns, w)?;
    per_batch(gpu, n, |b, i| {
        engine.stage_residual(b, w, LinearKind::OProj, &attns[i], &xs[i])
    })?;
    drop(attns);
    // gate, up on the post-attention norm.
    let h2s = per_batch(gpu, n, |b, i| engine.stage_mlp_input(b, w, &xs[i], len))?;
    group(GROUPS[2], &h2s, w)?;
    // down on the SwiGLU product of the (quantized) gate, up.
    let acts = per_batch(gpu, n, |b, i| engine.stage_mlp_act(b, w, &h2s[i], len))?;
    drop(h2s);
    group(GROUPS[3], &acts, w)?;
    per_batch(gpu, n, |b, i| {
        engine.stage_residual(b, w, LinearKind::DownProj, &acts[i], &xs[i])
    })?;
    Ok(())
}

/// One stage over every sub-batch `i < n`: its own Batch, submitted at once (bounded memory).
fn per_batch<T>(
    gpu: &Gpu,
    n: usize,
    mut stage: impl FnMut(&mut Batch<'_>, usize) -> Result<T>,
) -> Result<Vec<T>> {
    (0..n)
        .map(|i| {
            let mut b = Batch::new(gpu);
            let out = stage(&mut b, i)?;
            b.submit()?;
            Ok(out)
        })
        .collect()
}

/// H = Σ XᵀX over `inputs` (f64, full symmetric).
pub(crate) fn accumulate_hessian(gpu: &Gpu, n: usize, inputs: &[GpuMatrix]) -> Result<Vec<f64>> {
    let mut acc = HessianAccumulator::new(gpu, n)?;
    let mut b = Batch::new(gpu);
    for x in inputs {
        acc.accumulate(&mut b, x)?;
    }
    b.submit()?;
    acc.read(gpu)
}

/// Compress decoder layer `l` with `recipe`, sequentially inside the layer (o_proj sees the
/// output of the quantized q/k/v, down_proj that of the quantized gate/up) when `input` holds
/// activations. Stops with [`Error::Interrupted`] between matrices once a stop is requested.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compress_layer(
    sh: &LayerShared<'_>,
    l: usize,
    recipe: &LayerRecipe,
    input: LayerInput<'_>,
    done: &mut usize,
    total: usize,
    progress: &mut dyn FnMut(&Event),
) -> Result<LayerResult> {
    let (gpu, ck) = (sh.gpu, sh.ck);
    let spec = &ck.arch().layers[l];
    let act_order = sh.gptq.act_order && recipe.method == Method::Gptq;
    let mut packed: Vec<(String, PackedMatrix)> = Vec::new();
    let mut reports = Vec::new();
    let mut entries = Vec::new();
    let (mut hessian_s, mut quantize_s) = (0.0f64, 0.0f64);

    // `w`: the layer being propagated through, whose weights become the dequantized ones as
    // soon as they exist (absent with saved Hessians, where nothing propagates).
    let mut quantize_group = |kinds: &[LinearKind],
                              mut h: Vec<f64>,
                              mut w: Option<&mut crate::infer::engine::LayerWeights>|
     -> Result<()> {
        let first = spec.linear(kinds[0]);
        let n = first.in_features;
        // One input transform per input group (its linears share H); one output transform
        // per matrix.
        let seed_of = |what: &str| {
            let tag = format!("{}:{l}:{what}", sh.seed);
            tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            })
        };
        let tn = sh
            .rht
            .then(|| Rht::new(n, seed_of(&format!("{:?}", first.kind.input()))));
        if let Some(t) = &tn {
            h = rotate_hessian(&h, n, t);
        }
        let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
        let hm = GpuMatrix::from_f32(gpu, n, n, DType::F32, &h32)?;
        let prep = if recipe.method == Method::Gptq || recipe.method == Method::Caldera {
            let p = prepare_hessian(&h, n, &sh.gptq)?;
            if p.retries > 0 {
                progress(&Event::Note(format!(
                    "layer {l} {:?} input: Hessian factorization failed, damping raised to {:.3}",
                    first.kind.input(),
                    p.damp
                )));
            }
            Some(p)
        } else {
            None
        };
        for &kind in kinds {
            let lin: &LinearSpec = spec.linear(kind);
            let mut wv = ck.tensor(&lin.weight.name)?.to_f32()?;
            let (m, n) = (lin.out_features, lin.in_features);
            let tm = tn.as_ref().map(|_| Rht::new(m, seed_of(&lin.weight.name)));
            if let (Some(tm), Some(tn)) = (&tm, &tn) {
                wv = rotate_weight(&wv, m, n, tm, tn);
            }
            // The propagated weight must be the unrotated one.
            let unrotate = |lw: LinearWeight| -> Result<LinearWeight> {
                match (&tm, &tn) {
                    (Some(tm), Some(tn)) => unrotate_linear(gpu, lw, tm, tn),
                    _ => Ok(lw),
                }
            };
            let mut rank = 0;
            // The grid this matrix gets (a k grid falls back on widths that are not whole
            // super-blocks).
            let grid = recipe.grid.for_cols(n);
            let (p, rel) = if recipe.method == Method::Caldera {
                let cs = &recipe.caldera;
                rank = cs.rank_for(&grid, m, n)?;
                let co = crate::lowrank::caldera::CalderaOptions {
                    rank,
                    q_grid: grid,
                    lr_grid: cs.lr_grid()?,
                    outer_iters: cs.outer_iters,
                    inner_iters: cs.inner_iters,
                    patience: cs.patience,
                    warm_start: false,
                    gptq: sh.gptq,
                    oversample: 10,
                    power_iters: 2,
                    seed: sh.seed,
                };
                let d = crate::lowrank::caldera::decompose(gpu, &wv, m, n, &h, &co)?;
                let mut p = pack(&d.q)?;
                if rank > 0 {
                    p.factors = Some(Box::new((pack(&d.lt)?, pack(&d.r)?)));
                }
                if let Some(w) = w.as_deref_mut() {
                    let q = dequantize_in_memory(gpu, &p, &d.q)?;
                    let lw = match &p.factors {
                        Some(f) => LinearWeight::LowRank {
                            q,
                            lt: dequantize_in_memory(gpu, &f.0, &d.lt)?,
                            r: dequantize_in_memory(gpu, &f.1, &d.r)?,
                        },
                        None => LinearWeight::Dense(q),
                    };
                    w.set_weight(kind, unrotate(lw)?);
                }
                (p, Some(d.relative_error))
            } else {
                let q = match &prep {
                    Some(p) => {
                        gq::sparse_gptq(gpu, &wv, m, n, p, grid, sh.gptq.block, recipe.sparsity)?
                            .download(gpu)?
                    }
                    None => {
                        let wm = GpuMatrix::from_f32(gpu, m, n, DType::F32, &wv)?;
                        gq::rtn(gpu, &wm, grid)?.download(gpu)?
                    }
                };
                let p = pack(&q)?;
                let deq = dequantize_in_memory(gpu, &p, &q)?;
                let (err, norm) = weighted_errors(gpu, &wv, &deq, &hm)?;
                if let Some(w) = w.as_deref_mut() {
                    w.set_weight(kind, unrotate(LinearWeight::Dense(deq))?);
                }
                (p, if norm > 0.0 { Some(err / norm) } else { None })
            };
            let entry = QuantEntry {
                sparsity: p.mask.as_ref().and(recipe.sparsity.name()),
                kept_per_row: p.kept,
                method: recipe.method.name().into(),
                bits: grid.bits,
                group_size: grid.group_size,
                kind: grid.kind,
                act_order,
                rows: m,
                cols: n,
                stored_bits: 0,
                relative_error: rel,
                damp: prep.as_ref().map(|p| p.damp),
                rank,
                lr_bits: if rank > 0 { recipe.caldera.lr_bits } else { 0 },
                lr_group_size: if rank > 0 {
                    recipe.caldera.lr_group_size
                } else {
                    0
                },
                rht: match (&tm, &tn) {
                    (Some(tm), Some(tn)) => Some(RhtSeeds {
                        rows: tm.seed,
                        cols: tn.seed,
                    }),
                    _ => None,
                },
            };
            let entry = QuantEntry {
                stored_bits: entry.expected_bits(),
                ..entry
            };
            entries.push((lin.weight.name.clone(), entry));
            *done += 1;
            progress(&Event::Matrix {
                layer: l,
                name: lin.weight.name.clone(),
                done: *done,
                total,
                relative_error: rel,
            });
            reports.push(MatrixReport {
                name: lin.weight.name.clone(),
                relative_error: rel,
            });
            packed.push((lin.weight.name.clone(), p));
            // The finished matrix is kept only with the whole layer: a stop abandons the rest.
            crate::interrupt::check(&format!("stopped during layer {l}"))?;
        }
        Ok(())
    };

    match input {
        LayerInput::Hessians(mut lh) => {
            for kinds in GROUPS {
                let lin = spec.linear(kinds[0]);
                let g = lin.kind.input();
                let h = lh.take(g).filter(|h| h.len() == lin.in_features.pow(2));
                let h = h.ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "saved Hessians of layer {l} lack a {}×{} matrix for {g:?}",
                        lin.in_features, lin.in_features
                    ))
                })?;
                let t = std::time::Instant::now();
                quantize_group(kinds, h, None)?;
                quantize_s += t.elapsed().as_secs_f64();
            }
        }
        LayerInput::Activations { engine, xs, pos } => {
            let mut w = engine.read_layer(l)?;
            run_layer_stages(
                engine,
                &mut w,
                xs,
                sh.len,
                pos,
                &mut |kinds, inputs, w| {
                    let n = spec.linear(kinds[0]).in_features;
                    gpu.wait()?;
                    let t = std::time::Instant::now();
                    let h = accumulate_hessian(gpu, n, inputs)?;
                    let t1 = std::time::Instant::now();
                    hessian_s += (t1 - t).as_secs_f64();
                    quantize_group(kinds, h, Some(w))?;
                    gpu.wait()?;
                    quantize_s += t1.elapsed().as_secs_f64();
                    Ok(())
                },
            )?;
        }
    }
    Ok(LayerResult {
        packed,
        entries,
        reports,
        hessian_s,
        quantize_s,
    })
}
