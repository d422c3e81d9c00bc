//! The tokenizer as llama.cpp reads it from GGUF metadata (`tokenizer.ggml.*`), from the
//! source's tokenizer.json and tokenizer_config.json: byte-level BPE ("gpt2" model) with its
//! tokens, token types, merges and the pre-tokenizer llama.cpp must apply, named by matching
//! tokenizer.json's pre-tokenizer against the ones llama.cpp implements; special token ids; the
//! chat template. A tokenizer llama.cpp would split differently is refused by name.

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
            "{}: missing; a GGUF needs the tokenizer (SentencePiece-only models are not \
             supported yet)",
            path.display()
        )));
    }
    let t = read_json(&path)?;
    let bad = |msg: String| Error::InvalidArgument(format!("{}: {msg}", path.display()));
    let model = t.get("model").ok_or_else(|| bad("no `model`".into()))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE")
        || model.get("byte_fallback").and_then(Json::as_bool) == Some(true)
    {
        return Err(bad(
            "not a byte-level BPE tokenizer (SentencePiece-style models are not supported yet)"
                .into(),
        ));
    }
    let pre = pre_name(t.get("pre_tokenizer").unwrap_or(&Json::Null)).map_err(bad)?;
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("no `model.vocab`".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; cfg.vocab_size.max(vocab.len())];
    let mut types = vec![1i32; tokens.len()];
    let mut put = |id: usize, s: &str| -> Result<()> {
        let slot = tokens.get_mut(id).ok_or_else(|| {
            bad(format!(
                "token id {id} beyond vocab_size {}",
                cfg.vocab_size
            ))
        })?;
        *slot = Some(s.to_string());
        Ok(())
    };
    for (s, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry {s:?} has no integer id")))?;
        put(id as usize, s)?;
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
        put(id as usize, s)?;
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        types[id as usize] = if special { 3 } else { 4 };
    }
    // Ids the vocabulary leaves unused (a padded embedding) are named `[PAD{id}]` with token
    // type 5 (unused), as llama.cpp's converter names them.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
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
    let mut kv = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Strs(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::I32s(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Strs(merges)),
    ];
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
    if let Some(tpl) = tc
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(Json::as_str)
    {
        kv.push(("tokenizer.chat_template".into(), Value::Str(tpl.into())));
    }
    Ok(kv)
}
