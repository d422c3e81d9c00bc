"""Make tests/data/tokenizers/spm_llama: a real SentencePiece BPE model (byte fallback, as
Llama 2, TinyLlama and Mistral ship theirs) trained on a slice of a Gutenberg book, with the
tokenizer.json transformers converts it to (LlamaTokenizerFast) — the two files such model
repositories carry. Needs `sentencepiece` (not part of CI's environment: the fixture is
committed).

usage: python tools/make_spm_fixture.py BOOK.txt OUT_DIR
"""
import io, json, os, sys

import sentencepiece as spm
from tokenizers import normalizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

book, out = sys.argv[1], sys.argv[2]
text = open(book, encoding="utf-8").read()[:400_000]
os.makedirs(out, exist_ok=True)
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text.splitlines()),
    model_writer=model,
    model_type="bpe",
    vocab_size=1000,
    byte_fallback=True,
    character_coverage=0.9995,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    num_threads=1,
)
with open(os.path.join(out, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))


proto = import_protobuf().ModelProto()
proto.ParseFromString(model.getvalue())
vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
fast = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
# The legacy form real Llama 2 / TinyLlama / Mistral repositories carry: "▁" prepended and
# spaces replaced by the normalizer, no pre-tokenizer.
fast.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                        normalizers.Replace(" ", "\u2581")])
fast.pre_tokenizer = None
fast.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
tok = PreTrainedTokenizerFast(tokenizer_object=fast, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>", add_bos_token=True, add_eos_token=False,
                              clean_up_tokenization_spaces=False, legacy=True)
tok.save_pretrained(out)
for f in os.listdir(out):
    if f not in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(out, f))
# The converted tokenizer encodes as SentencePiece does.
for probe in ["It is a truth universally acknowledged, 1865 \u00e9t\u00e9 \u4e2d  two  spaces",
              "  leading\tand trailing  \n\nlines\r\n", text[1000:3000]]:
    assert tok(probe)["input_ids"] == [1] + sp.encode(probe), (probe, tok(probe)["input_ids"],
                                                              sp.encode(probe))
print(json.dumps({"vocab": len(tok), "files": sorted(os.listdir(out))}))
