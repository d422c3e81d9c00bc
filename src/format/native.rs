//! The native pumice checkpoint (`model::compressed`): every compressed weight stored as the
//! parts its manifest entry lists (`QuantEntry::stored_parts`), everything else copied from the
//! source, the manifest `pumice.json`, the source's config and tokenizer files. Streamed: the
//! safetensors header is planned from the entries before the first layer arrives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::base::atomic::write_atomic;
use crate::error::{Error, Result};
use crate::model::compressed::{
    sha256_files, Accounting, FileInfo, LayerReport, Manifest, PlannedTensor, QuantEntry,
    StreamingWriter, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE,
};
use crate::model::Checkpoint;

use super::{hf, CompressedLayer, Format, FormatWriter, JobInfo, Planned, Written};

/// The pumice checkpoint format.
pub struct Native;

impl Format for Native {
    fn name(&self) -> &'static str {
        FORMAT_NAME
    }

    /// Every valid entry has a stored layout; an invalid one (a grid or pruning the format
    /// cannot describe) is refused naming the weight.
    fn check(&self, ck: &Checkpoint, planned: &Planned) -> Result<()> {
        super::check_each(ck, planned, "the pumice format", |_| None)
    }

    fn begin(
        &self,
        ck: &Checkpoint,
        dir: &Path,
        _target: &Path,
        planned: &Planned,
    ) -> Result<Box<dyn FormatWriter>> {
        Ok(Box::new(NativeWriter::begin(ck, dir, plan(ck, planned)?)?))
    }
}

/// Every stored tensor in the checkpoint's order: a compressed weight as its planned entry's
/// parts, anything else as in the source.
pub(crate) fn plan(ck: &Checkpoint, planned: &Planned) -> Result<Vec<PlannedTensor>> {
    let entries: std::collections::HashMap<&str, &QuantEntry> = planned
        .iter()
        .flatten()
        .map(|(n, e)| (n.as_str(), e))
        .collect();
    hf::plan_model(ck, |weight, _, _| {
        let e = entries
            .get(weight)
            .ok_or_else(|| Error::tensor(ck.dir(), weight, "has no planned entry"))?;
        let parts = e
            .stored_parts()
            .map_err(|msg| Error::tensor(ck.dir(), weight, msg))?;
        parts
            .into_iter()
            .map(|p| {
                let bytes = p
                    .bytes()
                    .ok_or_else(|| Error::tensor(ck.dir(), weight, "stored size overflows"))?;
                Ok(PlannedTensor {
                    name: p.name(weight),
                    dtype: p.dtype.into(),
                    shape: p.shape,
                    bytes,
                })
            })
            .collect()
    })
}

/// Streams a compressed checkpoint into a directory, layer by layer.
struct NativeWriter {
    dir: PathBuf,
    st_path: PathBuf,
    writer: StreamingWriter,
    entries: BTreeMap<String, QuantEntry>,
    layers: Vec<LayerReport>,
}

impl NativeWriter {
    fn begin(ck: &Checkpoint, dir: &Path, plan: Vec<PlannedTensor>) -> Result<NativeWriter> {
        let st_path = dir.join("model.safetensors");
        let mut writer = StreamingWriter::create(&st_path, plan)?;
        hf::copy_plain(&mut writer, ck, &ck.arch().embed_tokens.name)?;
        Ok(NativeWriter {
            dir: dir.to_path_buf(),
            st_path,
            writer,
            entries: Default::default(),
            layers: Vec::new(),
        })
    }
}

