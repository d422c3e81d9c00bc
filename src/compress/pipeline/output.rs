//! The compressed checkpoint being written: source identity, manifest pieces, and the
//! streaming writer that moves the finished directory into place.

use std::path::{Path, PathBuf};

use crate::compress::outdir;

use crate::error::{Error, Result};
use crate::model::compressed::{
    sha256_files, Accounting, CalibInfo, FileInfo, LayerReport, Manifest, PlannedTensor,
    QuantEntry, SourceInfo, StreamingWriter, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE,
};
use crate::model::Checkpoint;

use crate::compress::workdir::{write_atomic, StoredLayer};

use super::{layout::*, options::*};

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
pub(crate) struct ManifestBase {
    pub(crate) source: SourceInfo,
    pub(crate) method: String,
    pub(crate) params: serde_json::Value,
    pub(crate) calibration: CalibInfo,
    pub(crate) allocation: Option<serde_json::Value>,
}

pub(crate) fn manifest_method(opts: &CompressOptions) -> String {
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

pub(crate) fn manifest_params(opts: &CompressOptions) -> serde_json::Value {
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
pub(crate) struct OutputWriter {
    pub(crate) tmp: outdir::TempDir,
    pub(crate) force: bool,
    pub(crate) st_path: PathBuf,
    pub(crate) writer: StreamingWriter,
    pub(crate) entries: std::collections::BTreeMap<String, QuantEntry>,
    pub(crate) layers: Vec<LayerReport>,
}

impl OutputWriter {
    pub(crate) fn begin(
        ck: &Checkpoint,
        out: &Path,
        force: bool,
        plan: Vec<PlannedTensor>,
    ) -> Result<OutputWriter> {
        let tmp = outdir::begin(out)?;
        let st_path = tmp.path.join("model.safetensors");
        let mut writer = StreamingWriter::create(&st_path, plan)?;
        copy_plain(&mut writer, ck, &ck.arch().embed_tokens.name)?;
        Ok(OutputWriter {
            tmp,
            force,
            st_path,
            writer,
            entries: Default::default(),
            layers: Vec::new(),
        })
    }

    /// Write the next decoder layer's tensors in checkpoint order.
    pub(crate) fn layer(&mut self, ck: &Checkpoint, s: &StoredLayer) -> Result<()> {
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
    pub(crate) fn finish(
        mut self,
        ck: &Checkpoint,
        out: &Path,
        base: ManifestBase,
    ) -> Result<Manifest> {
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
        outdir::commit(self.tmp, out, self.force)?;
        Ok(manifest)
    }
}
