//! The compression pipeline: calibrate, then for each decoder layer in turn collect the
//! Hessians of its linear inputs on the GPU, quantize, and propagate the calibration
//! activations through the *quantized* layer (sequential mode), streaming the result into a
//! compressed checkpoint that is renamed into place only when complete.
//!
//! Within a layer the order is the true-sequential one: q/k/v see the normed input; o_proj sees
//! the attention output computed with quantized q/k/v; gate/up see the post-attention norm of
//! the updated residual; down_proj sees the SwiGLU product of quantized gate/up.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::ops;
use crate::gpu::quant::{self as gq, PackedWeight};
use crate::gpu::{matmul, Batch, GemmOp, Gpu, GpuMatrix, HessianAccumulator};
use crate::infer::engine::{unrotate_linear, LinearWeight};
use crate::infer::{Engine, EngineOptions};
use crate::model::compressed::{
    sha256_files, Accounting, CalibInfo, FileInfo, LayerReport, Manifest, MatrixReport,
    PlannedTensor, QuantEntry, RhtSeeds, SourceInfo, StreamingWriter, FORMAT_NAME, FORMAT_VERSION,
    MANIFEST_FILE,
};
use crate::model::{Checkpoint, LinearKind, LinearSpec, Tokenizer};
use crate::quant::grid::{pack_row, packed_words};
use crate::quant::reference::prepare_hessian;
use crate::quant::rht::{rotate_hessian, rotate_weight, Rht};
use crate::quant::sparsity::{Sparsity, PRUNED};
use crate::quant::{GptqOptions, Grid, Quantized};

use super::calib::{self, CalibOptions, Calibration};

/// Quantization method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Gptq,
    /// W ≈ Q + L·R (Q by GPTQ on `grid`, factors on their own grid).
    Caldera,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Caldera => "caldera",
        }
    }
}

/// CALDERA settings (used with [`Method::Caldera`]).
#[derive(Clone, Debug)]
pub struct CalderaSettings {
    /// Bits per weight each matrix may use, everything stored counted; picks the rank.
    pub target_bpw: f64,
    /// A fixed rank instead of the budget.
    pub rank: Option<usize>,
    pub lr_bits: u32,
    pub lr_group_size: usize,
    pub outer_iters: usize,
    pub inner_iters: usize,
    /// Least-squares clip search for the L and R grids.
    pub clip: bool,
}

impl Default for CalderaSettings {
    fn default() -> Self {
        CalderaSettings {
            target_bpw: 2.5,
            rank: None,
            lr_bits: 4,
            lr_group_size: 64,
            outer_iters: 15,
            inner_iters: 10,
            clip: true,
        }
    }
}

impl CalderaSettings {
    pub fn lr_grid(&self) -> Result<Grid> {
        Ok(Grid::new(self.lr_bits, self.lr_group_size, false)?.with_clip(self.clip))
    }

    /// Rank for an m × n matrix with backbone grid `q`.
    pub fn rank_for(&self, q: &Grid, m: usize, n: usize) -> Result<usize> {
        Ok(match self.rank {
            Some(k) => k.min(m).min(n),
            None => {
                crate::lowrank::caldera::rank_for_budget(q, &self.lr_grid()?, m, n, self.target_bpw)
            }
        })
    }
}

/// Where calibration text comes from.
#[derive(Clone, Debug)]
pub enum CalibSource {
    /// Text files or directories of .txt files.
    Text(Vec<PathBuf>),
    /// Sequences sampled from the model itself.
    SelfGenerated,
}

/// What one decoder layer gets: method, backbone grid, CALDERA settings.
#[derive(Clone, Debug)]
pub struct LayerRecipe {
    pub method: Method,
    pub grid: Grid,
    pub caldera: CalderaSettings,
    /// Pruning (gptq only).
    pub sparsity: Sparsity,
}

