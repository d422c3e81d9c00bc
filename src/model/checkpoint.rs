//! A Hugging Face model directory: config.json, one or more safetensors files (optionally with
//! model.safetensors.index.json), and maybe tokenizer.json. Opening validates everything that
//! can be checked without reading the weights: every tensor the architecture needs exists in
//! the file the index names, with the shape and dtype config.json implies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};

use super::arch::Architecture;
use super::compressed::{Manifest, QuantEntry, MANIFEST_FILE};
use super::config::ModelConfig;
use super::safetensors::{SafetensorsFile, TensorInfo};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A borrowed view of one tensor's bytes in the memory mapping.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    pub file: &'a Path,
}

impl<'a> TensorRef<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor `info` of `file` (refused, naming both, when it is not a float type).
    pub fn in_file(file: &'a SafetensorsFile, info: &'a TensorInfo) -> Result<TensorRef<'a>> {
        let dtype = info.dtype.ok_or_else(|| {
            Error::tensor(
                file.path(),
                &info.name,
                format!("dtype {} is not a float type", info.dtype_name),
            )
        })?;
        Ok(TensorRef {
            name: &info.name,
            dtype,
            shape: &info.shape,
            bytes: file.bytes(info),
            file: file.path(),
        })
    }

    /// Decode to f32, refusing NaN or infinite weights.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.dtype.decode_f32(self.bytes, &mut out);
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(
                self.file,
                self.name,
                format!("element {i} is {} (weights must be finite)", out[i]),
            ));
        }
        Ok(out)
    }

    /// Index of the first non-finite element, without allocating.
    pub fn first_non_finite(&self) -> Option<usize> {
        let mut buf = Vec::with_capacity(4096);
        let w = self.dtype.size();
        for (c, chunk) in self.bytes.chunks(4096 * w).enumerate() {
            buf.clear();
            self.dtype.decode_f32(chunk, &mut buf);
            if let Some(i) = buf.iter().position(|v| !v.is_finite()) {
                return Some(c * 4096 + i);
            }
        }
        None
    }
}

