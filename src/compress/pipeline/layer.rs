//! One decoder layer's compression: calibration batches, the layer stages in true-sequential
//! order, Hessians, quantization, propagation through the quantized layer.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::ops;
use crate::gpu::{matmul, Batch, GemmOp, Gpu, GpuMatrix, HessianAccumulator};
use crate::infer::engine::{unrotate_linear, LinearWeight};
use crate::infer::Engine;
use crate::model::compressed::{MatrixReport, QuantEntry, RhtSeeds};
use crate::model::{Checkpoint, LinearKind, LinearSpec};
use crate::quant::reference::prepare_hessian;
use crate::quant::rht::{rotate_hessian, Rht};
use crate::quant::GptqOptions;

use crate::compress::hessdir::LayerHessians;
use crate::format::{CompressedLayer, CompressedMatrix, PackedMatrix};

use super::matrix::{assign_devices, quantize_matrix, rht_seed, GroupInput, MatrixOut, Values};
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
    /// Where the Hessians are accumulated.
    pub hessians_on: crate::lowrank::fit::Placement,
    /// The adapters a group's matrices are spread over (the first is `gpu`); one entry, or
    /// none, quantizes everything on `gpu`.
    pub helpers: &'a [&'a Gpu],
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
    /// Per adapter of `LayerShared::helpers` (when a group's matrices were spread): matrices
    /// quantized and wall seconds spent on them.
    pub(crate) helper_work: Vec<(usize, f64)>,
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

/// H = Σ XᵀX over `inputs` (f64, full symmetric), on the GPU or, where `on` says so, on the
/// host (the inputs read back [`XTX_BLOCK`](crate::compress::xtx::XTX_BLOCK) rows at a time,
/// so host memory stays bounded; the products in f64 faer: [`crate::compress::xtx`]).
pub(crate) fn accumulate_hessian(
    gpu: &Gpu,
    n: usize,
    inputs: &[GpuMatrix],
    on: crate::lowrank::fit::Placement,
) -> Result<Vec<f64>> {
    if on.host_for(gpu.caps().is_cpu) {
        use crate::compress::xtx::{xtx_accumulate, XTX_BLOCK};
        let mut h = vec![0.0f64; n * n];
        // A widened block's worth of rows read back at a time.
        for x in inputs {
            for r0 in (0..x.rows()).step_by(XTX_BLOCK) {
                let rows = r0..(r0 + XTX_BLOCK).min(x.rows());
                let part = x.rows_to_f32(gpu, rows.clone())?;
                xtx_accumulate(&mut h, &part, rows.len(), n);
            }
        }
        crate::compress::xtx::mirror_upper(&mut h, n);
        return Ok(h);
    }
    let mut acc = HessianAccumulator::new(gpu, n)?;
    let mut b = Batch::new(gpu);
    for x in inputs {
        acc.accumulate(&mut b, x)?;
    }
    b.submit()?;
    acc.read(gpu)
}

