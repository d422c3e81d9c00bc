//! A plain Hugging Face checkpoint: every linear weight dequantized (act-order undone,
//! CALDERA's L·R added, incoherence rotations undone) and stored as `NAME.weight`, every tensor
//! in one dtype (the others converted from the source's); config.json with that `torch_dtype`
//! and no quantization config. Loads anywhere; exact up to one rounding to the chosen dtype (none for
//! f32), and what llama.cpp's converter or any other quantizer can start from.

use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::compressed::{Accounting, QuantEntry, StreamingWriter};
use crate::model::Checkpoint;

use super::{hf, CompressedLayer, Format, FormatWriter, JobInfo, Planned, Written};

/// Dense weights in `dtype`.
pub struct Dense {
    pub dtype: DType,
}

impl Format for Dense {
    fn name(&self) -> &'static str {
        "dense"
    }

    /// Every valid entry dequantizes.
    fn check(&self, ck: &Checkpoint, planned: &Planned) -> Result<()> {
        super::check_each(ck, planned, "dense weights", |_| None)
    }

    /// One value per weight in the output dtype (L·R merged).
    fn stored_bits(&self, e: &QuantEntry) -> u64 {
        (e.rows * e.cols * self.dtype.size() * 8) as u64
    }

    fn begin(
        &self,
        ck: &Checkpoint,
        dir: &Path,
        _target: &Path,
        _planned: &Planned,
    ) -> Result<Box<dyn FormatWriter>> {
        let dt = self.dtype.safetensors_name();
        let plan = hf::plan_model_as(ck, Some(self.dtype), |w, rows, cols| {
            Ok(vec![hf::tensor(w.to_string(), dt, vec![rows, cols])])
        })?;
        let path = dir.join("model.safetensors");
        let mut writer = StreamingWriter::create(&path, plan)?;
        hf::copy_as(&mut writer, ck, &ck.arch().embed_tokens.name, self.dtype)?;
        Ok(Box::new(DenseWriter {
            dtype: self.dtype,
            dir: dir.to_path_buf(),
            path,
            writer,
            linear_params: 0,
        }))
    }
}

struct DenseWriter {
    dtype: DType,
    dir: PathBuf,
    path: PathBuf,
    writer: StreamingWriter,
    linear_params: usize,
}

impl FormatWriter for DenseWriter {
    fn layer(&mut self, ck: &Checkpoint, s: &CompressedLayer) -> Result<()> {
        let spec = &ck.arch().layers[s.layer];
        for t in spec.tensors() {
            match s.matrices.iter().find(|m| m.weight == t.name) {
                Some(m) => {
                    let w = m.dense()?;
                    self.writer.write(&m.weight, &self.dtype.encode_f32(&w))?;
                    self.linear_params += w.len();
                }
                None if spec.linears.iter().any(|l| l.weight.name == t.name) => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: missing from compressed layer {}",
                        t.name, s.layer
                    )));
                }
                None => hf::copy_as(&mut self.writer, ck, &t.name, self.dtype)?,
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, ck: &Checkpoint, job: JobInfo) -> Result<Written> {
        hf::copy_tail(&mut self.writer, ck, Some(self.dtype))?;
        let DenseWriter {
            dtype,
            dir,
            path,
            writer,
            linear_params,
        } = *self;
        writer.finish()?;
        hf::copy_side_files(ck, &dir, false)?;
        hf::write_config(ck, &dir, |c| {
            c.remove("quantization_config");
            c.insert("torch_dtype".into(), hf::torch_dtype(dtype).into());
            if c.contains_key("dtype") {
                c.insert("dtype".into(), hf::torch_dtype(dtype).into());
            }
        })?;
        let bytes = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        Ok(Written {
            files: vec![("model.safetensors".into(), bytes)],
            total: Accounting::new(job.source.parameters, bytes * 8),
            linear: Accounting::new(
                linear_params,
                linear_params as u64 * 8 * dtype.size() as u64,
            ),
        })
    }
}
