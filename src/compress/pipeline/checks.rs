//! Checks made before any GPU work: where the output may go, and whether a finished layer
//! read from a work directory fits the model.

use std::path::{Path, PathBuf};

use crate::base::outdir;

use crate::error::{Error, Result};
use crate::model::Checkpoint;

use crate::compress::workdir::{layer_file, StoredLayer};

/// `path` made absolute without requiring it to exist: its deepest existing ancestor
/// canonicalized, the rest appended.
pub(crate) fn resolved(path: &Path) -> Option<PathBuf> {
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
pub(crate) fn check_output_apart(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
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

pub(crate) fn check_output(ck: &Checkpoint, out: &Path, force: bool) -> Result<()> {
    let input = std::fs::canonicalize(ck.dir()).map_err(|e| Error::io(ck.dir(), e))?;
    outdir::recover(out);
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

/// Check a finished layer read from a work directory against the model: one valid manifest
/// entry per linear weight, of the weight's shape, and exactly the tensors that entry implies
/// (names, dtypes, shapes, byte counts). What `merge` writes must be a checkpoint pumice loads.
pub(crate) fn check_stored_layer(ck: &Checkpoint, dir: &Path, s: &StoredLayer) -> Result<()> {
    let path = layer_file(dir, s.layer);
    let spec = ck.arch().layers.get(s.layer).ok_or_else(|| {
        Error::work_dir(&path, format!("holds layer {}, beyond the model", s.layer))
    })?;
    let mut expected: Vec<(String, crate::model::compressed::StoredPart)> = Vec::new();
    for (name, e) in &s.entries {
        let bad = |msg: String| Error::tensor(&path, name, msg);
        let Some(lin) = spec.linears.iter().find(|l| &l.weight.name == name) else {
            return Err(bad(format!(
                "is not a linear weight of layer {} of this model",
                s.layer
            )));
        };
        if [e.rows, e.cols] != [lin.out_features, lin.in_features] {
            return Err(bad(format!(
                "entry shape [{}, {}], the model has [{}, {}]",
                e.rows, e.cols, lin.out_features, lin.in_features
            )));
        }
        let parts = e.check().map_err(&bad)?;
        expected.extend(parts.into_iter().map(|p| (p.name(name), p)));
    }
    for lin in &spec.linears {
        let n = s
            .entries
            .iter()
            .filter(|(n, _)| n == &lin.weight.name)
            .count();
        if n != 1 {
            return Err(Error::tensor(
                &path,
                &lin.weight.name,
                format!("has {n} manifest entries in this layer file, not 1"),
            ));
        }
    }
    if s.tensors.len() != expected.len() {
        return Err(Error::work_dir(
            &path,
            format!(
                "stores {} tensors, its entries imply {}",
                s.tensors.len(),
                expected.len()
            ),
        ));
    }
    for m in &s.tensors {
        let Some((_, p)) = expected.iter().find(|(n, _)| n == &m.name) else {
            return Err(Error::tensor(
                &path,
                &m.name,
                "is not implied by the layer's entries",
            ));
        };
        let (dt, shape) = (p.dtype, &p.shape);
        if m.dtype != dt || &m.shape != shape || p.bytes() != Some(m.bytes) {
            return Err(Error::tensor(
                &path,
                &m.name,
                format!(
                    "is {} {:?} ({} bytes), its entry implies {dt} {shape:?}",
                    m.dtype, m.shape, m.bytes
                ),
            ));
        }
    }
    Ok(())
}