#[derive(Clone, Debug)]
pub struct CompressOptions {
    /// Per-layer recipes (from an allocation); empty: every layer gets `method`, `grid`,
    /// `caldera`.
    pub layers: Vec<LayerRecipe>,
    /// Recorded in the manifest when `layers` came from an allocation.
    pub allocation: Option<serde_json::Value>,
    /// Pruning of every layer (gptq only; per layer in `layers`).
    pub sparsity: Sparsity,
    pub method: Method,
    pub grid: Grid,
    pub gptq: GptqOptions,
    pub calib_source: CalibSource,
    pub calib: CalibOptions,
    pub caldera: CalderaSettings,
    pub output: PathBuf,
    /// Replace an existing output directory (never the input).
    pub force: bool,
    /// Incoherence processing: quantize T_m W T_nᵀ against T_n H T_nᵀ (randomized Hadamard
    /// transforms, seeds stored, undone at load).
    pub rht: bool,
}

impl CompressOptions {
    /// The recipe of decoder layer `l`.
    pub fn recipe(&self, l: usize) -> LayerRecipe {
        self.layers.get(l).cloned().unwrap_or_else(|| LayerRecipe {
            method: self.method,
            grid: self.grid,
            caldera: self.caldera.clone(),
            sparsity: self.sparsity,
        })
    }
}

/// Progress events.
#[derive(Clone, Debug)]
pub enum Event {
    Calibrating {
        kind: &'static str,
        done: usize,
        total: usize,
    },
    Matrix {
        layer: usize,
        name: String,
        done: usize,
        total: usize,
        relative_error: Option<f64>,
    },
    Note(String),
    Writing,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompressSummary {
    pub output: String,
    pub method: String,
    pub source_bytes: u64,
    pub output_bytes: u64,
    pub parameters: usize,
    pub bits_per_parameter: f64,
    pub linear_bits_per_parameter: f64,
    pub seconds: f64,
    pub calibration: CalibInfo,
    pub layers: Vec<LayerReport>,
}

/// Sequences per activation sub-batch: each sub-batch's widest activation (intermediate size)
/// stays under this many bytes.
const SUBBATCH_BYTES: usize = 128 << 20;

/// Removes a temporary output directory unless the write completed.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn check_output(ck: &Checkpoint, out: &Path, force: bool) -> Result<()> {
    let input = std::fs::canonicalize(ck.dir()).map_err(|e| Error::io(ck.dir(), e))?;
    if out.exists() {
        let o = std::fs::canonicalize(out).map_err(|e| Error::io(out, e))?;
        if o == input || input.starts_with(&o) {
            return Err(Error::InvalidArgument(format!(
                "{}: refusing to overwrite the input model",
                out.display()
            )));
        }
        if !force {
            return Err(Error::InvalidArgument(format!(
                "{}: already exists (pass --force to replace it)",
                out.display()
            )));
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{}: no such directory",
                parent.display()
            )));
        }
    }
    Ok(())
}

/// The stored pieces of one compressed weight.
struct Packed {
    qweight: Vec<u8>,
    scales: Vec<u8>,
    zeros: Option<Vec<u8>>,
    perm: Option<Vec<u8>>,
    /// Pruned: the kept-weight mask (rows × ⌈cols/32⌉) and the kept count per row.
    mask: Option<Vec<u32>>,
    kept: usize,
    /// CALDERA factors Lᵀ and R, each packed like a backbone.
    factors: Option<Box<(Packed, Packed)>>,
}

