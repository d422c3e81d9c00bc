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
use super::workdir::{
    check_inputs, fingerprint, hessian_file, layer_file, write_atomic, Activations, HessiansInfo,
    Job, LayerHessians, StoredLayer, TensorMeta,
};

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
    /// Hessians saved by [`collect_hessians`] instead of a calibration pass (layers are then
    /// independent: nothing propagates through quantized layers).
    pub hessians: Option<PathBuf>,
    /// Keep each finished layer here (atomic files) so an interrupted run resumes.
    pub work_dir: Option<PathBuf>,
    /// Continue the job in `work_dir` (a fresh one starts if it holds none).
    pub resume: bool,
    /// Compress only shard `(i, n)`'s layers into `work_dir` (needs `hessians`); [`merge`]
    /// writes the output. `output` and `force` are then unused.
    pub shard: Option<(usize, usize)>,
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
    /// A decoder layer finished (`done` of `total` this run compresses).
    Layer {
        layer: usize,
        done: usize,
        total: usize,
        seconds: f64,
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
    /// Set for a shard: which one and its layers (the sizes then cover those layers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// Peak resident memory of the process (Linux), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Peak GPU memory in pumice's buffers, bytes.
    pub peak_gpu_bytes: u64,
}

/// Sequences per activation sub-batch: each sub-batch's widest activation (intermediate size)
/// stays under this many bytes.
const SUBBATCH_BYTES: usize = 128 << 20;

/// `path` made absolute without requiring it to exist: its deepest existing ancestor
/// canonicalized, the rest appended.
fn resolved(path: &Path) -> Option<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(cur) {
            return Some(rest.iter().rev().fold(c, |p: PathBuf, n| p.join(n)));
        }
        rest.push(cur.file_name()?.to_os_string());
        cur = cur.parent()?;
    }
}

