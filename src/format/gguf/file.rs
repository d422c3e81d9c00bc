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
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Iq4Nl,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// Every type pumice writes.
    pub const ALL: [GgmlType; 14] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Iq4Nl,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The types a linear weight may be written in (`--gguf-type`), in the order that breaks
    /// ties when choosing the file's main type.
    pub const LINEAR: [GgmlType; 12] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Iq4Nl,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::F32,
    ];

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Iq4Nl => 20,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 | GgmlType::Iq4Nl => (32, 18),
            // d, qh (the fifth bits, u32), qs[16].
            GgmlType::Q5_0 => (32, 22),
            // d, m, qs[16].
            GgmlType::Q4_1 => (32, 20),
            // d, m, qh (u32), qs[16].
            GgmlType::Q5_1 => (32, 24),
            // scales[16], qs[64], d, dmin.
            GgmlType::Q2K => (256, 84),
            // d, dmin, scales[12], qs[128].
            GgmlType::Q4K => (256, 144),
            // d, dmin, scales[12], qh[32], qs[128].
            GgmlType::Q5K => (256, 176),
            // hmask[32], qs[64], scales[12], d.
            GgmlType::Q3K => (256, 110),
            // ql[128], qh[64], scales[16], d.
            GgmlType::Q6K => (256, 210),
            GgmlType::Q8_0 => (32, 34),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Iq4Nl => "iq4_nl",
            GgmlType::Q2K => "q2_k",
            GgmlType::Q3K => "q3_k",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
        }
    }

    pub fn parse(s: &str) -> Option<GgmlType> {
        GgmlType::ALL
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

/// What a GGUF file holds, read from its header alone.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GgufInfo {
    pub version: u32,
    /// Metadata: scalars and strings as values, arrays as `{"array": length}`.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Tensors: name, dims (ne0 first), ggml type id.
    pub tensors: Vec<(String, Vec<u64>, u32)>,
    /// The file's size.
    pub bytes: u64,
}

impl GgufInfo {
    /// Bytes of a tensor of ggml type `ty` with `elements` elements, for the types pumice
    /// knows (None otherwise).
    pub fn tensor_bytes(ty: u32, elements: u64) -> Option<u64> {
        let t = GgmlType::ALL.into_iter().find(|t| t.id() == ty)?;
        let (b, bytes) = t.block();
        Some(elements.div_ceil(b as u64) * bytes as u64)
    }

    /// The name of a ggml type id pumice knows.
    pub fn type_name(ty: u32) -> String {
        GgmlType::ALL
            .into_iter()
            .find(|t| t.id() == ty)
            .map(|t| t.name().to_string())
            .unwrap_or_else(|| format!("ggml type {ty}"))
    }
}