fn pack(q: &Quantized) -> Result<Packed> {
    let (codes, mask, kept) = if q.codes.contains(&PRUNED) {
        let kept = q.codes[..q.cols].iter().filter(|&&c| c != PRUNED).count();
        let (mask, codes) = gq::pack_sparse(&q.codes, q.rows, q.cols, q.grid.bits, kept)?;
        (codes, Some(mask), kept)
    } else {
        let words = packed_words(q.cols, q.grid.bits);
        let mut codes = Vec::with_capacity(q.rows * words);
        for r in 0..q.rows {
            pack_row(
                &q.codes[r * q.cols..(r + 1) * q.cols],
                q.grid.bits,
                &mut codes,
            );
        }
        (codes, None, q.cols)
    };
    Ok(Packed {
        mask,
        kept,
        qweight: bytemuck::cast_slice(&codes).to_vec(),
        scales: DType::F16.encode_f32(&q.scales),
        zeros: (!q.grid.symmetric).then(|| DType::F16.encode_f32(&q.zeros)),
        perm: q.perm.as_ref().map(|p| bytemuck::cast_slice(p).to_vec()),
        factors: None,
    })
}

/// The f32 weight the reader will reconstruct from `p`, dequantized on the GPU.
fn dequantize_packed(gpu: &Gpu, p: &Packed, q: &Quantized) -> Result<GpuMatrix> {
    let groups = q.grid.groups(q.cols);
    let zeros = match &p.zeros {
        Some(z) => GpuMatrix::from_bytes(gpu, q.rows, groups, DType::F16, z)?,
        None => gq::symmetric_zeros(gpu, q.grid, q.rows, groups)?,
    };
    let w = PackedWeight {
        rows: q.rows,
        cols: q.cols,
        grid: q.grid,
        packed: GpuMatrix::from_bytes(
            gpu,
            q.rows,
            packed_words(p.kept, q.grid.bits),
            DType::F32,
            &p.qweight,
        )?,
        scales: GpuMatrix::from_bytes(gpu, q.rows, groups, DType::F16, &p.scales)?,
        zeros,
        perm: p.perm.as_ref().map(|b| gpu.upload(b)).transpose()?,
        sparse: p
            .mask
            .as_ref()
            .map(|m| gq::SparseIndex::upload(gpu, q.rows, q.cols.div_ceil(32), m))
            .transpose()?,
    };
    gq::dequantize(gpu, &w)
}