/// Refuse an output that is, contains or lies inside one of the directories the job reads or
/// keeps (`inputs`: a work directory, saved Hessians): replacing it would destroy them.
fn check_output_apart(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let Some(o) = resolved(out) else {
        return Ok(());
    };
    for (what, p) in inputs {
        if let Some(p) = resolved(p) {
            if o == p || p.starts_with(&o) || o.starts_with(&p) {
                return Err(Error::InvalidArgument(format!(
                    "{}: the output would overwrite the {what} {} the job reads",
                    out.display(),
                    p.display()
                )));
            }
        }
    }
    Ok(())
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

/// The stored tensors of one linear weight: `(layer, name, rows, cols) → tensors`.
type LinearPlan<'a> = dyn FnMut(usize, &str, usize, usize) -> Result<Vec<PlannedTensor>> + 'a;

/// What [`run_layer_stages`] calls at each group of linears: `(kinds, inputs, weights)`.
type GroupHook<'a> = dyn FnMut(&[LinearKind], &[GpuMatrix], &mut crate::infer::engine::LayerWeights) -> Result<()>
    + 'a;

/// Plan of every stored tensor, in the checkpoint's order; `linear(layer, name, rows, cols)`
/// gives the stored tensors of one linear weight.
fn plan_with(ck: &Checkpoint, linear: &mut LinearPlan<'_>) -> Result<Vec<PlannedTensor>> {
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
            out.extend(linear(l, &spec.name, spec.shape[0], spec.shape[1])?);
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

/// The plan under `opts` (known before compressing).
fn plan(ck: &Checkpoint, opts: &CompressOptions) -> Result<Vec<PlannedTensor>> {
    plan_with(ck, &mut |l, name, m, n| {
        let r = opts.recipe(l);
        let act_order = opts.gptq.act_order && r.method == Method::Gptq;
        let kept = r.sparsity.kept_per_row(n, opts.gptq.block);
        let mut out = Vec::new();
        plan_packed(&mut out, name, m, n, &r.grid, act_order, kept);
        if r.method == Method::Caldera {
            let k = r.caldera.rank_for(&r.grid, m, n)?;
            if k > 0 {
                let lg = r.caldera.lr_grid()?;
                plan_packed(&mut out, &format!("{name}.L"), k, m, &lg, false, m);
                plan_packed(&mut out, &format!("{name}.R"), k, n, &lg, false, n);
            }
        }
        Ok(out)
    })
}

/// The stored tensors of one linear weight as its manifest entry describes them.
fn plan_entry(name: &str, e: &QuantEntry) -> Result<Vec<PlannedTensor>> {
    let mut out = Vec::new();
    plan_packed(
        &mut out,
        name,
        e.rows,
        e.cols,
        &e.grid()?,
        e.act_order,
        e.kept_per_row,
    );
    if let Some(lg) = e.lr_grid()? {
        plan_packed(
            &mut out,
            &format!("{name}.L"),
            e.rank,
            e.rows,
            &lg,
            false,
            e.rows,
        );
        plan_packed(
            &mut out,
            &format!("{name}.R"),
            e.rank,
            e.cols,
            &lg,
            false,
            e.cols,
        );
    }
    Ok(out)
}

/// The data of `p`'s stored tensors, in the order [`plan_packed`] lists them.
fn packed_blobs(name: &str, p: Packed, out: &mut Vec<(String, Vec<u8>)>) {
    out.push((format!("{name}.qweight"), p.qweight));
    out.push((format!("{name}.scales"), p.scales));
    if let Some(z) = p.zeros {
        out.push((format!("{name}.zeros"), z));
    }
    if let Some(m) = p.mask {
        out.push((format!("{name}.mask"), bytemuck::cast_slice(&m).to_vec()));
    }
    if let Some(pm) = p.perm {
        out.push((format!("{name}.perm"), pm));
    }
    if let Some(f) = p.factors {
        let (l, r) = *f;
        packed_blobs(&format!("{name}.L"), l, out);
        packed_blobs(&format!("{name}.R"), r, out);
    }
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
    wr.write(name, t.bytes)?;
    ck.release(name);
    Ok(())
}

/// The process's peak resident set (Linux: VmHWM), for run summaries.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
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

/// Sequences per calibration sub-batch for sequences of `len` tokens.
fn sequences_per_batch(cfg: &crate::model::ModelConfig, len: usize, nseq: usize) -> usize {
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
    packed: Vec<(String, Packed)>,
    entries: Vec<(String, QuantEntry)>,
    reports: Vec<MatrixReport>,
}

impl LayerResult {
    /// Manifest entries of the layer's linears.
    pub(crate) fn entries(&self) -> &[(String, QuantEntry)] {
        &self.entries
    }

    /// The stored form (what a work directory keeps and the checkpoint receives).
    fn into_stored(self, layer: usize, seconds: f64) -> Result<StoredLayer> {
        let mut tensors = Vec::new();
        for (name, p) in self.packed {
            let e = &self
                .entries
                .iter()
                .find(|(n, _)| *n == name)
                .expect("every packed matrix has an entry")
                .1;
            let metas = plan_entry(&name, e)?;
            let mut blobs = Vec::new();
            packed_blobs(&name, p, &mut blobs);
            if metas.len() != blobs.len()
                || metas
                    .iter()
                    .zip(&blobs)
                    .any(|(m, (n, d))| m.name != *n || m.bytes != d.len())
            {
                return Err(Error::Shape(format!(
                    "{name}: packed tensors disagree with the planned layout"
                )));
            }
            for (m, (_, d)) in metas.into_iter().zip(blobs) {
                tensors.push((
                    TensorMeta {
                        name: m.name,
                        dtype: m.dtype,
                        shape: m.shape,
                        bytes: m.bytes,
                    },
                    d,
                ));
            }
        }
        Ok(StoredLayer {
            layer,
            seconds,
            entries: self.entries,
            reports: self.reports,
            tensors,
        })
    }
}

/// Linear layers that share an input, in the order a layer computes them.
const GROUPS: [&[LinearKind]; 4] = [
    &[LinearKind::QProj, LinearKind::KProj, LinearKind::VProj],
    &[LinearKind::OProj],
    &[LinearKind::GateProj, LinearKind::UpProj],
    &[LinearKind::DownProj],
];

/// Where a layer's Hessians come from.
pub(crate) enum LayerInput<'a> {
    /// Calibration activations entering the layer, in sub-batches; on return they hold what
    /// leaves the *compressed* layer.
    Activations(&'a [GpuMatrix]),
    /// Hessians saved by `pumice hessians` (from the original model); nothing propagates.
    Hessians(LayerHessians),
}

/// Run decoder layer `w` over the sub-batches `xs` (updated in place) stage by stage. At each
/// of the four [`GROUPS`], `group(kinds, inputs, w)` sees the inputs of those linears and may
/// replace their weights in `w`; later stages compute with what it left.
fn run_layer_stages(
    engine: &Engine<'_>,
    w: &mut crate::infer::engine::LayerWeights,
    xs: &[GpuMatrix],
    len: usize,
    pos: &crate::gpu::GpuBuffer,
    group: &mut GroupHook<'_>,
) -> Result<()> {
    let gpu = engine.gpu();
    // q, k, v on the normed input.
    let mut hs = Vec::new();
    for x in xs {
        let mut b = Batch::new(gpu);
        hs.push(engine.stage_attn_input(&mut b, w, x, len)?);
        b.submit()?;
    }
    group(GROUPS[0], &hs, w)?;
    // o on the attention output of the (quantized) q, k, v.
    let mut attns = Vec::new();
    for h in &hs {
        let mut b = Batch::new(gpu);
        // `pos` covers the largest sub-batch; smaller ones read a prefix.
        attns.push(engine.stage_attention(&mut b, w, h, pos, len, None)?);
        b.submit()?;
    }
    drop(hs);
    group(GROUPS[1], &attns, w)?;
    for (a, x) in attns.iter().zip(xs) {
        let mut b = Batch::new(gpu);
        engine.stage_o_residual(&mut b, w, a, x)?;
        b.submit()?;
    }
    drop(attns);
    // gate, up on the post-attention norm.
    let mut h2s = Vec::new();
    for x in xs {
        let mut b = Batch::new(gpu);
        h2s.push(engine.stage_mlp_input(&mut b, w, x, len)?);
        b.submit()?;
    }
    group(GROUPS[2], &h2s, w)?;
    // down on the SwiGLU product of the (quantized) gate, up.
    let mut acts = Vec::new();
    for h2 in &h2s {
        let mut b = Batch::new(gpu);
        acts.push(engine.stage_mlp_act(&mut b, w, h2, len)?);
        b.submit()?;
    }
    drop(h2s);
    group(GROUPS[3], &acts, w)?;
    for (a, x) in acts.iter().zip(xs) {
        let mut b = Batch::new(gpu);
        engine.stage_down_residual(&mut b, w, a, x)?;
        b.submit()?;
    }
    Ok(())
}

/// H = Σ XᵀX over `inputs` (f64, full symmetric).
fn accumulate_hessian(gpu: &Gpu, n: usize, inputs: &[GpuMatrix]) -> Result<Vec<f64>> {
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
    engine: &Engine<'_>,
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
    let mut packed: Vec<(String, Packed)> = Vec::new();
    let mut reports = Vec::new();
    let mut entries = Vec::new();

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
                if rank > 0 {
                    p.factors = Some(Box::new((pack(&d.lt)?, pack(&d.r)?)));
                }
                if let Some(w) = w.as_deref_mut() {
                    let q = dequantize_packed(gpu, &p, &d.q)?;
                    let lw = match &p.factors {
                        Some(f) => LinearWeight::LowRank {
                            q,
                            lt: dequantize_packed(gpu, &f.0, &d.lt)?,
                            r: dequantize_packed(gpu, &f.1, &d.r)?,
                        },
                        None => LinearWeight::Dense(q),
                    };
                    w.set_weight(kind, unrotate(lw)?);
                }
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
                if let Some(w) = w.as_deref_mut() {
                    w.set_weight(kind, unrotate(LinearWeight::Dense(deq))?);
                }
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
                quantize_group(kinds, h, None)?;
            }
        }
        LayerInput::Activations(xs) => {
            let mut w = engine.read_layer(l)?;
            run_layer_stages(
                engine,
                &mut w,
                xs,
                sh.len,
                sh.pos,
                &mut |kinds, inputs, w| {
                    let n = spec.linear(kinds[0]).in_features;
                    let h = accumulate_hessian(gpu, n, inputs)?;
                    quantize_group(kinds, h, Some(w))
                },
            )?;
        }
    }
    Ok(LayerResult {
        packed,
        entries,
        reports,
    })
}

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

