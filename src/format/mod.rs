//! The format seam: where compressed layers leave the pipeline for a file format.
//!
//! The pipeline produces [`CompressedLayer`]s — for every linear weight its manifest entry
//! (method, grid, rank, pruning, rotation seeds) and its packed data by role (codes, scales,
//! zeros, mask, permutation, factors), with no stored tensor names — and hands them, in layer
//! order, to the [`FormatWriter`] a [`Format`] began. Before any GPU work the pipeline asks the
//! format to [`Format::check`] the planned entries, so a recipe a format cannot hold exactly is
//! refused up front, naming the tensor and the reason.
//!
//! Formats: [`native`] (the pumice checkpoint, `model::compressed`), [`dense`],
//! [`compressed_tensors`], [`gptq`], [`peft`], [`gguf`].
//!
//! Invariant: a format knows nothing of calibration, Hessians or GPUs; it receives finished
//! layers and what the job was ([`JobInfo`]), and writes into a directory its caller moves into
//! place whole (`base::outdir`).

pub mod compressed_tensors;
pub mod dense;
pub mod gguf;
pub mod gptq;
pub mod hf;
pub mod lora;
pub mod native;
pub mod peft;
pub mod weights;

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::compressed::{
    Accounting, CalibInfo, Factor, MatrixReport, PartKind, QuantEntry, SourceInfo, StoredPart,
};
use crate::model::Checkpoint;

/// One matrix's packed data (the backbone Q, or a CALDERA factor), by role: codes as
/// little-endian bit streams per row in u32 words, f16 scales and zero points per row and
/// group, the pruning mask, the act-order permutation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedMatrix {
    /// Codes, rows × words(kept) u32 words, as bytes.
    pub codes: Vec<u8>,
    /// f16 scales, rows × groups, as bytes (a k grid: each super-block's d, dmin).
    pub scales: Vec<u8>,
    /// f16 zero points (None for a grid whose zero is implied, and for k grids).
    pub zeros: Option<Vec<u8>>,
    /// A k grid's packed sub-block scales and minimums (u32 words per row, as bytes).
    pub subscales: Option<Vec<u8>>,
    /// Pruned: the kept-weight mask, rows × ⌈cols/32⌉ words.
    pub mask: Option<Vec<u32>>,
    /// Act-order: stored column j is original column perm[j] (u32 little-endian bytes).
    pub perm: Option<Vec<u8>>,
    /// Codes stored per row (cols when not pruned).
    pub kept: usize,
    /// CALDERA: the factors Lᵀ and R, each packed like a backbone.
    pub factors: Option<Box<(PackedMatrix, PackedMatrix)>>,
}

impl PackedMatrix {
    fn of(&self, factor: Factor) -> Option<&PackedMatrix> {
        match factor {
            Factor::Backbone => Some(self),
            Factor::L => self.factors.as_deref().map(|f| &f.0),
            Factor::R => self.factors.as_deref().map(|f| &f.1),
        }
    }

    /// The bytes of one stored part (None when this matrix has no such part).
    pub fn part(&self, p: &StoredPart) -> Option<&[u8]> {
        let m = self.of(p.factor)?;
        match p.kind {
            PartKind::Codes => Some(&m.codes),
            PartKind::Scales => Some(&m.scales),
            PartKind::Zeros => m.zeros.as_deref(),
            PartKind::SubScales => m.subscales.as_deref(),
            PartKind::Mask => m.mask.as_deref().map(bytemuck::cast_slice),
            PartKind::Perm => m.perm.as_deref(),
        }
    }

