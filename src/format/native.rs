//! The native pumice checkpoint (`model::compressed`): every compressed weight stored as the
//! parts its manifest entry lists (`QuantEntry::stored_parts`), everything else copied from the
//! source, the manifest `pumice.json`, the source's config and tokenizer files. Streamed: the
//! safetensors header is planned from the entries before the first layer arrives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::base::atomic::write_atomic;
use crate::base::outdir;
use crate::error::{Error, Result};
use crate::model::compressed::{
    sha256_files, Accounting, FileInfo, LayerReport, Manifest, PlannedTensor, QuantEntry,
    StreamingWriter, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE,
};
use crate::model::Checkpoint;

use super::{CompressedLayer, Format, FormatWriter, JobInfo, Planned, Written};

/// Files copied from the source directory beside the weights.
pub(crate) const SIDE_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// The pumice checkpoint format.
pub struct Native;

impl Format for Native {
    fn name(&self) -> &'static str {
        FORMAT_NAME
    }

    /// Every valid entry has a stored layout; an invalid one (a grid or pruning the format
    /// cannot describe) is refused naming the weight.
    fn check(&self, ck: &Checkpoint, planned: &Planned) -> Result<()> {
        for (name, e) in planned.iter().flatten() {
            e.stored_parts().map_err(|msg| {
                Error::tensor(
                    ck.dir(),
                    name,
                    format!("the pumice format cannot store this recipe: {msg}"),
                )
            })?;
        }
        Ok(())
    }

    fn begin(
        &self,
        ck: &Checkpoint,
        out: &Path,
        force: bool,
        planned: &Planned,
    ) -> Result<Box<dyn FormatWriter>> {
        Ok(Box::new(NativeWriter::begin(
            ck,
            out,
            force,
            plan(ck, planned)?,
        )?))
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
    let mut out = Vec::new();
    for spec in ck.arch().tensors() {
        if let Some(e) = entries.get(spec.name.as_str()) {
            let parts = e
                .stored_parts()
                .map_err(|msg| Error::tensor(ck.dir(), &spec.name, msg))?;
            for p in parts {
                let bytes = p
                    .bytes()
                    .ok_or_else(|| Error::tensor(ck.dir(), &spec.name, "stored size overflows"))?;
                out.push(PlannedTensor {
                    name: p.name(&spec.name),
                    dtype: p.dtype.into(),
                    shape: p.shape,
                    bytes,
                });
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

fn copy_plain(wr: &mut StreamingWriter, ck: &Checkpoint, name: &str) -> Result<()> {
    let t = ck.tensor(name)?;
    wr.write(name, t.bytes)?;
    ck.release(name);
    Ok(())
}

/// Streams a compressed checkpoint into a temporary directory, layer by layer, and renames it
/// into place when complete.
struct NativeWriter {
    tmp: outdir::TempDir,
    out: PathBuf,
    force: bool,
    st_path: PathBuf,
    writer: StreamingWriter,
    entries: BTreeMap<String, QuantEntry>,
    layers: Vec<LayerReport>,
}

impl NativeWriter {
    fn begin(
        ck: &Checkpoint,
        out: &Path,
        force: bool,
        plan: Vec<PlannedTensor>,
    ) -> Result<NativeWriter> {
        let tmp = outdir::begin(out)?;
        let st_path = tmp.path.join("model.safetensors");
        let mut writer = StreamingWriter::create(&st_path, plan)?;
        copy_plain(&mut writer, ck, &ck.arch().embed_tokens.name)?;
        Ok(NativeWriter {
            tmp,
            out: out.to_path_buf(),
            force,
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
                copy_plain(&mut self.writer, ck, &t.name)?;
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
            matrices,
        });
        Ok(())
    }

    /// Final norm, LM head, side files, manifest; then rename into place.
    fn finish(mut self: Box<Self>, ck: &Checkpoint, job: JobInfo) -> Result<Written> {
        let arch = ck.arch();
        copy_plain(&mut self.writer, ck, &arch.final_norm.name)?;
        if let Some(h) = &arch.lm_head {
            copy_plain(&mut self.writer, ck, &h.name)?;
        }
        let NativeWriter {
            tmp,
            out,
            force,
            st_path,
            writer,
            entries,
            layers,
        } = *self;
        writer.finish()?;
        for f in SIDE_FILES {
            let src = ck.dir().join(f);
            if src.is_file() {
                std::fs::copy(&src, tmp.path.join(f)).map_err(|e| Error::io(&src, e))?;
            }
        }
        let out_bytes = std::fs::metadata(&st_path)
            .map_err(|e| Error::io(&st_path, e))?
            .len();
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
            calibration: Some(job.calibration),
            tensors: entries,
            linear: Accounting::new(linear_params, linear_bits),
            total: Accounting::new(parameters, out_bytes * 8),
            layers,
            files: [(
                "model.safetensors".to_string(),
                FileInfo {
                    bytes: out_bytes,
                    sha256: sha256_files(&[st_path.as_path()])?,
                },
            )]
            .into_iter()
            .collect(),
            allocation: job.allocation,
        };
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
        write_atomic(&tmp.path.join(MANIFEST_FILE), &[text.as_bytes()])?;
        outdir::commit(tmp, &out, force)?;
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