/// A temporary sibling of `out` to write into, named after this process. Siblings left by
/// processes that no longer run (killed) are removed first.
fn begin_output_dir(out: &Path) -> Result<TempDir> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let prefix = format!(".{name}.pumice-tmp-");
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(rd) = std::fs::read_dir(parent) {
        for e in rd.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = f.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
                if pid != std::process::id() && !process_alive(pid) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let path = parent.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    Ok(TempDir { path, keep: false })
}

/// Whether process `pid` still runs (Linux: /proc; elsewhere assumed, so nothing is removed).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Move the finished temporary directory into place; a replaced output is moved aside first
/// and removed after.
fn commit_output_dir(mut tmp: TempDir, out: &Path) -> Result<()> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let mut old = None;
    if out.exists() {
        let aside = out.with_file_name(format!(".{name}.pumice-old-{}", std::process::id()));
        std::fs::rename(out, &aside).map_err(|e| Error::io(out, e))?;
        old = Some(aside);
    }
    std::fs::rename(&tmp.path, out).map_err(|e| Error::io(out, e))?;
    tmp.keep = true;
    if let Some(a) = old {
        let _ = std::fs::remove_dir_all(a);
    }
    Ok(())
}

/// The source checkpoint's identity (its path made absolute, so every route to the same
/// output writes the same manifest).
pub fn source_info(ck: &Checkpoint) -> Result<SourceInfo> {
    let mut src_files: Vec<&Path> = ck.files().iter().map(|f| f.path()).collect();
    src_files.sort();
    let path = std::fs::canonicalize(ck.dir()).unwrap_or_else(|_| ck.dir().to_path_buf());
    Ok(SourceInfo {
        path: path.display().to_string(),
        sha256: sha256_files(&src_files)?,
        parameters: ck.parameter_count(),
        bytes: ck.bytes_on_disk(),
    })
}

/// The manifest fields that do not come from the layers.
struct ManifestBase {
    source: SourceInfo,
    method: String,
    params: serde_json::Value,
    calibration: CalibInfo,
    allocation: Option<serde_json::Value>,
}

fn manifest_method(opts: &CompressOptions) -> String {
    if opts
        .layers
        .iter()
        .any(|r| r.method != opts.recipe(0).method)
    {
        "mixed".into()
    } else {
        opts.recipe(0).method.name().into()
    }
}

