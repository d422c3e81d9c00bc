//! tokenizer.json through the `tokenizers` crate.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A loaded tokenizer. Encoding never adds special tokens (the evaluation protocol).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({})", self.path.display())
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// The model directory's tokenizer.json, or `None` when it has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let p = dir.join(TOKENIZER_FILE);
        if p.is_file() {
            Self::from_file(&p).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }
}