/// Read a GGUF file's header: metadata and tensor infos. Every count and length is checked
/// against the file's size before anything is allocated for it.
pub fn read_info(path: &Path) -> Result<GgufInfo> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = std::io::BufReader::new(f);
    let bad = |msg: &str| Error::InvalidArgument(format!("{}: {msg}", path.display()));
    let mut read = |n: usize| -> Result<Vec<u8>> {
        if n as u64 > size {
            return Err(bad("damaged GGUF header: a length exceeds the file"));
        }
        let mut b = vec![0u8; n];
        r.read_exact(&mut b)
            .map_err(|_| bad("truncated GGUF header"))?;
        Ok(b)
    };
    fn u32_of(b: &[u8]) -> u32 {
        u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
    }
    fn u64_of(b: &[u8]) -> u64 {
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
    }
    if read(4)? != b"GGUF" {
        return Err(bad("not a GGUF file (no GGUF magic)"));
    }
    let version = u32_of(&read(4)?);
    if version != 3 {
        return Err(bad(&format!(
            "GGUF version {version}; pumice reads version 3"
        )));
    }
    let n_tensors = u64_of(&read(8)?);
    let n_kv = u64_of(&read(8)?);
    if n_tensors > size / 24 || n_kv > size / 12 {
        return Err(bad("damaged GGUF header: counts exceed the file"));
    }
    let string = |read: &mut dyn FnMut(usize) -> Result<Vec<u8>>| -> Result<String> {
        let n = u64_of(&read(8)?);
        if n > size {
            return Err(bad("damaged GGUF header: a string exceeds the file"));
        }
        Ok(String::from_utf8_lossy(&read(n as usize)?).into_owned())
    };
    let scalar_size = |t: u32| -> Option<usize> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    };
    let scalar = |t: u32, b: &[u8]| -> serde_json::Value {
        match t {
            0 => b[0].into(),
            1 => (b[0] as i8).into(),
            2 => u16::from_le_bytes([b[0], b[1]]).into(),
            3 => i16::from_le_bytes([b[0], b[1]]).into(),
            4 => u32_of(b).into(),
            5 => (u32_of(b) as i32).into(),
            6 => f32::from_le_bytes(b[..4].try_into().expect("4 bytes")).into(),
            7 => (b[0] != 0).into(),
            10 => u64_of(b).into(),
            11 => (u64_of(b) as i64).into(),
            _ => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")).into(),
        }
    };
    let mut metadata = serde_json::Map::new();
    for _ in 0..n_kv {
        let key = string(&mut read)?;
        let t = u32_of(&read(4)?);
        let v = match t {
            8 => string(&mut read)?.into(),
            9 => {
                let et = u32_of(&read(4)?);
                let n = u64_of(&read(8)?);
                if n > size {
                    return Err(bad("damaged GGUF header: an array exceeds the file"));
                }
                match (et, scalar_size(et)) {
                    (8, _) => {
                        for _ in 0..n {
                            string(&mut read)?;
                        }
                    }
                    (_, Some(s)) => {
                        read(s * n as usize)?;
                    }
                    _ => return Err(bad(&format!("unsupported array element type {et}"))),
                }
                serde_json::json!({ "array": n })
            }
            _ => match scalar_size(t) {
                Some(s) => scalar(t, &read(s)?),
                None => return Err(bad(&format!("unknown metadata type {t} of {key}"))),
            },
        };
        metadata.insert(key, v);
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = string(&mut read)?;
        let nd = u32_of(&read(4)?);
        if nd > 8 {
            return Err(bad(&format!("tensor {name} has {nd} dimensions")));
        }
        let dims: Vec<u64> = (0..nd)
            .map(|_| read(8).map(|b| u64_of(&b)))
            .collect::<Result<_>>()?;
        let ty = u32_of(&read(4)?);
        read(8)?; // offset
        tensors.push((name, dims, ty));
    }
    Ok(GgufInfo {
        version,
        metadata,
        tensors,
        bytes: size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_and_hostile_headers_are_refused() {
        let dir = std::env::temp_dir().join(format!("pumice-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let kv = vec![
            (
                "general.architecture".to_string(),
                Value::Str("llama".into()),
            ),
            ("n".to_string(), Value::U32(7)),
            ("x".to_string(), Value::F32(0.5)),
            ("b".to_string(), Value::Bool(true)),
            (
                "toks".to_string(),
                Value::Strs(vec!["a".into(), "bc".into()]),
            ),
            ("ids".to_string(), Value::I32s(vec![1, -2, 3])),
        ];
        let plan = vec![
            TensorInfo {
                name: "w".into(),
                ne: vec![64, 3],
                ty: GgmlType::Q8_0,
            },
            TensorInfo {
                name: "n".into(),
                ne: vec![5],
                ty: GgmlType::F32,
            },
        ];
        let mut w = GgufWriter::create(&path, &kv, plan).unwrap();
        w.write("w", &vec![1u8; 3 * 2 * 34]).unwrap();
        w.write("n", &[0u8; 20]).unwrap();
        let bytes = w.finish().unwrap();
        let info = read_info(&path).unwrap();
        assert_eq!(info.bytes, bytes);
        assert_eq!(info.metadata["general.architecture"], "llama");
        assert_eq!(info.metadata["n"], 7);
        assert_eq!(info.metadata["x"], 0.5);
        assert_eq!(info.metadata["b"], true);
        assert_eq!(info.metadata["toks"]["array"], 2);
        assert_eq!(info.metadata["ids"]["array"], 3);
        assert_eq!(info.tensors[0], ("w".to_string(), vec![64, 3], 8));
        assert_eq!(GgufInfo::tensor_bytes(8, 192), Some(6 * 34));
        // A count that exceeds the file, a truncated header, no magic.
        let data = std::fs::read(&path).unwrap();
        let mut hostile = data.clone();
        hostile[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &hostile).unwrap();
        assert!(read_info(&path).unwrap_err().to_string().contains("exceed"));
        std::fs::write(&path, &data[..40]).unwrap();
        assert!(read_info(&path).is_err());
        std::fs::write(&path, b"NOPE").unwrap();
        assert!(read_info(&path).unwrap_err().to_string().contains("magic"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