fn manifest_params(opts: &CompressOptions) -> serde_json::Value {
    serde_json::json!({
        "bits": opts.grid.bits,
        "group_size": opts.grid.group_size,
        "symmetric": opts.grid.symmetric,
        "clip": opts.grid.clip,
        "act_order": opts.gptq.act_order && opts.method == Method::Gptq,
        "damp": opts.gptq.damp,
        "block": opts.gptq.block,
        "sequential": opts.hessians.is_none(),
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
    })
}

/// Streams a compressed checkpoint into a temporary directory, layer by layer, and renames it
/// into place when complete.
struct OutputWriter {
    tmp: TempDir,
    st_path: PathBuf,
    writer: StreamingWriter,
    entries: std::collections::BTreeMap<String, QuantEntry>,
    layers: Vec<LayerReport>,
}

impl OutputWriter {
    fn begin(ck: &Checkpoint, out: &Path, plan: Vec<PlannedTensor>) -> Result<OutputWriter> {
        let tmp = begin_output_dir(out)?;
        let st_path = tmp.path.join("model.safetensors");
        let mut writer = StreamingWriter::create(&st_path, plan)?;
        copy_plain(&mut writer, ck, &ck.arch().embed_tokens.name)?;
        Ok(OutputWriter {
            tmp,
            st_path,
            writer,
            entries: Default::default(),
            layers: Vec::new(),
        })
    }

    /// Write the next decoder layer's tensors in checkpoint order.
    fn layer(&mut self, ck: &Checkpoint, s: &StoredLayer) -> Result<()> {
        let spec = &ck.arch().layers[s.layer];
        for t in spec.tensors() {
            if spec.linears.iter().any(|lin| lin.weight.name == t.name) {
                let prefix = format!("{}.", t.name);
                for (m, d) in s
                    .tensors
                    .iter()
                    .filter(|(m, _)| m.name.starts_with(&prefix))
                {
                    self.writer.write(&m.name, d)?;
                }
            } else {
                copy_plain(&mut self.writer, ck, &t.name)?;
            }
        }
        self.entries.extend(s.entries.iter().cloned());
        let mut matrices = s.reports.clone();
        // Keep the manifest's layer order as the model's.
        matrices.sort_by_key(|r| spec.linears.iter().position(|l| l.weight.name == r.name));
        self.layers.push(LayerReport {
            layer: s.layer,
            seconds: None,
            matrices,
        });
        Ok(())
    }

    /// Final norm, LM head, side files, manifest; then rename into `out`.
    fn finish(mut self, ck: &Checkpoint, out: &Path, base: ManifestBase) -> Result<Manifest> {
        let arch = ck.arch();
        copy_plain(&mut self.writer, ck, &arch.final_norm.name)?;
        if let Some(h) = &arch.lm_head {
            copy_plain(&mut self.writer, ck, &h.name)?;
        }
        self.writer.finish()?;
        for f in SIDE_FILES {
            let src = ck.dir().join(f);
            if src.is_file() {
                std::fs::copy(&src, self.tmp.path.join(f)).map_err(|e| Error::io(&src, e))?;
            }
        }
        let out_bytes = std::fs::metadata(&self.st_path)
            .map_err(|e| Error::io(&self.st_path, e))?
            .len();
        let linear_params: usize = self.entries.values().map(|e| e.rows * e.cols).sum();
        let linear_bits: u64 = self.entries.values().map(|e| e.stored_bits).sum();
        let parameters = base.source.parameters;
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            created_by: format!("pumice {}", env!("CARGO_PKG_VERSION")),
            source: base.source,
            method: base.method,
            params: base.params,
            calibration: Some(base.calibration),
            tensors: self.entries,
            linear: Accounting::new(linear_params, linear_bits),
            total: Accounting::new(parameters, out_bytes * 8),
            layers: self.layers,
            files: [(
                "model.safetensors".to_string(),
                FileInfo {
                    bytes: out_bytes,
                    sha256: sha256_files(&[self.st_path.as_path()])?,
                },
            )]
            .into_iter()
            .collect(),
            allocation: base.allocation,
        };
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
        write_atomic(&self.tmp.path.join(MANIFEST_FILE), &[text.as_bytes()])?;
        commit_output_dir(self.tmp, out)?;
        Ok(manifest)
    }
}

/// An engine that streams layers (none resident) for sequences up to `len`; the embedding and
/// LM head, now on the GPU, have their mapped pages released.
fn streaming_engine<'a>(gpu: &'a Gpu, ck: &'a Checkpoint, len: usize) -> Result<Engine<'a>> {
    let engine = Engine::new(
        gpu,
        ck,
        &EngineOptions {
            resident_bytes: 0,
            max_positions: len,
        },
    )?;
    ck.release(&ck.arch().embed_tokens.name);
    if let Some(h) = &ck.arch().lm_head {
        ck.release(&h.name);
    }
    Ok(engine)
}