/// An opened, validated checkpoint.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    arch: Architecture,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    location: HashMap<String, usize>,
    dtype: DType,
    /// Present for a pumice-compressed directory.
    manifest: Option<Manifest>,
    /// Edge-LLM's exits, when the directory has them.
    exits: Option<super::exits::Exits>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({})", self.dir.display())
    }
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::model_dir(&dir, "no such directory"))
            }
            Err(e) => return Err(Error::io(&dir, e)),
            Ok(m) if !m.is_dir() => {
                return Err(Error::model_dir(
                    &dir,
                    "not a directory (expected a model directory)",
                ))
            }
            Ok(_) => {}
        }
        let mut entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        if entries.next().is_none() {
            return Err(Error::model_dir(
                &dir,
                "directory is empty (expected config.json and model.safetensors)",
            ));
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(Error::model_dir(&dir, "no config.json"));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let arch = Architecture::from_config(&config);

        let manifest = if dir.join(MANIFEST_FILE).is_file() {
            Some(Manifest::read(&dir)?)
        } else {
            None
        };
        let (files, location) = open_weights(&dir)?;
        let exits = super::exits::Exits::open(&dir, &config)?;
        let mut ck = Checkpoint {
            dir,
            config,
            arch,
            files,
            location,
            dtype: DType::F32,
            manifest,
            exits,
        };
        ck.dtype = ck.validate()?;
        Ok(ck)
    }

    /// Check every tensor of the architecture against config.json; return the weights' dtype.
    fn validate(&self) -> Result<DType> {
        let mut seen = None;
        for spec in self.arch.tensors() {
            if let Some(q) = self.quantized(&spec.name) {
                self.validate_quantized(&spec.name, &spec.shape, q)?;
                continue;
            }
            let Some(&fi) = self.location.get(&spec.name) else {
                let where_ = if self.files.len() == 1 {
                    self.files[0].path().to_path_buf()
                } else {
                    self.dir.join(INDEX_FILE)
                };
                return Err(Error::tensor(
                    where_,
                    &spec.name,
                    "missing (config.json implies it exists)",
                ));
            };
            let file = &self.files[fi];
            let info = file
                .info(&spec.name)
                .expect("location map built from file contents");
            if info.shape != spec.shape {
                return Err(Error::tensor(
                    file.path(),
                    &spec.name,
                    format!(
                        "shape {:?} disagrees with config.json, which implies {:?}",
                        info.shape, spec.shape
                    ),
                ));
            }
            let Some(dt) = info.dtype else {
                return Err(Error::tensor(
                    file.path(),
                    &spec.name,
                    format!(
                        "dtype {} is not a float type pumice reads (F32, F16, BF16)",
                        info.dtype_name
                    ),
                ));
            };
            if let Some(want) = self.config.dtype {
                if dt != want {
                    return Err(Error::tensor(
                        file.path(),
                        &spec.name,
                        format!("stored as {dt} but config.json says {want}"),
                    ));
                }
            }
            seen.get_or_insert(dt);
        }
        Ok(seen.unwrap_or(self.config.dtype.unwrap_or(DType::F32)))
    }

    /// Check the stored pieces of a compressed weight against the manifest and config.
    fn validate_quantized(&self, name: &str, shape: &[usize], q: &QuantEntry) -> Result<()> {
        let manifest_path = self.dir.join(MANIFEST_FILE);
        if shape != [q.rows, q.cols] {
            return Err(Error::tensor(
                &manifest_path,
                name,
                format!(
                    "manifest shape [{}, {}] disagrees with config.json, which implies {shape:?}",
                    q.rows, q.cols
                ),
            ));
        }
        let parts = q
            .stored_parts()
            .map_err(|msg| Error::tensor(&manifest_path, name, msg))?;
        for part in parts {
            let (dtype, want) = (part.dtype, &part.shape);
            let pname = part.name(name);
            let Some((file, info)) = self.info(&pname) else {
                return Err(Error::tensor(
                    &manifest_path,
                    &pname,
                    "missing from the safetensors file",
                ));
            };
            if info.dtype_name != dtype || &info.shape != want {
                return Err(Error::tensor(
                    file.path(),
                    &pname,
                    format!(
                        "is {} {:?}, the manifest implies {dtype} {want:?}",
                        info.dtype_name, info.shape
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Edge-LLM's exits stored with the model (`exits.safetensors`), if any.
    pub fn exits(&self) -> Option<&super::exits::Exits> {
        self.exits.as_ref()
    }

    /// The manifest, for a pumice-compressed checkpoint.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// How a weight is compressed, if it is.
    pub fn quantized(&self, name: &str) -> Option<&QuantEntry> {
        self.manifest.as_ref()?.tensors.get(name)
    }

    /// Raw bytes, dtype name and shape of any stored tensor (including integer ones).
    pub fn raw(&self, name: &str) -> Result<(&[u8], &str, &[usize])> {
        let (file, info) = self
            .info(name)
            .ok_or_else(|| Error::tensor(&self.dir, name, "not in this checkpoint"))?;
        Ok((file.bytes(info), &info.dtype_name, &info.shape))
    }
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn arch(&self) -> &Architecture {
        &self.arch
    }
    /// Storage dtype of the weights (of the first tensor; all agree with config.json when it
    /// names one).
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Bytes of all safetensors files (the exits' included).
    pub fn bytes_on_disk(&self) -> u64 {
        self.files.iter().map(|f| f.len_bytes()).sum::<u64>()
            + self.exits.as_ref().map_or(0, |e| e.bytes())
    }

    pub fn parameter_count(&self) -> usize {
        self.arch.parameter_count()
    }

    fn info(&self, name: &str) -> Option<(&SafetensorsFile, &TensorInfo)> {
        let &fi = self.location.get(name)?;
        let f = &self.files[fi];
        Some((f, f.info(name)?))
    }

    /// Release the resident pages of a tensor (see [`SafetensorsFile::release`]).
    pub fn release(&self, name: &str) {
        if let Some((f, info)) = self.info(name) {
            f.release(info);
        }
    }

    /// Release the resident pages of every tensor of decoder layer `l`.
    pub fn release_layer(&self, l: usize) {
        if let Some(spec) = self.arch().layers.get(l) {
            for t in spec.tensors() {
                self.release(&t.name);
            }
        }
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let (file, info) = self
            .info(name)
            .ok_or_else(|| Error::tensor(&self.dir, name, "not in this checkpoint"))?;
        TensorRef::in_file(file, info)
    }

    /// The LM head weight (the embedding when tied).
    pub fn lm_head(&self) -> Result<TensorRef<'_>> {
        match &self.arch.lm_head {
            Some(h) => self.tensor(&h.name),
            None => self.tensor(&self.arch.embed_tokens.name),
        }
    }

    /// Scan every weight for NaN or infinity (reads the whole checkpoint).
    pub fn check_finite(&self) -> Result<()> {
        for spec in self.arch.tensors() {
            if let Some(q) = self.quantized(&spec.name) {
                // Every stored f16 value: scales and zeros of the codes and, for CALDERA, of
                // the factors L and R.
                let parts = q
                    .stored_parts()
                    .map_err(|msg| Error::tensor(self.dir.join(MANIFEST_FILE), &spec.name, msg))?;
                for part in parts.iter().filter(|p| p.dtype == "F16") {
                    let t = self.tensor(&part.name(&spec.name))?;
                    if let Some(i) = t.first_non_finite() {
                        return Err(Error::tensor(
                            t.file,
                            t.name,
                            format!("value {i} is not finite"),
                        ));
                    }
                }
                continue;
            }
            let t = self.tensor(&spec.name)?;
            if let Some(i) = t.first_non_finite() {
                let mut v = Vec::new();
                t.dtype.decode_f32(
                    &t.bytes[i * t.dtype.size()..(i + 1) * t.dtype.size()],
                    &mut v,
                );
                return Err(Error::tensor(
                    t.file,
                    t.name,
                    format!("element {i} is {} (weights must be finite)", v[0]),
                ));
            }
        }
        Ok(())
    }
}

/// Open model.safetensors, or every shard the index names.
fn open_weights(dir: &Path) -> Result<(Vec<SafetensorsFile>, HashMap<String, usize>)> {
    let index_path = dir.join(INDEX_FILE);
    let single = dir.join(SINGLE_FILE);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index_path.clone(),
            source,
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::config(&index_path, "missing `weight_map` object"))?;
        let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::config(
                    &index_path,
                    format!("`weight_map.{tensor}` is not a file name"),
                )
            })?;
            if shard.contains('/') || shard.contains('\\') || shard.starts_with("..") {
                return Err(Error::config(
                    &index_path,
                    format!(
                        "shard name `{shard}` must be a plain file name in the model directory"
                    ),
                ));
            }
            wanted.insert(tensor, shard);
        }
        let shards: BTreeSet<&str> = wanted.values().copied().collect();
        let mut files = Vec::new();
        let mut shard_index = HashMap::new();
        for shard in shards {
            let p = dir.join(shard);
            if !p.is_file() {
                return Err(Error::model_dir(
                    &index_path,
                    format!("names shard `{shard}`, which is missing from the directory"),
                ));
            }
            shard_index.insert(shard, files.len());
            files.push(SafetensorsFile::open(&p)?);
        }
        let mut location = HashMap::new();
        for (tensor, shard) in wanted {
            let fi = shard_index[shard];
            if files[fi].info(tensor).is_none() {
                return Err(Error::tensor(
                    files[fi].path(),
                    tensor,
                    format!(
                        "{INDEX_FILE} places it in this shard but the shard does not contain it"
                    ),
                ));
            }
            location.insert(tensor.to_string(), fi);
        }
        Ok((files, location))
    } else if single.is_file() {
        let f = SafetensorsFile::open(&single)?;
        let location = f.tensors().map(|t| (t.name.clone(), 0)).collect();
        Ok((vec![f], location))
    } else {
        Err(Error::model_dir(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ))
    }
}