/// tr(ΔW H ΔWᵀ) and tr(W H Wᵀ), with the products on the GPU.
fn weighted_errors(gpu: &Gpu, w: &[f32], wq: &GpuMatrix, h: &GpuMatrix) -> Result<(f64, f64)> {
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

/// Stored bits of all compressed linear weights under `opts` (what the manifest's `linear`
/// accounting will say), computed from shapes and recipes before compressing.
pub fn planned_linear_bits(ck: &Checkpoint, opts: &CompressOptions) -> Result<u64> {
    let mut total = 0;
    for (l, spec) in ck.arch().layers.iter().enumerate() {
        let r = opts.recipe(l);
        for lin in &spec.linears {
            let (m, n) = (lin.out_features, lin.in_features);
            let rank = if r.method == Method::Caldera {
                r.caldera.rank_for(&r.grid, m, n)?
            } else {
                0
            };
            let kept = r.sparsity.kept_per_row(n, opts.gptq.block);
            let e = QuantEntry {
                method: r.method.name().into(),
                bits: r.grid.bits,
                group_size: r.grid.group_size,
                symmetric: r.grid.symmetric,
                act_order: opts.gptq.act_order && r.method == Method::Gptq,
                rows: m,
                cols: n,
                stored_bits: 0,
                relative_error: None,
                damp: None,
                rank,
                lr_bits: if rank > 0 { r.caldera.lr_bits } else { 0 },
                lr_group_size: if rank > 0 { r.caldera.lr_group_size } else { 0 },
                rht: opts.rht.then_some(RhtSeeds { rows: 0, cols: 0 }),
                sparsity: (kept < n).then(|| r.sparsity.name()).flatten(),
                kept_per_row: kept,
            };
            total += e.expected_bits();
        }
    }
    Ok(total)
}

/// Plan of every stored tensor, in the checkpoint's order.
fn plan(ck: &Checkpoint, opts: &CompressOptions) -> Result<Vec<PlannedTensor>> {
    let linear_layer: std::collections::HashMap<&str, usize> = ck
        .arch()
        .layers
        .iter()
        .enumerate()
        .flat_map(|(l, spec)| {
            spec.linears
                .iter()
                .map(move |lin| (lin.weight.name.as_str(), l))
        })
        .collect();
    let mut out = Vec::new();
    for spec in ck.arch().tensors() {
        if let Some(&l) = linear_layer.get(spec.name.as_str()) {
            let r = opts.recipe(l);
            let act_order = opts.gptq.act_order && r.method == Method::Gptq;
            let (m, n) = (spec.shape[0], spec.shape[1]);
            let kept = r.sparsity.kept_per_row(n, opts.gptq.block);
            plan_packed(&mut out, &spec.name, m, n, &r.grid, act_order, kept);
            if r.method == Method::Caldera {
                let k = r.caldera.rank_for(&r.grid, m, n)?;
                if k > 0 {
                    let lg = r.caldera.lr_grid()?;
                    plan_packed(&mut out, &format!("{}.L", spec.name), k, m, &lg, false, m);
                    plan_packed(&mut out, &format!("{}.R", spec.name), k, n, &lg, false, n);
                }
            }
        } else {
            let t = ck.tensor(&spec.name)?;
            out.push(PlannedTensor {
                name: spec.name.clone(),
                dtype: t.dtype.safetensors_name().into(),
                shape: t.shape.to_vec(),
                bytes: t.bytes.len(),
            });
        }
    }
    Ok(out)
}

fn write_packed(wr: &mut StreamingWriter, name: &str, p: &Packed) -> Result<()> {
    wr.write(&format!("{name}.qweight"), &p.qweight)?;
    wr.write(&format!("{name}.scales"), &p.scales)?;
    if let Some(z) = &p.zeros {
        wr.write(&format!("{name}.zeros"), z)?;
    }
    if let Some(m) = &p.mask {
        wr.write(&format!("{name}.mask"), bytemuck::cast_slice(m))?;
    }
    if let Some(pm) = &p.perm {
        wr.write(&format!("{name}.perm"), pm)?;
    }
    if let Some(f) = &p.factors {
        write_packed(wr, &format!("{name}.L"), &f.0)?;
        write_packed(wr, &format!("{name}.R"), &f.1)?;
    }
    Ok(())
}

/// Header entries of one packed matrix (`PREFIX.qweight`, `.scales`, `.zeros`, `.perm`).
fn plan_packed(
    out: &mut Vec<PlannedTensor>,
    prefix: &str,
    rows: usize,
    cols: usize,
    grid: &Grid,
    act_order: bool,
    kept: usize,
) {
    let groups = grid.groups(cols);
    let words = packed_words(kept, grid.bits);
    out.push(PlannedTensor {
        name: format!("{prefix}.qweight"),
        dtype: "U32".into(),
        shape: vec![rows, words],
        bytes: rows * words * 4,
    });
    out.push(PlannedTensor {
        name: format!("{prefix}.scales"),
        dtype: "F16".into(),
        shape: vec![rows, groups],
        bytes: rows * groups * 2,
    });
    if !grid.symmetric {
        out.push(PlannedTensor {
            name: format!("{prefix}.zeros"),
            dtype: "F16".into(),
            shape: vec![rows, groups],
            bytes: rows * groups * 2,
        });
    }
    if kept < cols {
        let mw = cols.div_ceil(32);
        out.push(PlannedTensor {
            name: format!("{prefix}.mask"),
            dtype: "U32".into(),
            shape: vec![rows, mw],
            bytes: rows * mw * 4,
        });
    }
    if act_order {
        out.push(PlannedTensor {
            name: format!("{prefix}.perm"),
            dtype: "U32".into(),
            shape: vec![cols],
            bytes: cols * 4,
        });
    }
}

fn copy_plain(wr: &mut StreamingWriter, ck: &Checkpoint, name: &str) -> Result<()> {
    let t = ck.tensor(name)?;
    wr.write(name, t.bytes)
}

/// Files copied from the source directory beside the weights.
const SIDE_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

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

/// Split `tokens` (whole sequences of `len`) into sub-batches and embed them.
pub(crate) fn calibration_batches(
    engine: &Engine<'_>,
    tokens: &[u32],
    len: usize,
) -> Result<CalibBatches> {
    let cfg = engine.checkpoint().config();
    let widest = cfg
        .intermediate_size
        .max(cfg.hidden_size)
        .max(cfg.num_heads * cfg.head_dim);
    let nseq = tokens.len() / len;
    let per_batch = (SUBBATCH_BYTES / (len * widest * 4))
        .max(1)
        .min(nseq.max(1));
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
pub(crate) struct LayerShared<'a> {
    pub gpu: &'a Gpu,
    pub ck: &'a Checkpoint,
    pub gptq: GptqOptions,
    pub rht: bool,
    pub seed: u64,
    /// Tokens per calibration sequence.
    pub len: usize,
    /// Positions 0..len repeated over the largest sub-batch.
    pub pos: &'a crate::gpu::GpuBuffer,
}

/// What one layer became.
pub(crate) struct LayerResult {
    /// The layer as the compressed model computes it (dequantized weights on the GPU).
    #[allow(dead_code)]
    pub weights: crate::infer::engine::LayerWeights,
    packed: Vec<(String, Packed)>,
    entries: Vec<(String, QuantEntry)>,
    reports: Vec<MatrixReport>,
}

impl LayerResult {
    /// Manifest entries of the layer's linears.
    pub(crate) fn entries(&self) -> &[(String, QuantEntry)] {
        &self.entries
    }
}

/// Compress decoder layer `l` with `recipe`, sequentially inside the layer (o_proj sees the
/// output of the quantized q/k/v, down_proj that of the quantized gate/up). `xs` holds the
/// calibration activations entering the layer, in sub-batches; on return they hold what
/// leaves the *compressed* layer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compress_layer(
    engine: &Engine<'_>,
    sh: &LayerShared<'_>,
    l: usize,
    recipe: &LayerRecipe,
    xs: &[GpuMatrix],
    done: &mut usize,
    total: usize,
    progress: &mut dyn FnMut(&Event),
) -> Result<LayerResult> {
    let (gpu, ck, len, pos) = (sh.gpu, sh.ck, sh.len, sh.pos);
    let spec = &ck.arch().layers[l];
    let act_order = sh.gptq.act_order && recipe.method == Method::Gptq;
    let mut w = engine.read_layer(l)?;
    let mut packed: Vec<(String, Packed)> = Vec::new();
    let mut reports = Vec::new();
    let mut entries = Vec::new();

    let mut quantize_group = |kinds: &[LinearKind],
                              inputs: &[GpuMatrix],
                              w: &mut crate::infer::engine::LayerWeights|
     -> Result<()> {
        let first = spec.linear(kinds[0]);
        let mut acc = HessianAccumulator::new(gpu, first.in_features)?;
        let mut b = Batch::new(gpu);
        for x in inputs {
            acc.accumulate(&mut b, x)?;
        }
        b.submit()?;
        let mut h = acc.read(gpu)?;
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
            let (p, rel) = if recipe.method == Method::Caldera {
                let cs = &recipe.caldera;
                rank = cs.rank_for(&recipe.grid, m, n)?;
                let co = crate::lowrank::caldera::CalderaOptions {
                    rank,
                    q_grid: recipe.grid,
                    lr_grid: cs.lr_grid()?,
                    outer_iters: cs.outer_iters,
                    inner_iters: cs.inner_iters,
                    gptq: sh.gptq,
                    oversample: 10,
                    power_iters: 2,
                    seed: sh.seed,
                };
                let d = crate::lowrank::caldera::decompose(gpu, &wv, m, n, &h, &co)?;
                let mut p = pack(&d.q)?;
                let backbone = dequantize_packed(gpu, &p, &d.q)?;
                let lw = if rank > 0 {
                    let (pl, pr) = (pack(&d.lt)?, pack(&d.r)?);
                    let lt = dequantize_packed(gpu, &pl, &d.lt)?;
                    let r = dequantize_packed(gpu, &pr, &d.r)?;
                    p.factors = Some(Box::new((pl, pr)));
                    LinearWeight::LowRank { q: backbone, lt, r }
                } else {
                    LinearWeight::Dense(backbone)
                };
                w.set_weight(kind, unrotate(lw)?);
                (p, Some(d.relative_error))
            } else {
                let q = match &prep {
                    Some(p) => gq::sparse_gptq(
                        gpu,
                        &wv,
                        m,
                        n,
                        p,
                        recipe.grid,
                        sh.gptq.block,
                        recipe.sparsity,
                    )?
                    .download(gpu)?,
                    None => {
                        let wm = GpuMatrix::from_f32(gpu, m, n, DType::F32, &wv)?;
                        gq::rtn(gpu, &wm, recipe.grid)?.download(gpu)?
                    }
                };
                let p = pack(&q)?;
                let deq = dequantize_packed(gpu, &p, &q)?;
                let (err, norm) = weighted_errors(gpu, &wv, &deq, &hm)?;
                w.set_weight(kind, unrotate(LinearWeight::Dense(deq))?);
                (p, if norm > 0.0 { Some(err / norm) } else { None })
            };
            let entry = QuantEntry {
                sparsity: p.mask.as_ref().and(recipe.sparsity.name()),
                kept_per_row: p.kept,
                method: recipe.method.name().into(),
                bits: recipe.grid.bits,
                group_size: recipe.grid.group_size,
                symmetric: recipe.grid.symmetric,
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
        }
        Ok(())
    };

    // q, k, v on the normed input.
    let mut hs = Vec::new();
    for x in xs {
        let mut b = Batch::new(gpu);
        hs.push(engine.stage_attn_input(&mut b, &w, x, len)?);
        b.submit()?;
    }
    quantize_group(
        &[LinearKind::QProj, LinearKind::KProj, LinearKind::VProj],
        &hs,
        &mut w,
    )?;
    // o on the attention output of the quantized q, k, v.
    let mut attns = Vec::new();
    for h in &hs {
        let mut b = Batch::new(gpu);
        // `pos` covers the largest sub-batch; smaller ones read a prefix.
        attns.push(engine.stage_attention(&mut b, &w, h, pos, len, None)?);
        b.submit()?;
    }
    drop(hs);
    quantize_group(&[LinearKind::OProj], &attns, &mut w)?;
    for (a, x) in attns.iter().zip(xs) {
        let mut b = Batch::new(gpu);
        engine.stage_o_residual(&mut b, &w, a, x)?;
        b.submit()?;
    }
    drop(attns);
    // gate, up on the post-attention norm.
    let mut h2s = Vec::new();
    for x in xs {
        let mut b = Batch::new(gpu);
        h2s.push(engine.stage_mlp_input(&mut b, &w, x, len)?);
        b.submit()?;
    }
    quantize_group(&[LinearKind::GateProj, LinearKind::UpProj], &h2s, &mut w)?;
    // down on the SwiGLU product of the quantized gate, up.
    let mut acts = Vec::new();
    for h2 in &h2s {
        let mut b = Batch::new(gpu);
        acts.push(engine.stage_mlp_act(&mut b, &w, h2, len)?);
        b.submit()?;
    }
    drop(h2s);
    quantize_group(&[LinearKind::DownProj], &acts, &mut w)?;
    for (a, x) in acts.iter().zip(xs) {
        let mut b = Batch::new(gpu);
        engine.stage_down_residual(&mut b, &w, a, x)?;
        b.submit()?;
    }
    drop(acts);
    Ok(LayerResult {
        weights: w,
        packed,
        entries,
        reports,
    })
}

