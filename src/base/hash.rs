//! SHA-256 helpers (identities of models, jobs and Hessian directories; file checksums).

use std::path::Path;

use sha2::Digest;

use crate::{Error, Result};

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// SHA-256 of files, concatenated in the given order.
pub fn sha256_files(paths: &[&Path]) -> Result<String> {
    let mut h = sha2::Sha256::new();
    for p in paths {
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        std::io::copy(&mut f, &mut h).map_err(|e| Error::io(p, e))?;
    }
    Ok(format!("{:x}", h.finalize()))
}