    /// Rebuild from the parts `entry.stored_parts()` lists and their bytes, in that order.
    pub fn from_parts(
        entry: &QuantEntry,
        parts: impl IntoIterator<Item = (StoredPart, Vec<u8>)>,
    ) -> PackedMatrix {
        let kept = if entry.sparsity.is_some() {
            entry.kept_per_row
        } else {
            entry.cols
        };
        let mut backbone = PackedMatrix {
            kept,
            ..Default::default()
        };
        let mut l = PackedMatrix {
            kept: entry.rows,
            ..Default::default()
        };
        let mut r = PackedMatrix {
            kept: entry.cols,
            ..Default::default()
        };
        for (p, bytes) in parts {
            let m = match p.factor {
                Factor::Backbone => &mut backbone,
                Factor::L => &mut l,
                Factor::R => &mut r,
            };
            match p.kind {
                PartKind::Codes => m.codes = bytes,
                PartKind::Scales => m.scales = bytes,
                PartKind::Zeros => m.zeros = Some(bytes),
                PartKind::SubScales => m.subscales = Some(bytes),
                PartKind::Mask => {
                    m.mask = Some(
                        bytes
                            .chunks_exact(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    )
                }
                PartKind::Perm => m.perm = Some(bytes),
            }
        }
        if entry.rank > 0 {
            backbone.factors = Some(Box::new((l, r)));
        }
        backbone
    }
}

/// One compressed linear weight, format-neutral.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedMatrix {
    /// The source weight it replaces (`model.layers.3.mlp.down_proj.weight`).
    pub weight: String,
    pub entry: QuantEntry,
    pub data: PackedMatrix,
}

impl CompressedMatrix {
    /// The stored parts with their bytes, checked against the entry's layout (every part
    /// present, of its size).
    pub fn parts(&self) -> Result<Vec<(StoredPart, &[u8])>> {
        let parts = self
            .entry
            .stored_parts()
            .map_err(|msg| Error::InvalidArgument(format!("{}: {msg}", self.weight)))?;
        parts
            .into_iter()
            .map(|p| {
                let bytes = self.data.part(&p).filter(|b| Some(b.len()) == p.bytes());
                match bytes {
                    Some(b) => Ok((p, b)),
                    None => Err(Error::Shape(format!(
                        "{}: packed data disagree with the entry's layout at {}",
                        self.weight,
                        p.suffix()
                    ))),
                }
            })
            .collect()
    }
}

/// One finished decoder layer.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedLayer {
    pub layer: usize,
    pub seconds: f64,
    /// The adapter that computed it ("name (backend)"), when known.
    pub device: Option<String>,
    pub matrices: Vec<CompressedMatrix>,
    /// Per-matrix errors, in the order the layer computed them.
    pub reports: Vec<MatrixReport>,
}

/// What the job was, for the output's own description of itself.
#[derive(Clone, Debug)]
pub struct JobInfo {
    pub source: SourceInfo,
    pub method: String,
    pub params: serde_json::Value,
    pub calibration: Option<CalibInfo>,
    pub allocation: Option<serde_json::Value>,
}

/// What a finished output holds.
#[derive(Clone, Debug)]
pub struct Written {
    /// Files written (name inside the output, bytes).
    pub files: Vec<(String, u64)>,
    /// All parameters and the bits stored for them.
    pub total: Accounting,
    /// The compressed linear weights alone.
    pub linear: Accounting,
}

impl Written {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b).sum()
    }
}

/// The planned entries of every layer's linear weights (stored_bits not yet known).
pub type Planned = [Vec<(String, QuantEntry)>];

/// Check every planned entry: valid on its own, and not refused by `refusal` (why the format
/// cannot hold it exactly); the error names the tensor and says "cannot be written to
/// {format} exactly: {why}".
pub(crate) fn check_each(
    ck: &Checkpoint,
    planned: &Planned,
    format: &str,
    refusal: impl Fn(&QuantEntry) -> Option<String>,
) -> Result<()> {
    for (name, e) in planned.iter().flatten() {
        let why = match e.stored_parts() {
            Err(msg) => Some(msg),
            Ok(_) => refusal(e),
        };
        if let Some(why) = why {
            return Err(Error::tensor(
                ck.dir(),
                name,
                format!("cannot be written to {format} exactly: {why}"),
            ));
        }
    }
    Ok(())
}

/// An output format.
pub trait Format {
    fn name(&self) -> &'static str;