/// Quantize a group's matrices (which share `g`), each on the adapter [`assign_devices`]
/// gives it among `sh.helpers` — several adapters at once, one thread each — and return them
/// in the group's order with the index of the adapter that computed each, and per adapter
/// the matrices it quantized and its wall seconds.
type GroupOut = (Vec<(MatrixOut, usize)>, Vec<(usize, f64)>);
/// One adapter's part of a group: (index in the group, matrix) and its wall seconds.
type DeviceOut = (Vec<(usize, MatrixOut)>, f64);
fn quantize_on_devices(
    sh: &LayerShared<'_>,
    l: usize,
    recipe: &LayerRecipe,
    lins: &[&LinearSpec],
    g: &GroupInput<'_>,
) -> Result<GroupOut> {
    let devices = sh.helpers.len().max(1);
    let sizes: Vec<usize> = lins
        .iter()
        .map(|lin| lin.out_features * lin.in_features)
        .collect();
    let assign = assign_devices(&sizes, devices);
    // H on an adapter, for the plain methods' weighted errors.
    let h_on = |gpu: &Gpu| -> Result<Option<GpuMatrix>> {
        if recipe.method == Method::Caldera {
            return Ok(None);
        }
        let h32: Vec<f32> = g.h.iter().map(|&v| v as f32).collect();
        GpuMatrix::from_f32(gpu, g.n, g.n, DType::F32, &h32).map(Some)
    };
    // The matrices of adapter `d`, in order, with a stop checked between them.
    let run_on = |d: usize| -> Result<DeviceOut> {
        let t0 = std::time::Instant::now();
        let gpu = if devices > 1 { sh.helpers[d] } else { sh.gpu };
        let hm = h_on(gpu)?;
        let mut outs = Vec::new();
        for (i, lin) in lins.iter().enumerate().filter(|(i, _)| assign[*i] == d) {
            crate::interrupt::check(&format!("stopped during layer {l}"))?;
            let out =
                quantize_matrix(gpu, sh.ck, sh.gptq, sh.seed, l, lin, recipe, g, hm.as_ref())?;
            outs.push((i, out));
        }
        Ok((outs, t0.elapsed().as_secs_f64()))
    };
    let used: Vec<usize> = (0..devices).filter(|d| assign.contains(d)).collect();
    let per_device: Vec<Result<DeviceOut>> = if used.len() <= 1 {
        used.iter().map(|&d| run_on(d)).collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = used.iter().map(|&d| s.spawn(move || run_on(d))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    };
    let mut slots: Vec<Option<(MatrixOut, usize)>> = (0..lins.len()).map(|_| None).collect();
    let mut work = vec![(0usize, 0.0f64); sh.helpers.len()];
    for (&d, r) in used.iter().zip(per_device) {
        let (outs, seconds) = r?;
        if let Some(w) = work.get_mut(d) {
            *w = (outs.len(), seconds);
        }
        for (i, out) in outs {
            slots[i] = Some((out, d));
        }
    }
    let outs = slots
        .into_iter()
        .map(|s| s.expect("every matrix has an adapter"))
        .collect();
    Ok((outs, work))
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
    let mut helper_work = vec![(0usize, 0.0f64); sh.helpers.len()];

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
        let tn = sh.rht.then(|| {
            Rht::new(
                n,
                rht_seed(sh.seed, l, &format!("{:?}", first.kind.input())),
            )
        });
        if let Some(t) = &tn {
            h = rotate_hessian(&h, n, t);
        }
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
        let g = GroupInput {
            h: &h,
            n,
            prep: prep.as_ref(),
            tn: tn.as_ref(),
        };
        let lins: Vec<&LinearSpec> = kinds.iter().map(|&k| spec.linear(k)).collect();
        let (outs, work) = quantize_on_devices(sh, l, recipe, &lins, &g)?;
        for (acc, (n, s)) in helper_work.iter_mut().zip(work) {
            acc.0 += n;
            acc.1 += s;
        }
        // In the layer's order, on the adapter that propagates: the weights swapped in,
        // entries, reports.
        for (lin, (out, device)) in lins.iter().zip(outs) {
            let (m, n) = (lin.out_features, lin.in_features);
            let unrotate = |lw: LinearWeight| -> Result<LinearWeight> {
                match (&out.tm, &tn) {
                    (Some(tm), Some(tn)) => unrotate_linear(gpu, lw, tm, tn),
                    _ => Ok(lw),
                }
            };
            if let Some(w) = w.as_deref_mut() {
                let p = &out.packed;
                let lw = match (&out.values, out.dequantized) {
                    (Values::Plain(_), Some(d)) if device == 0 => LinearWeight::Dense(d),
                    (Values::Plain(q), _) => LinearWeight::Dense(dequantize_in_memory(gpu, p, q)?),
                    (Values::LowRank(qlr), _) => match &p.factors {
                        Some(f) => LinearWeight::LowRank {
                            q: dequantize_in_memory(gpu, p, &qlr[0])?,
                            lt: dequantize_in_memory(gpu, &f.0, &qlr[1])?,
                            r: dequantize_in_memory(gpu, &f.1, &qlr[2])?,
                        },
                        None => LinearWeight::Dense(dequantize_in_memory(gpu, p, &qlr[0])?),
                    },
                };
                w.set_weight(lin.kind, unrotate(lw)?);
            }
            let (rank, grid, rel) = (out.rank, out.grid, out.relative_error);
            let entry = QuantEntry {
                sparsity: out.packed.mask.as_ref().and(recipe.sparsity.name()),
                kept_per_row: out.packed.kept,
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
                rht: match (&out.tm, &tn) {
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
                device: (sh.helpers.len() > 1).then(|| sh.helpers[device].label()),
            });
            packed.push((lin.weight.name.clone(), out.packed));
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
            run_layer_stages(engine, &mut w, xs, sh.len, pos, &mut |kinds, inputs, w| {
                let n = spec.linear(kinds[0]).in_features;
                gpu.wait()?;
                let t = std::time::Instant::now();
                let h = accumulate_hessian(gpu, n, inputs, sh.hessians_on)?;
                let t1 = std::time::Instant::now();
                hessian_s += (t1 - t).as_secs_f64();
                quantize_group(kinds, h, Some(w))?;
                gpu.wait()?;
                quantize_s += t1.elapsed().as_secs_f64();
                Ok(())
            })?;
        }
    }
    Ok(LayerResult {
        packed,
        entries,
        reports,
        hessian_s,
        quantize_s,
        helper_work,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lowrank::fit::Placement;

    /// Both placements accumulate the f64 reference's H over inputs read back in parts: rows
    /// past one widened block, and a binding small enough to split them further (and the
    /// matrix into chunks).
    #[test]
    fn hessians_of_inputs_read_in_parts_match_the_reference() {
        use crate::compress::xtx::XTX_BLOCK;
        for (n, cap) in [(5usize, None), (37, Some(32 * 1024u64))] {
            let gpu = Gpu::new(&crate::gpu::GpuOptions {
                max_binding_bytes: cap,
                ..crate::gpu::GpuOptions::from_env().unwrap()
            })
            .expect("GPU tests need an adapter (install mesa-vulkan-drivers for lavapipe)");
            let rows = [2 * XTX_BLOCK + 37, 3];
            let xs: Vec<Vec<f32>> = rows
                .iter()
                .enumerate()
                .map(|(s, &r)| {
                    (0..r * n)
                        .map(|i| ((i * 7 + s * 13) % 17) as f32 * 0.25 - 2.0)
                        .collect()
                })
                .collect();
            let inputs: Vec<GpuMatrix> = xs
                .iter()
                .zip(rows)
                .map(|(x, r)| GpuMatrix::from_f32(&gpu, r, n, crate::DType::F32, x).unwrap())
                .collect();
            let mut want = vec![0.0f64; n * n];
            for (x, &r) in xs.iter().zip(&rows) {
                for (w, v) in want
                    .iter_mut()
                    .zip(crate::quant::reference::hessian_f64(x, r, n))
                {
                    *w += v;
                }
            }
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for on in [Placement::Host, Placement::Gpu] {
                let h = accumulate_hessian(&gpu, n, &inputs, on).unwrap();
                let d = h
                    .iter()
                    .zip(&want)
                    .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
                let tol = if on == Placement::Host { 1e-12 } else { 1e-6 };
                assert!(d <= tol * scale, "n {n} {on:?}: {d:e} of {scale:e}");
            }
        }
    }
}
