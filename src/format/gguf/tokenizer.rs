//! The tokenizer as llama.cpp reads it from GGUF metadata (`tokenizer.ggml.*`), from the
//! source's tokenizer.json and tokenizer_config.json: byte-level BPE ("gpt2" model) with its
//! tokens, token types, merges and the pre-tokenizer llama.cpp must apply, named by matching
//! tokenizer.json's pre-tokenizer against the ones llama.cpp implements; or SentencePiece-style
//! BPE with byte fallback (Llama 2, TinyLlama, Mistral: "llama" model) with its tokens, piece
//! scores and types — from tokenizer.model when the model has one (what llama.cpp's own
//! converter reads), otherwise ranked by tokenizer.json's merges — and whether a space is
//! prepended; special token ids; the chat template. A tokenizer llama.cpp would split
//! differently is refused by name.

use std::path::Path;

use serde_json::Value as Json;

use super::file::Value;
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// The regular expression of Llama 3's pre-tokenizer (llama.cpp: "llama-bpe").
const LLAMA3_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
/// Qwen2's (llama.cpp: "qwen2"): digits one at a time.
const QWEN2_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// llama.cpp's name for tokenizer.json's pre-tokenizer, or why there is none.
fn pre_name(pre: &Json) -> std::result::Result<&'static str, String> {
    let ty = pre.get("type").and_then(Json::as_str).unwrap_or("");
    let byte_level_regex = |p: &Json| {
        p.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && p.get("use_regex").and_then(Json::as_bool) == Some(true)
    };
    if byte_level_regex(pre) {
        return Ok("gpt-2");
    }
    if ty == "Sequence" {
        let items = pre
            .get("pretokenizers")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default();
        let split = items.iter().find_map(|p| {
            (p.get("type").and_then(Json::as_str) == Some("Split"))
                .then(|| p.pointer("/pattern/Regex").and_then(Json::as_str))
                .flatten()
        });
        let digits_individual = items.iter().any(|p| {
            p.get("type").and_then(Json::as_str) == Some("Digits")
                && p.get("individual_digits").and_then(Json::as_bool) == Some(true)
        });
        match (split, digits_individual, items.len()) {
            (Some(LLAMA3_SPLIT), false, 2) => return Ok("llama-bpe"),
            (Some(QWEN2_SPLIT), false, 2) => return Ok("qwen2"),
            (None, true, 2) if items.iter().any(byte_level_regex) => return Ok("smollm"),
            _ => {}
        }
    }
    Err(format!(
        "its pre-tokenizer ({}) is not one llama.cpp implements as pumice can name it \
         (byte-level gpt-2, llama-bpe, qwen2, smollm)",
        serde_json::to_string(pre).unwrap_or_default()
    ))
}