impl FormatWriter for NativeWriter {
    /// The layer's tensors in checkpoint order.
    fn layer(&mut self, ck: &Checkpoint, s: &CompressedLayer) -> Result<()> {
        let spec = &ck.arch().layers[s.layer];
        for t in spec.tensors() {
            if spec.linears.iter().any(|lin| lin.weight.name == t.name) {
                let m = s
                    .matrices
                    .iter()
                    .find(|m| m.weight == t.name)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "{}: missing from compressed layer {}",
                            t.name, s.layer
                        ))
                    })?;
                for (p, bytes) in m.parts()? {
                    self.writer.write(&p.name(&m.weight), bytes)?;
                }
            } else {
                hf::copy_plain(&mut self.writer, ck, &t.name)?;
            }
        }
        self.entries.extend(
            s.matrices
                .iter()
                .map(|m| (m.weight.clone(), m.entry.clone())),
        );
        let mut matrices = s.reports.clone();
        // Keep the manifest's layer order as the model's.
        matrices.sort_by_key(|r| spec.linears.iter().position(|l| l.weight.name == r.name));
        self.layers.push(LayerReport {
            layer: s.layer,
            seconds: None,
            device: s.device.clone(),
            matrices,
        });
        Ok(())
    }

    /// Final norm, LM head, side files, manifest.
    fn finish(mut self: Box<Self>, ck: &Checkpoint, job: JobInfo) -> Result<Written> {
        hf::copy_tail(&mut self.writer, ck, None)?;
        let NativeWriter {
            dir,
            st_path,
            writer,
            entries,
            layers,
        } = *self;
        writer.finish()?;
        hf::copy_side_files(ck, &dir, true)?;
        let out_bytes = std::fs::metadata(&st_path)
            .map_err(|e| Error::io(&st_path, e))?
            .len();
        // Exits a fine-tune wrote into the directory count in the size and are checksummed.
        let exits_path = dir.join(crate::model::exits::EXITS_FILE);
        let exits = match std::fs::metadata(&exits_path) {
            Ok(m) => Some((m.len(), sha256_files(&[exits_path.as_path()])?)),
            Err(_) => None,
        };
        let linear_params: usize = entries.values().map(|e| e.rows * e.cols).sum();
        let linear_bits: u64 = entries.values().map(|e| e.stored_bits).sum();
        let parameters = job.source.parameters;
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            created_by: format!("pumice {}", env!("CARGO_PKG_VERSION")),
            source: job.source,
            method: job.method,
            params: job.params,
            calibration: job.calibration,
            tensors: entries,
            linear: Accounting::new(linear_params, linear_bits),
            total: Accounting::new(
                parameters,
                (out_bytes + exits.as_ref().map_or(0, |e| e.0)) * 8,
            ),
            layers,
            files: [(
                "model.safetensors".to_string(),
                FileInfo {
                    bytes: out_bytes,
                    sha256: sha256_files(&[st_path.as_path()])?,
                },
            )]
            .into_iter()
            .chain(exits.map(|(bytes, sha256)| {
                (
                    crate::model::exits::EXITS_FILE.to_string(),
                    FileInfo { bytes, sha256 },
                )
            }))
            .collect(),
            allocation: job.allocation,
        };
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
        write_atomic(&dir.join(MANIFEST_FILE), &[text.as_bytes()])?;
        Ok(Written {
            files: manifest
                .files
                .iter()
                .map(|(n, f)| (n.clone(), f.bytes))
                .collect(),
            total: manifest.total,
            linear: manifest.linear,
        })
    }
}

/// Layer `l` of a native compressed checkpoint, read back into the format-neutral form (every
/// linear weight's parts found by its manifest entry's layout), for export to another format.
pub fn read_layer(ck: &Checkpoint, l: usize) -> Result<CompressedLayer> {
    let manifest = ck.manifest().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} is not a pumice-compressed checkpoint (no {MANIFEST_FILE})",
            ck.dir().display()
        ))
    })?;
    let spec = &ck.arch().layers[l];
    let mut matrices = Vec::with_capacity(spec.linears.len());
    for lin in &spec.linears {
        let weight = &lin.weight.name;
        let entry = ck.quantized(weight).ok_or_else(|| {
            Error::tensor(
                ck.dir().join(MANIFEST_FILE),
                weight,
                "is not compressed (export needs every linear weight compressed)",
            )
        })?;
        let parts = entry
            .stored_parts()
            .map_err(|msg| Error::tensor(ck.dir().join(MANIFEST_FILE), weight, msg))?;
        let mut blobs = Vec::with_capacity(parts.len());
        for p in parts {
            let (bytes, _, _) = ck.raw(&p.name(weight))?;
            blobs.push((p, bytes.to_vec()));
        }
        matrices.push(super::CompressedMatrix {
            weight: weight.clone(),
            data: super::PackedMatrix::from_parts(entry, blobs),
            entry: entry.clone(),
        });
    }
    let report = manifest.layers.iter().find(|r| r.layer == l);
    let reports = report.map(|r| r.matrices.clone()).unwrap_or_default();
    Ok(CompressedLayer {
        layer: l,
        seconds: 0.0,
        device: report.and_then(|r| r.device.clone()),
        matrices,
        reports,
    })
}

/// The entries of a native checkpoint's linear weights, layer by layer (what it was planned
/// as, now known).
pub fn entries(ck: &Checkpoint) -> Result<Vec<Vec<(String, QuantEntry)>>> {
    ck.arch()
        .layers
        .iter()
        .map(|spec| {
            spec.linears
                .iter()
                .map(|lin| {
                    let e = ck.quantized(&lin.weight.name).ok_or_else(|| {
                        Error::tensor(
                            ck.dir().join(MANIFEST_FILE),
                            &lin.weight.name,
                            "is not compressed (export needs every linear weight compressed)",
                        )
                    })?;
                    Ok((lin.weight.name.clone(), e.clone()))
                })
                .collect()
        })
        .collect()
}
