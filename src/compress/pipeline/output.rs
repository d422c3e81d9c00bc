//! What the output says about the job: the source's identity, the method and its parameters
//! (handed to the format as `format::JobInfo`), and the run's peak memory.

use std::path::Path;

use crate::error::Result;
use crate::model::compressed::{sha256_files, SourceInfo};
use crate::model::Checkpoint;

use super::options::*;

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
        "grid": opts.grid.kind.name(),
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
            "patience": opts.caldera.patience,
            "lr_clip": opts.caldera.clip,
        })),
    })
}
