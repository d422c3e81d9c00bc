#!/usr/bin/env python3
"""Make the tokenizer parity data in tests/data/tokenizers/ (run from the project root).

Builds three small tokenizers of the kinds real checkpoints use, trained on a public-domain
book from ../shared/corpus (only the resulting tokenizer.json files are kept):
  bytelevel         GPT-2 style byte-level BPE (regex pre-tokenizer, no digit splitting)
  bytelevel_digits  byte-level BPE whose pre-tokenizer splits every digit (SmolLM2, Qwen2 style)
  sentencepiece     Llama-2 style: "▁" metaspace normalizer, BPE with byte fallback
plus the asset model's own tokenizer (assets/models/gutenberg-llama). Writes messy texts
(CRLF, lone CR, whitespace runs, tabs, unicode, digits, code) as raw bytes, reads each file as
transformers-based evaluations do -- Python's text mode, UTF-8, universal newlines -- and
records the ids transformers' PreTrainedTokenizerFast produces without special tokens, with the
versions that ran, in expected_ids.json. tests/tokenizer_parity.rs compares pumice's ids.

  python3 -m venv /tmp/tokenv && /tmp/tokenv/bin/pip install transformers==4.57.1 tokenizers
  /tmp/tokenv/bin/python tools/tokenizer_parity.py
"""
import json
import os
import sys

import tokenizers
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT = "tests/data/tokenizers"
CORPUS = "../shared/corpus/gutenberg/alice_in_wonderland.txt"

TEXTS = {
    "crlf.txt": b"First line.\r\nSecond line,\r\n\r\nafter a blank one.\r\nLast\r\n",
    "lone_cr.txt": b"old mac\rline endings\r\rand a mix\r\nof both\n\rdone",
    "whitespace.txt": b"  leading  spaces   and\t\ttabs \t mixed\n\n\n   \n trailing   \t\n\x0bvt\x0cff  end",
    "unicode.txt": "Caf\u00e9 na\u00efve \u00fcber \u2014 \u201cquotes\u201d \u2018single\u2019 "
    "\u00c5ngstr\u00f6m e\u0301 (combining) \u4e2d\u6587\u5b57\u7b26 \u65e5\u672c\u8a9e "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \U0001F600\U0001F44D\U0001F3FD \u00a0nbsp "
    "\u2028sep\u2029para \u00df\u1e9e \ufeffbom-inside\r\n".encode("utf-8"),
    "digits.txt": b"In 1865, 3.14159 and 2,718,281 (0x1F) at 12:45pm on 2024-01-31; "
    b"+44 20 7946 0958, 1e-10, 007, 1234567890123456789 and v2.0.1rc3.\r\n",
    "code.txt": b"def f(x):\r\n\tif x >= 10 and not x % 3:\r\n\t\treturn [i**2 for i in range(x)]  # sq\r\n"
    b"    return {'k': x, \"v\": None}\n\nfn main() { let v: Vec<u32> = vec![1, 2]; println!(\"{v:?}\"); }\n"
    b"<div class=\"a\">&amp;&lt;</div>\t// end\r\n",
}


def train(kind, text):
    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        specials = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials, min_frequency=2)
    else:
        tok = Tokenizer(models.BPE())
        bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if kind == "bytelevel_digits":
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), bl]
            )
        else:
            tok.pre_tokenizer = bl
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1500,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            min_frequency=2,
        )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def main():
    with open(CORPUS, encoding="utf-8") as f:
        corpus = f.read()
    os.makedirs(OUT, exist_ok=True)
    dirs = {}
    for kind in ["bytelevel", "bytelevel_digits", "sentencepiece"]:
        d = os.path.join(OUT, kind)
        os.makedirs(d, exist_ok=True)
        train(kind, corpus).save(os.path.join(d, "tokenizer.json"))
        dirs[kind] = d
    dirs["gutenberg-llama"] = "assets/models/gutenberg-llama"
    texts_dir = os.path.join(OUT, "texts")
    os.makedirs(texts_dir, exist_ok=True)
    for name, data in TEXTS.items():
        with open(os.path.join(texts_dir, name), "wb") as f:
            f.write(data)
    expected = {
        "versions": {
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "how": "text read with open(path, encoding='utf-8') (universal newlines); "
        "PreTrainedTokenizerFast(tokenizer_file=...)(text, add_special_tokens=False)",
        "ids": {},
    }
    for kind, d in dirs.items():
        t = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
        expected["ids"][kind] = {}
        for name in TEXTS:
            with open(os.path.join(texts_dir, name), encoding="utf-8") as f:
                text = f.read()
            expected["ids"][kind][name] = t(text, add_special_tokens=False)["input_ids"]
    with open(os.path.join(OUT, "expected_ids.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