/// The `tokenizer.*` metadata of the model in `dir`.
pub(crate) fn metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{}: missing; a GGUF needs the tokenizer as tokenizer.json (a model with only \
             tokenizer.model: save it with transformers' LlamaTokenizerFast first)",
            path.display()
        )));
    }
    let t = read_json(&path)?;
    let bad = |msg: String| Error::InvalidArgument(format!("{}: {msg}", path.display()));
    let model = t.get("model").ok_or_else(|| bad("no `model`".into()))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(bad(
            "not a BPE tokenizer (byte-level or SentencePiece-style)".into(),
        ));
    }
    let spm = model.get("byte_fallback").and_then(Json::as_bool) == Some(true);
    let vocab = Vocab::read(&t, cfg).map_err(bad)?;
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            _ => Err(bad(format!("merge {m} is not a pair"))),
        })
        .collect::<Result<_>>()?;
    let mut kv = if spm {
        let space_prefix = space_prefix(&t).map_err(bad)?;
        let unk = model
            .get("unk_token")
            .and_then(Json::as_str)
            .and_then(|u| vocab.id(u));
        let (scores, types) = match dir.join("tokenizer.model") {
            m if m.is_file() => spm_pieces(&m, &vocab)?,
            _ => ranked_by_merges(&vocab, &merges, &t),
        };
        let mut kv = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::Str("llama".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                Value::Str("default".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Strs(vocab.tokens),
            ),
            ("tokenizer.ggml.scores".to_string(), Value::F32s(scores)),
            ("tokenizer.ggml.token_type".to_string(), Value::I32s(types)),
            (
                "tokenizer.ggml.add_space_prefix".to_string(),
                Value::Bool(space_prefix),
            ),
        ];
        if let Some(unk) = unk {
            kv.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)));
        }
        kv
    } else {
        let pre = pre_name(t.get("pre_tokenizer").unwrap_or(&Json::Null)).map_err(bad)?;
        vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::Str("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".to_string(), Value::Str(pre.into())),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Strs(vocab.tokens),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::I32s(vocab.types),
            ),
            ("tokenizer.ggml.merges".to_string(), Value::Strs(merges)),
        ]
    };
    let tc = dir.join("tokenizer_config.json");
    let tc = if tc.is_file() {
        Some(read_json(&tc)?)
    } else {
        None
    };
    if let Some(b) = cfg.bos_token_id {
        kv.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        kv.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    // A BOS is added when the tokenizer's post-processor or its config says so.
    let post_bos = t
        .get("post_processor")
        .map(|p| p.to_string().contains("\"bos\"") || p.to_string().contains("<s>"))
        .unwrap_or(false);
    let add_bos = tc
        .as_ref()
        .and_then(|c| c.get("add_bos_token"))
        .and_then(Json::as_bool)
        .unwrap_or(post_bos);
    kv.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    let add_eos = tc
        .as_ref()
        .and_then(|c| c.get("add_eos_token"))
        .and_then(Json::as_bool)
        .unwrap_or(false);
    kv.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(tpl) = tc
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(Json::as_str)
    {
        kv.push(("tokenizer.chat_template".into(), Value::Str(tpl.into())));
    }
    Ok(kv)
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// tokenizer.json's tokens by id (its vocabulary, then its added tokens; ids a padded embedding
/// has beyond them named `[PAD{id}]`, as llama.cpp's converter names them) and their types
/// (added tokens control or user-defined, padding unused, the rest normal).
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    /// Ids of added tokens marked special.
    special: Vec<bool>,
    by_text: std::collections::HashMap<String, u32>,
}

impl Vocab {
    fn read(t: &Json, cfg: &ModelConfig) -> std::result::Result<Vocab, String> {
        let vocab = t
            .pointer("/model/vocab")
            .and_then(Json::as_object)
            .ok_or("no `model.vocab`")?;
        let mut tokens: Vec<Option<String>> = vec![None; cfg.vocab_size.max(vocab.len())];
        let mut types = vec![NORMAL; tokens.len()];
        let mut special = vec![false; tokens.len()];
        let mut put = |id: u64, s: &str| -> std::result::Result<usize, String> {
            let slot = tokens
                .get_mut(id as usize)
                .ok_or_else(|| format!("token id {id} beyond vocab_size {}", cfg.vocab_size))?;
            *slot = Some(s.to_string());
            Ok(id as usize)
        };
        for (s, id) in vocab {
            let id = id
                .as_u64()
                .ok_or_else(|| format!("vocab entry {s:?} has no integer id"))?;
            put(id, s)?;
        }
        for a in t
            .get("added_tokens")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(s)) = (
                a.get("id").and_then(Json::as_u64),
                a.get("content").and_then(Json::as_str),
            ) else {
                continue;
            };
            let id = put(id, s)?;
            special[id] = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            types[id] = if special[id] { CONTROL } else { USER_DEFINED };
        }
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.unwrap_or_else(|| {
                    types[i] = UNUSED;
                    format!("[PAD{i}]")
                })
            })
            .collect();
        let by_text = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        Ok(Vocab {
            tokens,
            types,
            special,
            by_text,
        })
    }

    fn id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }
}

