//! The library's single error type.
//!
//! Every variant renders as one line that names the file (or GPU object) involved and the cause,
//! so the binary can print `error: {e}` and exit. Messages coming from wgpu or other crates are
//! flattened to one line with [`one_line`].

use std::path::{Path, PathBuf};

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in pumice.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed at the OS level.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An input file named on the command line (text, token ids, calibration) is missing,
    /// unreadable or malformed: bad input, exit code 2.
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },

    /// A JSON file (config.json, a shard index, a safetensors header) could not be parsed.
    #[error("{}: not valid JSON: {}", path.display(), one_line(&source.to_string()))]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A model directory is missing, empty, or lacks the files a checkpoint needs.
    #[error("{}: {msg}", path.display())]
    ModelDir { path: PathBuf, msg: String },

    /// config.json is well-formed JSON but lacks a required field or holds a wrong value.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// The checkpoint's architecture is not one pumice implements.
    #[error("{}: unsupported architecture `{arch}` (supported: {supported})", path.display())]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },

    /// A safetensors file is malformed (truncated, bad header, offsets out of range or overlapping).
    #[error("{}: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },

    /// A tensor exists but disagrees with what config.json implies (shape, dtype).
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    /// tokenizer.json could not be loaded or used.
    #[error("{}: tokenizer: {}", path.display(), one_line(msg))]
    Tokenizer { path: PathBuf, msg: String },

    /// No GPU adapter matched the request (or none exists at all).
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    /// The adapter refused to create a device with the requested features/limits.
    #[error("could not create a GPU device on `{adapter}`: {}", one_line(msg))]
    RequestDevice { adapter: String, msg: String },

    /// A WGSL kernel failed to compile or its pipeline failed to build.
    #[error("kernel `{kernel}` failed to build: {}", one_line(msg))]
    Shader { kernel: String, msg: String },

    /// A GPU operation was rejected (validation error, out of memory).
    #[error("GPU error during {op}: {}", one_line(msg))]
    Gpu { op: String, msg: String },

    /// The GPU device was lost (driver reset, hang, removal).
    #[error("GPU device lost: {}", one_line(.0))]
    DeviceLost(String),

    /// An operand does not fit the device even after chunking.
    #[error("{what} needs {bytes} bytes in one binding but the device allows {limit}")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },

    /// A caller passed operands whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A command-line or API argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),

    /// A work directory (`--work-dir`, `merge`) or Hessian directory (`--hessians`) is
    /// missing pieces, belongs to another job, or is damaged.
    #[error("{}: {msg}", path.display())]
    WorkDir { path: PathBuf, msg: String },

    /// The run was stopped (SIGINT/SIGTERM) at a consistent point; the text says where.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Error {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A bad input file named by the user (exit code 2).
    pub fn input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Input {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn safetensors(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Safetensors {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn config(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn model_dir(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::ModelDir {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn work_dir(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::WorkDir {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn tensor(path: impl AsRef<Path>, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }

    /// Process exit code for this error: 2 for bad input (files, arguments), 1 for failures of
    /// the machine (GPU, I/O), 130 when interrupted.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Json { .. }
            | Error::ModelDir { .. }
            | Error::Config { .. }
            | Error::UnsupportedArchitecture { .. }
            | Error::Safetensors { .. }
            | Error::Tensor { .. }
            | Error::Tokenizer { .. }
            | Error::InvalidArgument(_)
            | Error::Input { .. }
            | Error::WorkDir { .. } => 2,
            Error::Interrupted(_) => 130,
            Error::Io { .. }
            | Error::NoAdapter(_)
            | Error::RequestDevice { .. }
            | Error::Shader { .. }
            | Error::Gpu { .. }
            | Error::DeviceLost(_)
            | Error::TooLarge { .. }
            | Error::Shape(_) => 1,
        }
    }
}

/// Collapse a possibly multi-line message (wgpu validation errors span many lines) into one line.
pub fn one_line(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for part in msg
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        if !out.is_empty() {
            out.push_str(" | ");
        }
        out.push_str(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_flattens() {
        assert_eq!(one_line("a\n  b\r\n\nc  "), "a | b | c");
        assert_eq!(one_line("single"), "single");
    }

    #[test]
    fn messages_name_the_file() {
        let e = Error::safetensors("/x/model.safetensors", "truncated");
        assert_eq!(e.to_string(), "/x/model.safetensors: truncated");
        assert_eq!(e.exit_code(), 2);
    }
}
