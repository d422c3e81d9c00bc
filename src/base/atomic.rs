//! Atomic file writes: a file that exists is complete. Every file pumice writes outside an
//! output directory (work-directory files, Hessian descriptions, measurement files, reports)
//! goes through [`write_atomic`]; output directories have their own move ([`super::outdir`]).

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Write `parts` (concatenated) to `path` atomically: a temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique across processes and machines sharing the directory (shards on a cluster).
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{nonce}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        for p in parts {
            w.write_all(p)?;
        }
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