/// Calibration sequences from `source`.
fn calibrate(
    engine: &mut Engine<'_>,
    source: &CalibSource,
    copts: &CalibOptions,
    progress: &mut dyn FnMut(&Event),
) -> Result<Calibration> {
    match source {
        CalibSource::Text(paths) => {
            progress(&Event::Calibrating {
                kind: "text",
                done: 0,
                total: copts.samples,
            });
            let dir = engine.checkpoint().dir().to_path_buf();
            let tok = Tokenizer::from_model_dir(&dir)?.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} has no tokenizer.json to tokenize --calib text",
                    dir.display()
                ))
            })?;
            let c = calib::from_text(&tok, paths, copts)?;
            progress(&Event::Calibrating {
                kind: "text",
                done: copts.samples,
                total: copts.samples,
            });
            Ok(c)
        }
        CalibSource::SelfGenerated => calib::self_generated(engine, copts, &mut |d, t| {
            progress(&Event::Calibrating {
                kind: "self",
                done: d,
                total: t,
            })
        }),
    }
}

/// The decoder layers shard `i` of `n` compresses: a contiguous, balanced range.
pub fn shard_layers(layers: usize, i: usize, n: usize) -> std::ops::Range<usize> {
    (i * layers / n)..((i + 1) * layers / n)
}

/// What a work directory's job depends on, by name.
fn job_inputs(
    gpu: &Gpu,
    opts: &CompressOptions,
    source_sha256: &str,
    hessians: Option<&str>,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut m = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    // Different adapters and backends round differently: layers of one job come from one.
    let r = gpu.report();
    put(
        "adapter",
        format!(
            "{} ({}, driver {} {})",
            r.name, r.backend, r.driver, r.driver_info
        ),
    );
    put("pumice", env!("CARGO_PKG_VERSION").into());
    put("source_sha256", source_sha256.into());
    put("method", format!("{:?}", opts.method));
    put("grid", format!("{:?}", opts.grid));
    put("gptq", format!("{:?}", opts.gptq));
    put("caldera", format!("{:?}", opts.caldera));
    put("rht", opts.rht.to_string());
    put("sparsity", format!("{:?}", opts.sparsity));
    put("layers", format!("{:?}", opts.layers));
    put(
        "allocation",
        opts.allocation
            .as_ref()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "none".into()),
    );
    put("seed", opts.calib.seed.to_string());
    match hessians {
        Some(id) => put("calibration", format!("saved Hessians {id}")),
        None => {
            let what = match &opts.calib_source {
                CalibSource::SelfGenerated => "self-generated".to_string(),
                CalibSource::Text(paths) => {
                    let files = calib::expand_paths(paths)?;
                    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
                    format!(
                        "text sha256 {}, newlines {:?}",
                        sha256_files(&refs)?,
                        opts.calib.newlines
                    )
                }
            };
            put(
                "calibration",
                format!(
                    "{what}, {} sequences of {} tokens",
                    opts.calib.samples, opts.calib.len
                ),
            );
        }
    }
    Ok(m)
}