/// Whether a SentencePiece-style tokenizer.json prepends "▁" (llama.cpp's add_space_prefix):
/// the legacy normalizer (Prepend "▁", Replace " " → "▁") or a Metaspace pre-tokenizer.
fn space_prefix(t: &Json) -> std::result::Result<bool, String> {
    let norm = t.get("normalizer").unwrap_or(&Json::Null);
    let items: Vec<&Json> = match norm.get("type").and_then(Json::as_str) {
        Some("Sequence") => norm
            .get("normalizers")
            .and_then(Json::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![norm],
        None => vec![],
    };
    let is = |j: &Json, ty: &str| j.get("type").and_then(Json::as_str) == Some(ty);
    let prepend = items
        .iter()
        .any(|j| is(j, "Prepend") && j.get("prepend").and_then(Json::as_str) == Some("\u{2581}"));
    let replace = items.iter().any(|j| {
        is(j, "Replace")
            && j.pointer("/pattern/String").and_then(Json::as_str) == Some(" ")
            && j.get("content").and_then(Json::as_str) == Some("\u{2581}")
    });
    let pre = t.get("pre_tokenizer").unwrap_or(&Json::Null);
    let meta = if is(pre, "Metaspace") {
        Some(pre)
    } else {
        pre.get("pretokenizers")
            .and_then(Json::as_array)
            .and_then(|a| (a.len() == 1 && is(&a[0], "Metaspace")).then(|| &a[0]))
    };
    match (items.len(), replace, meta) {
        (1 | 2, true, None) if items.len() == 1 + prepend as usize => Ok(prepend),
        (0, _, Some(m)) if m.get("split").and_then(Json::as_bool) != Some(true) => {
            match m.get("prepend_scheme").and_then(Json::as_str) {
                Some("first" | "always") | None => Ok(true),
                Some("never") => Ok(false),
                Some(other) => Err(format!("Metaspace prepend_scheme {other:?}")),
            }
        }
        _ => Err(format!(
            "its SentencePiece-style normalizer ({}) and pre-tokenizer ({}) are not the ones \
             llama.cpp's \"llama\" tokenizer reproduces (\"▁\" prepended or not, spaces as \"▁\", \
             no splitting)",
            serde_json::to_string(norm).unwrap_or_default(),
            serde_json::to_string(pre).unwrap_or_default()
        )),
    }
}

/// Scores and token types from a SentencePiece model file (ModelProto: repeated field 1, each a
/// piece with its text (1), score (2) and type (3)), checked against tokenizer.json's ids;
/// added special tokens are control tokens, as llama.cpp's converter marks them.
fn spm_pieces(path: &Path, vocab: &Vocab) -> Result<(Vec<f32>, Vec<i32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::InvalidArgument(format!("{}: {msg}", path.display()));
    let pieces =
        proto::pieces(&bytes).map_err(|m| bad(format!("not a SentencePiece model: {m}")))?;
    let n = vocab.tokens.len();
    if pieces.len() > n {
        return Err(bad(format!(
            "{} pieces, more than the {n} tokens of tokenizer.json",
            pieces.len()
        )));
    }
    let mut scores = vec![-1000.0f32; n];
    let mut types = vocab.types.clone();
    for (i, (text, score, ty)) in pieces.into_iter().enumerate() {
        if vocab.tokens[i] != text {
            return Err(bad(format!(
                "piece {i} is {text:?} where tokenizer.json has {:?}",
                vocab.tokens[i]
            )));
        }
        scores[i] = score;
        // Added special tokens are control tokens, byte pieces stay byte tokens (llama.cpp
        // decodes those to their byte).
        if !vocab.special[i] || ty == BYTE as u64 {
            types[i] = match ty {
                1..=6 => ty as i32,
                _ => NORMAL,
            };
        }
    }
    Ok((scores, types))
}

/// Scores and token types without a SentencePiece model: a token made by merge r scores −r (its
/// first such merge), so llama.cpp merges in tokenizer.json's order.
fn ranked_by_merges(vocab: &Vocab, merges: &[String], t: &Json) -> (Vec<f32>, Vec<i32>) {
    let n = vocab.tokens.len();
    let mut scores = vec![0.0f32; n];
    let mut types = vocab.types.clone();
    // Pieces no merge makes (characters) rank below every merge, in id order.
    for (i, s) in scores.iter_mut().enumerate() {
        if types[i] == NORMAL {
            *s = -((merges.len() + i) as f32);
        }
    }
    for (r, m) in merges.iter().enumerate().rev() {
        if let Some(id) = vocab.id(&m.replacen(' ', "", 1)) {
            scores[id as usize] = -(r as f32);
        }
    }
    let unk = t.pointer("/model/unk_token").and_then(Json::as_str);
    // Byte pieces are byte tokens even when added as special ones (llama.cpp decodes them to
    // their byte); the unknown token is unknown.
    for (i, tok) in vocab.tokens.iter().enumerate() {
        if types[i] == UNUSED {
            continue;
        }
        if is_byte_token(tok) {
            types[i] = BYTE;
            scores[i] = 0.0;
        } else if Some(tok.as_str()) == unk {
            types[i] = UNKNOWN;
        }
    }
    (scores, types)
}

/// `<0xNN>`: SentencePiece's byte-fallback pieces.
fn is_byte_token(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && b[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// The few protobuf wire-format reads a SentencePiece model needs (bounded: every length is
/// checked against the bytes left).
mod proto {
    fn varint(b: &[u8], at: &mut usize) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at).ok_or("truncated varint")?;
            *at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    /// One field of a message: number, wire type, the bytes (types 1, 2, 5), the value (type 0).
    type Field<'a> = (u64, u8, &'a [u8], u64);

    /// The fields of a message.
    fn fields(b: &[u8]) -> Result<Vec<Field<'_>>, String> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < b.len() {
            let key = varint(b, &mut at)?;
            let (field, wire) = (key >> 3, (key & 7) as u8);
            let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
                let s = b.get(*at..*at + n).ok_or("field runs past the end")?;
                *at += n;
                Ok(s)
            };
            match wire {
                0 => {
                    let v = varint(b, &mut at)?;
                    out.push((field, 0, &b[0..0], v));
                }
                1 => out.push((field, 1, take(&mut at, 8)?, 0)),
                2 => {
                    let n = varint(b, &mut at)? as usize;
                    if n > b.len() - at {
                        return Err("length runs past the end".into());
                    }
                    out.push((field, 2, take(&mut at, n)?, 0));
                }
                5 => out.push((field, 5, take(&mut at, 4)?, 0)),
                w => return Err(format!("wire type {w}")),
            }
        }
        Ok(out)
    }

    /// The pieces of a SentencePiece ModelProto: (text, score, type; NORMAL = 1 by default).
    pub(super) fn pieces(b: &[u8]) -> Result<Vec<(String, f32, u64)>, String> {
        let mut out = Vec::new();
        for (field, wire, payload, _) in fields(b)? {
            if field != 1 || wire != 2 {
                continue;
            }
            let (mut text, mut score, mut ty) = (None, 0.0f32, 1u64);
            for (f, w, p, v) in fields(payload)? {
                match (f, w) {
                    (1, 2) => {
                        text = Some(
                            String::from_utf8(p.to_vec())
                                .map_err(|_| "a piece is not UTF-8".to_string())?,
                        )
                    }
                    (2, 5) => score = f32::from_le_bytes([p[0], p[1], p[2], p[3]]),
                    (3, 0) => ty = v,
                    _ => {}
                }
            }
            out.push((text.ok_or("a piece without text")?, score, ty));
        }
        if out.is_empty() {
            return Err("no pieces".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::proto;

    #[test]
    fn sentencepiece_model_pieces_and_hostile_bytes() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let b =
            std::fs::read(root.join("tests/data/tokenizers/spm_llama/tokenizer.model")).unwrap();
        let p = proto::pieces(&b).unwrap();
        assert_eq!(p.len(), 1000);
        assert_eq!((p[0].0.as_str(), p[0].2), ("<unk>", 2));
        assert_eq!((p[3].0.as_str(), p[3].2), ("<0x00>", 6));
        assert!(
            p[300].1 < 0.0 && p[300].1 > p[400].1,
            "scores fall with the merges"
        );
        // Truncations, an absurd length, a bad wire type: errors, never a panic.
        for cut in [1, 2, 7, 100, b.len() - 1] {
            let _ = proto::pieces(&b[..cut]);
        }
        assert!(proto::pieces(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(proto::pieces(&[0x0b]).is_err());
        assert!(proto::pieces(&[0x80; 12]).is_err());
        assert!(proto::pieces(&[]).is_err());
    }
}
