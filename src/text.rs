//! Reading text inputs (evaluation text, calibration files, prompts) the way the Python
//! ecosystem reads them.
//!
//! transformers-based evaluations, lm-eval and the reference numbers open text in Python's text
//! mode: UTF-8, with universal newlines, so "\r\n" and a lone "\r" both become "\n". pumice
//! does the same by default ([`Newlines::Universal`]); [`Newlines::Keep`] tokenizes the text as
//! its bytes are (llama.cpp's way). WikiText-2's test file has 2,891 CRLF line endings: read
//! raw it gives 2,891 more tokens and a 1.7 % different perplexity.

use std::borrow::Cow;
use std::path::Path;

use crate::error::{Error, Result};

/// How line endings of text inputs are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Newlines {
    /// "\r\n" and lone "\r" become "\n" (Python's text mode; the default).
    #[default]
    Universal,
    /// Bytes as they are (llama.cpp tokenizes files this way).
    Keep,
}

/// "\r\n" and lone "\r" turned into "\n", as Python's universal newlines do.
pub fn universal_newlines(s: &str) -> Cow<'_, str> {
    if !s.contains('\r') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' {
            if chars.peek() == Some(&'\n') {
                chars.next();
            }
            out.push('\n');
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Apply `mode` to a text already in memory (a prompt).
pub fn normalize(s: &str, mode: Newlines) -> Cow<'_, str> {
    match mode {
        Newlines::Universal => universal_newlines(s),
        Newlines::Keep => Cow::Borrowed(s),
    }
}

/// Read a text input file as UTF-8 with `mode` applied. A missing, unreadable or non-UTF-8
/// file is bad input ([`Error::Input`], exit code 2), named in the message.
pub fn read_text(path: &Path, mode: Newlines) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::input(path, e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::input(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    Ok(match normalize(&text, mode) {
        Cow::Borrowed(_) => text,
        Cow::Owned(s) => s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_lone_cr_become_lf() {
        assert_eq!(universal_newlines("a\r\nb\rc\n\r\n\r"), "a\nb\nc\n\n\n");
        assert_eq!(universal_newlines("\r\r\n"), "\n\n");
        assert_eq!(universal_newlines("plain\ntext"), "plain\ntext");
        assert_eq!(normalize("x\r\ny", Newlines::Keep), "x\r\ny");
    }
}