/// Compress `ck` into `opts.output` — or, with `opts.shard`, compress that shard's layers into
/// `opts.work_dir` for [`merge`].
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
    let nlayers = ck.arch().layers.len();
    for l in 0..nlayers {
        let r = opts.recipe(l);
        if r.sparsity != Sparsity::Dense
            && (r.method != Method::Gptq || opts.gptq.act_order || opts.gptq.block > 128)
        {
            return Err(Error::InvalidArgument(
                "pruning (--sparsity) works with --method gptq, without --act-order".into(),
            ));
        }
    }
    let todo = match opts.shard {
        Some((i, n)) => {
            if opts.work_dir.is_none() || opts.hessians.is_none() {
                return Err(Error::InvalidArgument(
                    "a shard (--shard I/N) needs --hessians HDIR and --work-dir DIR".into(),
                ));
            }
            if n == 0 || i >= n {
                return Err(Error::InvalidArgument(format!(
                    "shard {i}/{n}: the index must be below the count (0-based)"
                )));
            }
            shard_layers(nlayers, i, n)
        }
        None => {
            let mut inputs: Vec<(&str, &Path)> = Vec::new();
            if let Some(w) = &opts.work_dir {
                inputs.push(("work directory", w));
            }
            if let Some(h) = &opts.hessians {
                inputs.push(("Hessian directory", h));
            }
            check_output_apart(&opts.output, &inputs)?;
            check_output(ck, &opts.output, opts.force)?;
            0..nlayers
        }
    };
    let cfg = ck.config().clone();
    let len = opts.calib.len.min(cfg.max_position_embeddings).max(2);
    let copts = CalibOptions {
        len,
        ..opts.calib.clone()
    };
    let source = source_info(ck)?;
    let hessians = match &opts.hessians {
        Some(d) => {
            let (info, id) = HessiansInfo::read(d)?;
            if info.source.sha256 != source.sha256 || info.layers != nlayers {
                return Err(Error::work_dir(
                    d,
                    format!(
                        "holds the Hessians of another model ({}, sha256 {}…), not of {}",
                        info.source.path,
                        &info.source.sha256[..12.min(info.source.sha256.len())],
                        ck.dir().display()
                    ),
                ));
            }
            Some((d.clone(), info, id))
        }
        None => None,
    };
    // What a work directory's job depends on (only needed with one: hashing the calibration
    // text is not free).
    let inputs = match &opts.work_dir {
        Some(_) => job_inputs(
            gpu,
            opts,
            &source.sha256,
            hessians.as_ref().map(|h| h.2.as_str()),
        )?,
        None => Default::default(),
    };
    let fp = fingerprint(&inputs);
    let mut job = None;
    if let Some(wd) = &opts.work_dir {
        if wd.exists() && !wd.is_dir() {
            return Err(Error::work_dir(wd, "is not a directory"));
        }
        std::fs::create_dir_all(wd).map_err(|e| Error::io(wd, e))?;
        if let Some(j) = Job::read(wd)? {
            check_inputs(wd, &j.inputs, &inputs)?;
            if !opts.resume && opts.shard.is_none() {
                return Err(Error::work_dir(
                    wd,
                    "holds a started job; pass --resume to continue it, or remove the directory",
                ));
            }
            job = Some(j);
        }
    }

    let mut engine = streaming_engine(gpu, ck, len)?;
    // Starting point: saved Hessians, saved activations, or a fresh calibration.
    let mut xs: Vec<GpuMatrix> = Vec::new();
    let mut pos = None;
    let mut first = todo.start;
    let calib_info = match (&hessians, &opts.work_dir) {
        (Some((_, info, _)), _) => info.calibration.clone(),
        (None, wd) => {
            let saved = match (wd, &job) {
                (Some(wd), Some(_)) => Activations::read(wd, &fp)?,
                _ => None,
            };
            match (saved, &job) {
                (Some(a), Some(j)) => {
                    if a.len != len || a.cols != cfg.hidden_size {
                        return Err(Error::work_dir(
                            wd.as_ref().expect("saved activations come from a work dir"),
                            "saved activations do not fit this model",
                        ));
                    }
                    let most = a.batches.iter().map(|(r, _)| *r).max().unwrap_or(len);
                    for (rows, v) in &a.batches {
                        xs.push(GpuMatrix::from_f32_grouped(gpu, *rows, a.cols, len, v)?);
                    }
                    let positions: Vec<u32> = (0..most).map(|r| (r % len) as u32).collect();
                    pos = Some(ops::upload_u32(gpu, &positions)?);
                    first = a.layers_done;
                    progress(&Event::Note(format!(
                        "resuming: {first} of {nlayers} layers already done"
                    )));
                    j.calibration.clone()
                }
                _ => {
                    let c = calibrate(&mut engine, &opts.calib_source, &copts, progress)?;
                    let b = calibration_batches(&engine, &c.tokens, len)?;
                    xs = b.xs;
                    pos = Some(b.pos);
                    c.info
                }
            }
        }
    };
    let base = ManifestBase {
        source,
        method: manifest_method(opts),
        params: manifest_params(opts),
        calibration: calib_info,
        allocation: opts.allocation.clone(),
    };
    if let (Some(wd), None) = (&opts.work_dir, &job) {
        Job::new(
            inputs.clone(),
            nlayers,
            base.source.clone(),
            base.method.clone(),
            base.params.clone(),
            base.calibration.clone(),
            base.allocation.clone(),
        )
        .write(wd)?;
    }

    // Without a work directory, layers stream straight into the output.
    let mut direct = match &opts.work_dir {
        None => Some(OutputWriter::begin(ck, &opts.output, plan(ck, opts)?)?),
        Some(_) => None,
    };
    let empty_pos;
    let pos_ref = match &pos {
        Some(p) => p,
        None => {
            empty_pos = ops::upload_u32(gpu, &[0])?;
            &empty_pos
        }
    };
    let shared = LayerShared {
        gpu,
        ck,
        gptq: opts.gptq,
        rht: opts.rht,
        seed: opts.calib.seed,
        len,
        pos: pos_ref,
    };
    let total_matrices = todo.len() * 7;
    let mut done = 0;
    let mut layers = Vec::new();
    let mut shard_bits = 0u64;
    let mut shard_params = 0usize;
    for l in todo.clone() {
        if let Some(wd) = &opts.work_dir {
            let finished = if hessians.is_some() {
                layer_file(wd, l).exists()
            } else {
                l < first
            };
            if finished {
                let s = StoredLayer::read_header(wd, l, &fp)?;
                done += 7;
                shard_bits += s.entries.iter().map(|(_, e)| e.stored_bits).sum::<u64>();
                shard_params += s
                    .entries
                    .iter()
                    .map(|(_, e)| e.rows * e.cols)
                    .sum::<usize>();
                layers.push(LayerReport {
                    layer: l,
                    seconds: Some(s.seconds),
                    matrices: s.reports,
                });
                continue;
            }
        }
        let stopped = |e: Error| {
            match e {
            Error::Interrupted(_) => Error::Interrupted(match &opts.work_dir {
                Some(wd) => format!(
                    "stopped during layer {l}; finished layers are kept in {} (continue with --resume)",
                    wd.display()
                ),
                None => format!(
                    "stopped during layer {l}; nothing was written (--work-dir DIR makes a run resumable)"
                ),
            }),
            e => e,
        }
        };
        crate::interrupt::check("").map_err(stopped)?;
        let t0 = Instant::now();
        let recipe = opts.recipe(l);
        let input = match &hessians {
            Some((d, info, _)) => {
                LayerInput::Hessians(LayerHessians::read(d, l, &info.source.sha256)?)
            }
            None => LayerInput::Activations(&xs),
        };
        let result = compress_layer(
            &engine,
            &shared,
            l,
            &recipe,
            input,
            &mut done,
            total_matrices,
            progress,
        )
        .map_err(stopped)?;
        let seconds = t0.elapsed().as_secs_f64();
        let stored = result.into_stored(l, seconds)?;
        ck.release_layer(l);
        shard_bits += stored
            .entries
            .iter()
            .map(|(_, e)| e.stored_bits)
            .sum::<u64>();
        shard_params += stored
            .entries
            .iter()
            .map(|(_, e)| e.rows * e.cols)
            .sum::<usize>();
        match (&opts.work_dir, &mut direct) {
            (Some(wd), _) => {
                stored.write(wd, &fp)?;
                if hessians.is_none() {
                    let batches = xs
                        .iter()
                        .map(|x| Ok((x.rows(), x.to_f32(gpu)?)))
                        .collect::<Result<Vec<_>>>()?;
                    Activations {
                        layers_done: l + 1,
                        len,
                        cols: cfg.hidden_size,
                        batches,
                    }
                    .write(wd, &fp)?;
                }
            }
            (None, Some(w)) => w.layer(ck, &stored)?,
            (None, None) => unreachable!("direct output exists without a work dir"),
        }
        progress(&Event::Layer {
            layer: l,
            done: l + 1 - todo.start,
            total: todo.len(),
            seconds,
        });
        layers.push(LayerReport {
            layer: l,
            seconds: Some(seconds),
            matrices: stored.reports,
        });
    }
    drop(xs);

    if let (Some((i, n)), Some(wd)) = (opts.shard, &opts.work_dir) {
        return Ok(CompressSummary {
            output: wd.display().to_string(),
            method: base.method,
            source_bytes: ck.bytes_on_disk(),
            output_bytes: shard_bits / 8,
            parameters: shard_params,
            bits_per_parameter: shard_bits as f64 / shard_params.max(1) as f64,
            linear_bits_per_parameter: shard_bits as f64 / shard_params.max(1) as f64,
            seconds: start.elapsed().as_secs_f64(),
            calibration: base.calibration,
            layers,
            shard: Some(format!("{i}/{n}: layers {}..{}", todo.start, todo.end)),
            peak_rss_bytes: peak_rss_bytes(),
            peak_gpu_bytes: gpu.memory().peak_bytes,
        });
    }
    let w = match (direct, &opts.work_dir) {
        (Some(w), _) => w,
        (None, Some(wd)) => {
            let mut w = OutputWriter::begin(ck, &opts.output, plan(ck, opts)?)?;
            for l in 0..nlayers {
                w.layer(ck, &StoredLayer::read(wd, l, &fp)?)?;
            }
            w
        }
        (None, None) => unreachable!("one of the two outputs exists"),
    };
    progress(&Event::Writing);
    let manifest = w.finish(ck, &opts.output, base)?;
    Ok(CompressSummary {
        output: opts.output.display().to_string(),
        method: opts.method.name().into(),
        source_bytes: ck.bytes_on_disk(),
        output_bytes: manifest.files["model.safetensors"].bytes,
        parameters: manifest.total.parameters,
        bits_per_parameter: manifest.total.bits_per_parameter,
        linear_bits_per_parameter: manifest.linear.bits_per_parameter,
        seconds: start.elapsed().as_secs_f64(),
        calibration: manifest.calibration.clone().expect("written above"),
        layers,
        shard: None,
        peak_rss_bytes: peak_rss_bytes(),
        peak_gpu_bytes: gpu.memory().peak_bytes,
    })
}

