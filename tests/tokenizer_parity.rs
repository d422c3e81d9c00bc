//! Tokenization against transformers on messy text (CRLF, lone CR, whitespace runs, tabs,
//! unicode, digits, code) for byte-level BPE with and without digit splitting, a
//! SentencePiece-style BPE with byte fallback, and the asset model's tokenizer. The expected
//! ids were produced by tools/tokenizer_parity.py (transformers' PreTrainedTokenizerFast on the
//! files read in Python's text mode; versions recorded in expected_ids.json).

mod common;

use common::project_root;
use pumice::model::Tokenizer;
use pumice::text::{read_text, Newlines};

#[test]
fn ids_equal_transformers_on_messy_text() {
    let data = project_root().join("tests/data/tokenizers");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("expected_ids.json")).unwrap())
            .unwrap();
    let ids = expected["ids"].as_object().unwrap();
    assert_eq!(ids.len(), 4);
    let mut checked = 0;
    for (kind, texts) in ids {
        let dir = if kind == "gutenberg-llama" {
            project_root().join("assets/models/gutenberg-llama")
        } else {
            data.join(kind)
        };
        let tok = Tokenizer::from_model_dir(&dir).unwrap().unwrap();
        for (name, want) in texts.as_object().unwrap() {
            let path = data.join("texts").join(name);
            let text = read_text(&path, Newlines::Universal).unwrap();
            let got = tok.encode(&text).unwrap();
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(got, want, "{kind} on {name}");
            checked += 1;
        }
    }
    assert_eq!(checked, 24);
}

/// The files really hold carriage returns (a checkout that rewrote line endings would make the
/// test above vacuous), and reading them raw tokenizes differently.
#[test]
fn messy_texts_keep_their_carriage_returns() {
    let data = project_root().join("tests/data/tokenizers");
    let raw = std::fs::read(data.join("texts/crlf.txt")).unwrap();
    assert_eq!(raw.iter().filter(|&&b| b == b'\r').count(), 5);
    let tok = Tokenizer::from_model_dir(&project_root().join("assets/models/gutenberg-llama"))
        .unwrap()
        .unwrap();
    let path = data.join("texts/crlf.txt");
    let lf = tok
        .encode(&read_text(&path, Newlines::Universal).unwrap())
        .unwrap();
    let crlf = tok
        .encode(&read_text(&path, Newlines::Keep).unwrap())
        .unwrap();
    assert_ne!(lf, crlf);
}
