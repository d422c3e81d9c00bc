//! Checks made before any GPU work: whether a finished layer read from a work directory fits
//! the model (where the output may go: `base::outdir`).

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::Checkpoint;

use crate::compress::workdir::{layer_file, StoredLayer};

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