/// Assemble the compressed checkpoint from a work directory whose layers are all finished
/// (by one run or by shards on several machines). `model` overrides the source path the job
/// recorded; the source must be the same model (checked by SHA-256).
pub fn merge(
    work_dir: &Path,
    model: Option<&Path>,
    output: &Path,
    force: bool,
    progress: &mut dyn FnMut(&Event),
) -> Result<CompressSummary> {
    let start = Instant::now();
    let job = Job::read(work_dir)?.ok_or_else(|| {
        Error::work_dir(
            work_dir,
            "is not a work directory (no job.json): run `pumice compress ... --work-dir` first",
        )
    })?;
    let src = model
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(&job.source.path));
    let ck = Checkpoint::open(&src)?;
    check_output_apart(output, &[("work directory", work_dir)])?;
    check_output(&ck, output, force)?;
    let nlayers = ck.arch().layers.len();
    if nlayers != job.layers {
        return Err(Error::work_dir(
            work_dir,
            format!(
                "the job has {} layers but {} has {nlayers}",
                job.layers,
                src.display()
            ),
        ));
    }
    let missing: Vec<String> = (0..nlayers)
        .filter(|&l| !layer_file(work_dir, l).exists())
        .map(|l| l.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::work_dir(
            work_dir,
            format!(
                "layers {} are not finished (their shards are still running or failed; rerun them with --resume)",
                missing.join(", ")
            ),
        ));
    }
    let source = source_info(&ck)?;
    if job.inputs.get("source_sha256") != Some(&source.sha256) {
        return Err(Error::work_dir(
            work_dir,
            format!(
                "was made from another model than {} (SHA-256 differs)",
                src.display()
            ),
        ));
    }
    let headers = (0..nlayers)
        .map(|l| StoredLayer::read_header(work_dir, l, &job.fingerprint))
        .collect::<Result<Vec<_>>>()?;
    let plan = plan_with(&ck, &mut |l, name, _, _| {
        let prefix = format!("{name}.");
        Ok(headers[l]
            .tensors
            .iter()
            .filter(|(m, _)| m.name.starts_with(&prefix))
            .map(|(m, _)| PlannedTensor {
                name: m.name.clone(),
                dtype: m.dtype.clone(),
                shape: m.shape.clone(),
                bytes: m.bytes,
            })
            .collect())
    })?;
    let mut w = OutputWriter::begin(&ck, output, plan)?;
    for l in 0..nlayers {
        w.layer(&ck, &StoredLayer::read(work_dir, l, &job.fingerprint)?)?;
        crate::interrupt::check("stopped while merging; nothing was written")?;
    }
    progress(&Event::Writing);
    let base = ManifestBase {
        source: job.source.clone(),
        method: job.method.clone(),
        params: job.params.clone(),
        calibration: job.calibration.clone(),
        allocation: job.allocation.clone(),
    };
    let manifest = w.finish(&ck, output, base)?;
    Ok(CompressSummary {
        output: output.display().to_string(),
        method: job.method.clone(),
        source_bytes: ck.bytes_on_disk(),
        output_bytes: manifest.files["model.safetensors"].bytes,
        parameters: manifest.total.parameters,
        bits_per_parameter: manifest.total.bits_per_parameter,
        linear_bits_per_parameter: manifest.linear.bits_per_parameter,
        seconds: start.elapsed().as_secs_f64(),
        calibration: job.calibration,
        layers: headers
            .into_iter()
            .map(|s| LayerReport {
                layer: s.layer,
                seconds: Some(s.seconds),
                matrices: s.reports,
            })
            .collect(),
        shard: None,
        peak_rss_bytes: peak_rss_bytes(),
        peak_gpu_bytes: 0,
    })
}