    /// Refuse, before any GPU work, what this format cannot hold exactly (naming the tensor and
    /// the reason).
    fn check(&self, ck: &Checkpoint, planned: &Planned) -> Result<()>;

    /// Bits this format stores for one planned linear weight: its codes, scales, zero points
    /// and CALDERA's factors wherever the format puts them (an adapter file included). What an
    /// allocation (`compress --measurement --format F`) spends its budget in. Default: the
    /// pumice format's own layout.
    fn stored_bits(&self, e: &QuantEntry) -> u64 {
        e.expected_bits()
    }

    /// Start writing the output for `ck`'s compression as planned into `dir`, an empty
    /// directory the caller moves to `target` when [`FormatWriter::finish`] succeeds (layers
    /// arrive in order).
    fn begin(
        &self,
        ck: &Checkpoint,
        dir: &Path,
        target: &Path,
        planned: &Planned,
    ) -> Result<Box<dyn FormatWriter>>;
}

/// An output being written.
pub trait FormatWriter {
    /// The next decoder layer (layers arrive in order, every one exactly once).
    fn layer(&mut self, ck: &Checkpoint, layer: &CompressedLayer) -> Result<()>;

    /// Everything after the layers; every file complete and synced when this returns.
    fn finish(self: Box<Self>, ck: &Checkpoint, job: JobInfo) -> Result<Written>;
}

/// What `--dtype` asks a format to store floats in: a float dtype, or ggml's Q8_0 (a GGUF LoRA
/// adapter's factors only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreType {
    Float(crate::DType),
    Q8_0,
}

impl StoreType {
    pub fn name(&self) -> &'static str {
        match self {
            StoreType::Float(crate::DType::F32) => "f32",
            StoreType::Float(crate::DType::F16) => "f16",
            StoreType::Float(crate::DType::BF16) => "bf16",
            StoreType::Q8_0 => "q8_0",
        }
    }
}

/// The formats pumice writes, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatKind {
    /// The pumice checkpoint (`model::compressed`).
    Native,
    /// Plain weights in one dtype (L·R merged, rotations undone).
    Dense,
    /// compressed-tensors pack-quantized (+ a PEFT adapter for CALDERA's factors).
    CompressedTensors,
    /// CALDERA's factors alone, as a PEFT LoRA adapter.
    Peft,
    /// llama.cpp's GGUF (+ a GGUF LoRA adapter for CALDERA's factors).
    Gguf,
    /// GPTQ, `gptq_v2` checkpoint format (+ a PEFT adapter for CALDERA's factors).
    Gptq,
    /// GPTQ in the original `gptq` checkpoint format (zero points stored minus one).
    GptqV1,
}

impl FormatKind {
    pub const ALL: [FormatKind; 7] = [
        FormatKind::Native,
        FormatKind::Dense,
        FormatKind::CompressedTensors,
        FormatKind::Peft,
        FormatKind::Gguf,
        FormatKind::Gptq,
        FormatKind::GptqV1,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            FormatKind::Native => "pumice",
            FormatKind::Dense => "dense",
            FormatKind::CompressedTensors => "compressed-tensors",
            FormatKind::Peft => "peft",
            FormatKind::Gguf => "gguf",
            FormatKind::Gptq => "gptq",
            FormatKind::GptqV1 => "gptq-v1",
        }
    }

    pub fn parse(s: &str) -> Result<FormatKind> {
        FormatKind::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--format {s}: known formats are {}",
                    FormatKind::ALL.map(|f| f.name()).join(", ")
                ))
            })
    }

    /// The format, with `dtype` (`--dtype`) for what it stores in floats: a dense output's
    /// weights (default `model`, the source's dtype), a GGUF LoRA adapter's factors (default
    /// f32, exact; f16, bf16 or q8_0 round them). Q8_0 is refused for anything but a GGUF
    /// adapter.
    pub fn make(&self, dtype: Option<StoreType>, model: crate::DType) -> Result<Box<dyn Format>> {
        let float = |d: Option<StoreType>| match d {
            None => Ok(None),
            Some(StoreType::Float(d)) => Ok(Some(d)),
            Some(StoreType::Q8_0) => Err(Error::InvalidArgument(format!(
                "--dtype q8_0 is for a GGUF adapter's factors, not for --format {}",
                self.name()
            ))),
        };
        Ok(match self {
            FormatKind::Native => Box::new(native::Native),
            FormatKind::Dense => Box::new(dense::Dense {
                dtype: float(dtype)?.unwrap_or(model),
            }),
            FormatKind::CompressedTensors => Box::new(compressed_tensors::CompressedTensors),
            FormatKind::Peft => Box::new(peft::Peft),
            FormatKind::Gguf => Box::new(gguf::Gguf {
                linear: None,
                lora: dtype.unwrap_or(StoreType::Float(crate::DType::F32)),
                tuned: None,
            }),
            FormatKind::Gptq => Box::new(gptq::Gptq { v1: false }),
            FormatKind::GptqV1 => Box::new(gptq::Gptq { v1: true }),
        })
    }
}

