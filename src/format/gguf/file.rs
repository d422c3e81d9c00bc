//! The GGUF container (version 3), written as a stream: magic, version, counts, the key–value
//! metadata, every tensor's info (name, dims with ne0 the fastest, ggml type, data offset), then
//! the data, each tensor starting at a multiple of the alignment (32). The tensor list is
//! planned up front, so offsets are known before the first byte of data.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const ALIGNMENT: u64 = 32;

/// ggml tensor types pumice writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q8_0,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q8_0 => (32, 34),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q8_0 => "q8_0",
        }
    }

    pub fn parse(s: &str) -> Option<GgmlType> {
        [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q8_0,
        ]
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Bytes of a row of `n` elements (None when `n` is not whole blocks).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let (b, bytes) = self.block();
        n.is_multiple_of(b).then_some(n / b * bytes)
    }
}

/// A metadata value.
#[derive(Clone, Debug)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

/// One planned tensor: its name, dims (ne0 first) and type.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorInfo {
    pub fn bytes(&self) -> Result<usize> {
        let rows: usize = self.ne[1..].iter().product();
        let row = self.ty.row_bytes(self.ne[0]).ok_or_else(|| {
            Error::Shape(format!(
                "{}: {} columns are not whole {} blocks",
                self.name,
                self.ne[0],
                self.ty.name()
            ))
        })?;
        Ok(row * rows)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    let ty = |out: &mut Vec<u8>, t: u32| out.extend(t.to_le_bytes());
    match v {
        Value::U32(x) => {
            ty(out, 4);
            out.extend(x.to_le_bytes());
        }
        Value::I32(x) => {
            ty(out, 5);
            out.extend(x.to_le_bytes());
        }
        Value::F32(x) => {
            ty(out, 6);
            out.extend(x.to_le_bytes());
        }
        Value::Bool(x) => {
            ty(out, 7);
            out.push(*x as u8);
        }
        Value::Str(s) => {
            ty(out, 8);
            put_str(out, s);
        }
        Value::Strs(v) => {
            ty(out, 9);
            ty(out, 8);
            out.extend((v.len() as u64).to_le_bytes());
            for s in v {
                put_str(out, s);
            }
        }
        Value::I32s(v) => {
            ty(out, 9);
            ty(out, 5);
            out.extend((v.len() as u64).to_le_bytes());
            for x in v {
                out.extend(x.to_le_bytes());
            }
        }
        Value::F32s(v) => {
            ty(out, 9);
            ty(out, 6);
            out.extend((v.len() as u64).to_le_bytes());
            for x in v {
                out.extend(x.to_le_bytes());
            }
        }
    }
}

/// A GGUF file being written.
pub struct GgufWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    plan: Vec<(TensorInfo, usize)>,
    next: usize,
}

fn pad(n: u64) -> usize {
    ((ALIGNMENT - n % ALIGNMENT) % ALIGNMENT) as usize
}

impl GgufWriter {
    /// Write the header, the metadata and the planned tensor infos.
    pub fn create(
        path: &Path,
        kv: &[(String, Value)],
        plan: Vec<TensorInfo>,
    ) -> Result<GgufWriter> {
        let mut h = Vec::new();
        h.extend(b"GGUF");
        h.extend(3u32.to_le_bytes());
        h.extend((plan.len() as u64).to_le_bytes());
        h.extend((kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            put_str(&mut h, k);
            put_value(&mut h, v);
        }
        let mut offset = 0u64;
        let mut sized = Vec::with_capacity(plan.len());
        for t in plan {
            let bytes = t.bytes()?;
            put_str(&mut h, &t.name);
            h.extend((t.ne.len() as u32).to_le_bytes());
            for &d in &t.ne {
                h.extend((d as u64).to_le_bytes());
            }
            h.extend(t.ty.id().to_le_bytes());
            h.extend(offset.to_le_bytes());
            offset += bytes as u64;
            offset += pad(offset) as u64;
            sized.push((t, bytes));
        }
        h.resize(h.len() + pad(h.len() as u64), 0);
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, f);
        file.write_all(&h).map_err(|e| Error::io(path, e))?;
        Ok(GgufWriter {
            path: path.to_path_buf(),
            file,
            plan: sized,
            next: 0,
        })
    }

    /// The next planned tensor's data.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let (t, bytes) = self.plan.get(self.next).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "gguf writer: unexpected tensor {name} after the last"
            ))
        })?;
        if t.name != name || *bytes != data.len() {
            return Err(Error::InvalidArgument(format!(
                "gguf writer: expected {} ({bytes} bytes), got {name} ({} bytes)",
                t.name,
                data.len()
            )));
        }
        self.file
            .write_all(data)
            .and_then(|_| self.file.write_all(&vec![0u8; pad(data.len() as u64)]))
            .map_err(|e| Error::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Flush and sync; every planned tensor must have been written.
    pub fn finish(mut self) -> Result<u64> {
        if self.next != self.plan.len() {
            return Err(Error::InvalidArgument(format!(
                "gguf writer: {} of {} tensors written",
                self.next,
                self.plan.len()
            )));
        }
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        let f = self.file.get_ref();
        f.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(f.metadata().map_err(|e| Error::io(&self.path, e))?.len())
    }
}