/// What `pumice hessians` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct HessiansSummary {
    pub output: String,
    pub layers: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub calibration: CalibInfo,
}

/// The calibration pass alone: every layer's Hessians from the *original* model's activations,
/// saved in `out` (for `compress --hessians`, which can then run layers on separate machines).
pub fn collect_hessians(
    gpu: &Gpu,
    ck: &Checkpoint,
    source: &CalibSource,
    calib_opts: &CalibOptions,
    out: &Path,
    force: bool,
    progress: &mut dyn FnMut(&Event),
) -> Result<HessiansSummary> {
    let start = Instant::now();
    if ck.manifest().is_some() {
        return Err(Error::InvalidArgument(format!(
            "{} is a compressed checkpoint; collect Hessians of the original model",
            ck.dir().display()
        )));
    }
    check_output(ck, out, force)?;
    let len = calib_opts
        .len
        .min(ck.config().max_position_embeddings)
        .max(2);
    let copts = CalibOptions {
        len,
        ..calib_opts.clone()
    };
    let info = source_info(ck)?;
    let mut engine = streaming_engine(gpu, ck, len)?;
    let c = calibrate(&mut engine, source, &copts, progress)?;
    let CalibBatches { xs, pos, .. } = calibration_batches(&engine, &c.tokens, len)?;
    let tmp = begin_output_dir(out)?;
    let nlayers = ck.arch().layers.len();
    let mut bytes = 0u64;
    for l in 0..nlayers {
        let t0 = Instant::now();
        let spec = &ck.arch().layers[l];
        let mut w = engine.read_layer(l)?;
        let mut lh = LayerHessians::default();
        run_layer_stages(&engine, &mut w, &xs, len, &pos, &mut |kinds, inputs, _| {
            let lin = spec.linear(kinds[0]);
            let n = lin.in_features;
            lh.groups
                .push((lin.kind.input(), n, accumulate_hessian(gpu, n, inputs)?));
            Ok(())
        })?;
        lh.write(&tmp.path, l, &info.sha256)?;
        ck.release_layer(l);
        bytes += std::fs::metadata(hessian_file(&tmp.path, l))
            .map(|m| m.len())
            .unwrap_or(0);
        crate::interrupt::check("stopped while collecting Hessians; nothing was written")?;
        progress(&Event::Layer {
            layer: l,
            done: l + 1,
            total: nlayers,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    HessiansInfo::new(info, c.info.clone(), nlayers).write(&tmp.path)?;
    commit_output_dir(tmp, out)?;
    Ok(HessiansSummary {
        output: out.display().to_string(),
        layers: nlayers,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
        calibration: c.info,
    })
}
