//! Edge-LLM's early exits stored beside a model: `exits.safetensors` in a model, compressed
//! checkpoint or adapter directory. For each exit after `d` decoder layers (0 < d < layers) it
//! holds `exits.{d}.norm.weight` [hidden] (the exit's RMSNorm) and `exits.{d}.lm_head.weight`
//! [vocab, hidden] (its LM head), in one float dtype. Voting (`eval`/`generate --vote`) combines
//! the exits with the model's own head; the file's bytes count in the checkpoint's size.

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};

use super::checkpoint::TensorRef;
use super::config::ModelConfig;
use super::safetensors::SafetensorsFile;

pub const EXITS_FILE: &str = "exits.safetensors";

fn norm_name(depth: usize) -> String {
    format!("exits.{depth}.norm.weight")
}

fn head_name(depth: usize) -> String {
    format!("exits.{depth}.lm_head.weight")
}

/// The exits of a directory, validated against the model's config.
#[derive(Debug)]
pub struct Exits {
    file: SafetensorsFile,
    depths: Vec<usize>,
}

impl Exits {
    /// The exits stored in `dir`, if it has an exits file. Every tensor must be a norm or head
    /// of an exit between the first and last layer, each exit must have both, shapes must fit
    /// `cfg`, and all must share one float dtype.
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Option<Exits>> {
        let path = dir.join(EXITS_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let file = SafetensorsFile::open(&path)?;
        let (h, v, n) = (cfg.hidden_size, cfg.vocab_size, cfg.num_layers);
        let mut depths = std::collections::BTreeSet::new();
        let mut dtype = None;
        for t in file.tensors() {
            let parsed = t.name.strip_prefix("exits.").and_then(|rest| {
                let (d, what) = rest.split_once('.')?;
                Some((d.parse::<usize>().ok()?, what))
            });
            let (depth, want) = match parsed {
                Some((d, "norm.weight")) => (d, vec![h]),
                Some((d, "lm_head.weight")) => (d, vec![v, h]),
                _ => {
                    return Err(Error::tensor(
                        &path,
                        &t.name,
                        "is not an exit's tensor (exits.DEPTH.norm.weight or \
                         exits.DEPTH.lm_head.weight)",
                    ))
                }
            };
            if depth == 0 || depth >= n {
                return Err(Error::tensor(
                    &path,
                    &t.name,
                    format!(
                        "an exit after {depth} layers: it must lie between 1 and {}",
                        n - 1
                    ),
                ));
            }
            if t.shape != want {
                return Err(Error::tensor(
                    &path,
                    &t.name,
                    format!("shape {:?}, the model's config implies {want:?}", t.shape),
                ));
            }
            let Some(dt) = t.dtype else {
                return Err(Error::tensor(
                    &path,
                    &t.name,
                    format!("dtype {} is not F32, F16 or BF16", t.dtype_name),
                ));
            };
            if *dtype.get_or_insert(dt) != dt {
                return Err(Error::tensor(
                    &path,
                    &t.name,
                    "the exits' tensors do not share one dtype",
                ));
            }
            depths.insert(depth);
        }
        for &d in &depths {
            for name in [norm_name(d), head_name(d)] {
                if file.info(&name).is_none() {
                    return Err(Error::tensor(
                        &path,
                        &name,
                        "missing (the exit has only half)",
                    ));
                }
            }
        }
        if depths.is_empty() {
            return Err(Error::model_dir(&path, "holds no exits"));
        }
        Ok(Some(Exits {
            file,
            depths: depths.into_iter().collect(),
        }))
    }

    /// The exits' depths (decoder layers below each), shallowest first.
    pub fn depths(&self) -> &[usize] {
        &self.depths
    }

    /// `depth` is one of the exits' depths (else an error saying which there are).
    pub fn check_depth(&self, depth: usize) -> Result<()> {
        if self.depths.contains(&depth) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "--exit {depth}: the exits are after layers {:?}",
                self.depths
            )))
        }
    }

    pub fn bytes(&self) -> u64 {
        self.file.len_bytes()
    }

    fn get(&self, name: &str) -> TensorRef<'_> {
        let info = self.file.info(name).expect("validated at open");
        TensorRef::in_file(&self.file, info).expect("a float type, validated at open")
    }

    /// The norm weight of the exit after `depth` layers.
    pub fn norm(&self, depth: usize) -> TensorRef<'_> {
        self.get(&norm_name(depth))
    }

    /// The LM head of the exit after `depth` layers.
    pub fn head(&self, depth: usize) -> TensorRef<'_> {
        self.get(&head_name(depth))
    }
}

/// One exit to write: its depth, norm weight [hidden] and head [vocab · hidden] (f32).
pub struct ExitValues {
    pub depth: usize,
    pub norm: Vec<f32>,
    pub head: Vec<f32>,
}

/// Write `exits` into `dir/exits.safetensors` in `dtype` (`dir` is an output's temporary
/// directory, moved into place whole); returns the file's bytes.
pub fn write(dir: &Path, exits: &[ExitValues], hidden: usize, dtype: DType) -> Result<u64> {
    use super::compressed::{PlannedTensor, StreamingWriter};
    let name = dtype.safetensors_name();
    let mut plan = Vec::new();
    for e in exits {
        let vocab = e.head.len() / hidden.max(1);
        for (n, shape) in [
            (norm_name(e.depth), vec![hidden]),
            (head_name(e.depth), vec![vocab, hidden]),
        ] {
            plan.push(PlannedTensor {
                name: n,
                dtype: name.to_string(),
                bytes: shape.iter().product::<usize>() * dtype.size(),
                shape,
            });
        }
    }
    let path = dir.join(EXITS_FILE);
    let mut w = StreamingWriter::create(&path, plan)?;
    for e in exits {
        w.write(&norm_name(e.depth), &dtype.encode_f32(&e.norm))?;
        w.write(&head_name(e.depth), &dtype.encode_f32(&e.head))?;
    }
    w.finish()?;
    Ok(std::fs::metadata(&path)
        .map_err(|e| Error::io(&path, e))?
        .len())
}