/// An output being written: a format's writer filling a temporary sibling of `out`, moved into
/// place only when the writer has finished (`base::outdir`: never replacing without `force`).
pub struct Output {
    tmp: crate::base::outdir::TempDir,
    writer: Box<dyn FormatWriter>,
    out: std::path::PathBuf,
    force: bool,
}

impl Output {
    pub fn begin(
        format: &dyn Format,
        ck: &Checkpoint,
        out: &Path,
        force: bool,
        planned: &Planned,
    ) -> Result<Output> {
        let tmp = crate::base::outdir::begin(out)?;
        let writer = format.begin(ck, &tmp.path, out, planned)?;
        Ok(Output {
            tmp,
            writer,
            out: out.to_path_buf(),
            force,
        })
    }

    pub fn layer(&mut self, ck: &Checkpoint, layer: &CompressedLayer) -> Result<()> {
        self.writer.layer(ck, layer)
    }

    /// The temporary directory being filled (for files written beside the format's own).
    pub(crate) fn dir(&self) -> &Path {
        &self.tmp.path
    }

    pub fn finish(self, ck: &Checkpoint, job: JobInfo) -> Result<Written> {
        self.finish_then(ck, job, &mut |_| Ok(()))
    }

    /// [`Output::finish`], calling `before_commit` with the finished temporary directory just
    /// before it is moved into place (a job records what it is about to commit).
    pub(crate) fn finish_then(
        self,
        ck: &Checkpoint,
        job: JobInfo,
        before_commit: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<Written> {
        let written = self.writer.finish(ck, job)?;
        before_commit(&self.tmp.path)?;
        crate::base::outdir::commit(self.tmp, &self.out, self.force)?;
        Ok(written)
    }
}

/// Write a native compressed checkpoint `ck` in another format into `out` (nothing but the
/// checkpoint is read; no GPU). The format checks every weight before anything is written.
pub fn export(
    ck: &Checkpoint,
    format: &dyn Format,
    out: &Path,
    force: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Written> {
    let manifest = ck.manifest().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} is not a pumice-compressed checkpoint (no pumice.json); compress it first",
            ck.dir().display()
        ))
    })?;
    crate::base::outdir::check_output(ck.dir(), out, force)?;
    if ck.exits().is_some() {
        tracing::warn!(
            "{}: its exits ({}) are not exported (no other format holds them); vote with the \
             native checkpoint",
            ck.dir().display(),
            crate::model::exits::EXITS_FILE
        );
    }
    let planned = native::entries(ck)?;
    format.check(ck, &planned)?;
    let mut output = Output::begin(format, ck, out, force, &planned)?;
    let n = planned.len();
    for l in 0..n {
        output.layer(ck, &native::read_layer(ck, l)?)?;
        progress(l + 1, n);
        crate::interrupt::check("stopped while exporting; nothing was written")?;
    }
    output.finish(
        ck,
        JobInfo {
            source: manifest.source.clone(),
            method: manifest.method.clone(),
            params: manifest.params.clone(),
            calibration: manifest.calibration.clone(),
            allocation: manifest.allocation.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::quant::GridKind;

    fn entry(kind: GridKind, act_order: bool, rank: usize, sparse: bool) -> QuantEntry {
        let (rows, cols) = (7, 71);
        QuantEntry {
            method: "test".into(),
            bits: 3,
            group_size: 32,
            kind,
            act_order,
            rows,
            cols,
            stored_bits: 0,
            relative_error: None,
            damp: None,
            rank,
            lr_bits: if rank > 0 { 4 } else { 0 },
            lr_group_size: if rank > 0 { 32 } else { 0 },
            rht: None,
            sparsity: sparse.then(|| "2:4".to_string()),
            kept_per_row: if sparse { 36 } else { cols },
        }
    }

    /// Distinct bytes for every part, sized as the layout says.
    fn matrix(e: &QuantEntry) -> CompressedMatrix {
        let parts = e.stored_parts().unwrap();
        let mut seed = 1u8;
        let data = PackedMatrix::from_parts(
            e,
            parts.into_iter().map(|p| {
                seed = seed.wrapping_mul(31).wrapping_add(7);
                let n = p.bytes().unwrap();
                let bytes = (0..n).map(|i| seed.wrapping_add(i as u8)).collect();
                (p, bytes)
            }),
        );
        CompressedMatrix {
            weight: "model.layers.0.mlp.up_proj.weight".into(),
            entry: e.clone(),
            data,
        }
    }

    #[test]
    fn parts_round_trip_through_the_layout() {
        for e in [
            entry(GridKind::Asymmetric, false, 0, false),
            entry(GridKind::Midrise, true, 0, false),
            entry(GridKind::Symmetric, true, 0, false),
            entry(GridKind::Asymmetric, false, 3, false),
            entry(GridKind::Midrise, false, 2, false),
            entry(GridKind::Symmetric, false, 2, false),
            entry(GridKind::Asymmetric, false, 0, true),
        ] {
            let m = matrix(&e);
            let parts = m.parts().unwrap();
            assert_eq!(
                parts.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
                e.stored_parts().unwrap()
            );
            let back =
                PackedMatrix::from_parts(&e, parts.into_iter().map(|(p, b)| (p, b.to_vec())));
            assert_eq!(back, m.data, "{e:?}");
            assert_eq!(m.data.factors.is_some(), e.rank > 0);
            assert_eq!(m.data.zeros.is_some(), e.kind == GridKind::Asymmetric);
            assert_eq!(m.data.perm.is_some(), e.act_order);
            assert_eq!(m.data.mask.is_some(), e.sparsity.is_some());
            assert_eq!(m.data.kept, e.kept_per_row);
        }
    }

    #[test]
    fn data_that_disagree_with_the_entry_are_refused_by_part() {
        let e = entry(GridKind::Asymmetric, false, 2, false);
        let mut m = matrix(&e);
        m.data.zeros = None;
        let err = m.parts().unwrap_err().to_string();
        assert!(
            err.contains("up_proj.weight") && err.contains("at zeros"),
            "{err}"
        );
        let mut m = matrix(&e);
        m.data.factors.as_mut().unwrap().1.scales.pop();
        let err = m.parts().unwrap_err().to_string();
        assert!(err.contains("at R.scales"), "{err}");
        let mut m = matrix(&e);
        m.entry.bits = 9;
        assert!(m.parts().is_err());
    }

    #[test]
    fn part_names_are_the_native_suffixes() {
        let names: Vec<String> = entry(GridKind::Asymmetric, true, 1, false)
            .stored_parts()
            .unwrap()
            .iter()
            .map(|p| p.name("w"))
            .collect();
        assert_eq!(
            names,
            [
                "w.qweight",
                "w.scales",
                "w.zeros",
                "w.perm",
                "w.L.qweight",
                "w.L.scales",
                "w.L.zeros",
                "w.R.qweight",
                "w.R.scales",
                "w.R.zeros"
            ]
        );
    }
}