/// Compress `ck` into `opts.output`.
pub fn compress(
    gpu: &Gpu,
    ck: &Checkpoint,
    opts: &CompressOptions,
    progress: &mut dyn FnMut(&Event),
) -> Result<CompressSummary> {
    let start = Instant::now();
    if ck.manifest().is_some() {
        return Err(Error::InvalidArgument(format!(
            "{} is already a compressed checkpoint; compress the original model",
            ck.dir().display()
        )));
    }
    check_output(ck, &opts.output, opts.force)?;
    for l in 0..ck.arch().layers.len() {
        let r = opts.recipe(l);
        if r.sparsity != Sparsity::Dense
            && (r.method != Method::Gptq || opts.gptq.act_order || opts.gptq.block > 128)
        {
            return Err(Error::InvalidArgument(
                "pruning (--sparsity) works with --method gptq, without --act-order".into(),
            ));
        }
    }
    let cfg = ck.config().clone();
    let len = opts.calib.len.min(cfg.max_position_embeddings).max(2);
    let copts = CalibOptions {
        len,
        ..opts.calib.clone()
    };

    let mut engine = Engine::new(
        gpu,
        ck,
        &EngineOptions {
            resident_bytes: 0,
            max_positions: len,
        },
    )?;
    let calibration: Calibration = match &opts.calib_source {
        CalibSource::Text(paths) => {
            progress(&Event::Calibrating {
                kind: "text",
                done: 0,
                total: copts.samples,
            });
            let tok = Tokenizer::from_model_dir(ck.dir())?.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} has no tokenizer.json to tokenize --calib text",
                    ck.dir().display()
                ))
            })?;
            let c = calib::from_text(&tok, paths, &copts)?;
            progress(&Event::Calibrating {
                kind: "text",
                done: copts.samples,
                total: copts.samples,
            });
            c
        }
        CalibSource::SelfGenerated => calib::self_generated(&mut engine, &copts, &mut |d, t| {
            progress(&Event::Calibrating {
                kind: "self",
                done: d,
                total: t,
            })
        })?,
    };

    // Output: a temporary sibling directory, renamed into place at the end.
    let out = opts.output.clone();
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp_path = out.with_file_name(format!(".{name}.pumice-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_path);
    std::fs::create_dir_all(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
    let mut tmp = TempDir {
        path: tmp_path.clone(),
        keep: false,
    };
    let st_path = tmp_path.join("model.safetensors");
    let mut writer = StreamingWriter::create(&st_path, plan(ck, opts)?)?;
    let arch = ck.arch();
    copy_plain(&mut writer, ck, &arch.embed_tokens.name)?;

    let CalibBatches { xs, pos, .. } = calibration_batches(&engine, &calibration.tokens, len)?;

    let total_matrices = arch.layers.len() * 7;
    let mut done = 0;
    let mut entries = std::collections::BTreeMap::new();
    let mut layers = Vec::new();
    let shared = LayerShared {
        gpu,
        ck,
        gptq: opts.gptq,
        rht: opts.rht,
        seed: opts.calib.seed,
        len,
        pos: &pos,
    };
    for (l, spec) in arch.layers.iter().enumerate() {
        let t0 = Instant::now();
        let recipe = opts.recipe(l);
        let LayerResult {
            packed,
            entries: layer_entries,
            mut reports,
            ..
        } = compress_layer(
            &engine,
            &shared,
            l,
            &recipe,
            &xs,
            &mut done,
            total_matrices,
            progress,
        )?;
        entries.extend(layer_entries);

        // Write this layer's tensors in checkpoint order.
        for t in spec.tensors() {
            match packed.iter().find(|(n, _)| n == &t.name) {
                Some((n, p)) => write_packed(&mut writer, n, p)?,
                None => copy_plain(&mut writer, ck, &t.name)?,
            }
        }
        // Keep the manifest's layer order as the model's.
        reports.sort_by_key(|r| spec.linears.iter().position(|l| l.weight.name == r.name));
        layers.push(LayerReport {
            layer: l,
            seconds: t0.elapsed().as_secs_f64(),
            matrices: reports,
        });
    }
    drop(xs);

    progress(&Event::Writing);
    copy_plain(&mut writer, ck, &arch.final_norm.name)?;
    if let Some(h) = &arch.lm_head {
        copy_plain(&mut writer, ck, &h.name)?;
    }
    writer.finish()?;

    for f in SIDE_FILES {
        let src = ck.dir().join(f);
        if src.is_file() {
            std::fs::copy(&src, tmp_path.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    let out_bytes = std::fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();
    let parameters = ck.parameter_count();
    let linear_params: usize = entries.values().map(|e| e.rows * e.cols).sum();
    let linear_bits: u64 = entries.values().map(|e| e.stored_bits).sum();
    let mut src_files: Vec<&Path> = ck.files().iter().map(|f| f.path()).collect();
    src_files.sort();
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        created_by: format!("pumice {}", env!("CARGO_PKG_VERSION")),
        source: SourceInfo {
            path: ck.dir().display().to_string(),
            sha256: sha256_files(&src_files)?,
            parameters,
            bytes: ck.bytes_on_disk(),
        },
        method: if opts
            .layers
            .iter()
            .any(|r| r.method != opts.recipe(0).method)
        {
            "mixed".into()
        } else {
            opts.recipe(0).method.name().into()
        },
        params: serde_json::json!({
            "bits": opts.grid.bits,
            "group_size": opts.grid.group_size,
            "symmetric": opts.grid.symmetric,
            "clip": opts.grid.clip,
            "act_order": opts.gptq.act_order && opts.method == Method::Gptq,
            "damp": opts.gptq.damp,
            "block": opts.gptq.block,
            "sequential": true,
            "rht": opts.rht,
            "caldera": (opts.method == Method::Caldera).then(|| serde_json::json!({
                "target_bpw": opts.caldera.target_bpw,
                "rank": opts.caldera.rank,
                "lr_bits": opts.caldera.lr_bits,
                "lr_group_size": opts.caldera.lr_group_size,
                "outer_iters": opts.caldera.outer_iters,
                "inner_iters": opts.caldera.inner_iters,
                "lr_clip": opts.caldera.clip,
            })),
        }),
        calibration: Some(calibration.info.clone()),
        tensors: entries,
        linear: Accounting::new(linear_params, linear_bits),
        total: Accounting::new(parameters, out_bytes * 8),
        layers: layers.clone(),
        files: [(
            "model.safetensors".to_string(),
            FileInfo {
                bytes: out_bytes,
                sha256: sha256_files(&[st_path.as_path()])?,
            },
        )]
        .into_iter()
        .collect(),
        allocation: opts.allocation.clone(),
    };
    let mpath = tmp_path.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    std::fs::write(&mpath, text).map_err(|e| Error::io(&mpath, e))?;
    if let Ok(f) = std::fs::File::open(&mpath) {
        let _ = f.sync_all();
    }

    // Swap into place: a replaced output is moved aside first and removed after.
    let mut old = None;
    if out.exists() {
        let aside = out.with_file_name(format!(".{name}.pumice-old-{}", std::process::id()));
        std::fs::rename(&out, &aside).map_err(|e| Error::io(&out, e))?;
        old = Some(aside);
    }
    std::fs::rename(&tmp_path, &out).map_err(|e| Error::io(&out, e))?;
    tmp.keep = true;
    if let Some(a) = old {
        let _ = std::fs::remove_dir_all(a);
    }
    Ok(CompressSummary {
        output: out.display().to_string(),
        method: opts.method.name().into(),
        source_bytes: ck.bytes_on_disk(),
        output_bytes: out_bytes,
        parameters,
        bits_per_parameter: manifest.total.bits_per_parameter,
        linear_bits_per_parameter: manifest.linear.bits_per_parameter,
        seconds: start.elapsed().as_secs_f64(),
        calibration: calibration.info,
        layers,
    })
}
