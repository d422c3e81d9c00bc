"""Check a GGUF's SentencePiece-style ("llama") vocabulary, read by gguf-py, against the source
model's own tokenizer files read by independent code: every piece, score and type of
tokenizer.model (parsed with transformers' copy of SentencePiece's protobuf schema), as
llama.cpp's converter would write them; without tokenizer.model, tokenizer.json's tokens with
scores decreasing along its merges. When llama-cpp-python is importable, also tokenizes TEXT...
with llama.cpp from the GGUF and with transformers from the source directory.

usage: python gguf_spm_check.py MODEL.gguf SOURCE_DIR [TEXT...]
Prints one JSON line: the checks (true when they hold) and the mismatches found.
"""
import json, os, sys
from gguf import GGUFReader

gguf_path, src, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
r = GGUFReader(gguf_path)


def field(name):
    f = r.fields[name]
    if len(f.types) == 1:
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0].name == "STRING" else v.tolist()[0]
    if f.types[1].name == "STRING":
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    return [f.parts[i].tolist()[0] for i in f.data]


tokens = field("tokenizer.ggml.tokens")
scores = field("tokenizer.ggml.scores")
types = field("tokenizer.ggml.token_type")
res = {"model": field("tokenizer.ggml.model"), "n": len(tokens),
       "add_space_prefix": field("tokenizer.ggml.add_space_prefix"),
       "add_bos_token": field("tokenizer.ggml.add_bos_token"),
       "bos": field("tokenizer.ggml.bos_token_id"), "eos": field("tokenizer.ggml.eos_token_id"),
       "unk": field("tokenizer.ggml.unknown_token_id"), "mismatches": []}
tj = json.load(open(os.path.join(src, "tokenizer.json"), encoding="utf-8"))
special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
spm_file = os.path.join(src, "tokenizer.model")
if os.path.exists(spm_file):
    from transformers.utils import sentencepiece_model_pb2_new as pb
    m = pb.ModelProto()
    m.ParseFromString(open(spm_file, "rb").read())
    res["source"] = "tokenizer.model"
    for i, p in enumerate(m.pieces):
        want_type = 3 if i in special and p.type != 6 else p.type
        got = (tokens[i], scores[i], types[i])
        if got != (p.piece, p.score, want_type):
            res["mismatches"].append([i, list(got), [p.piece, p.score, want_type]])
else:
    res["source"] = "tokenizer.json merges"
    vocab = tj["model"]["vocab"]
    for t, i in vocab.items():
        if tokens[i] != t:
            res["mismatches"].append([i, tokens[i], t])
    seen, last = set(), None
    for mg in tj["model"]["merges"]:
        a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
        t = vocab.get(a + b)
        if t is None or t in seen:
            continue
        seen.add(t)
        if last is not None and not scores[t] < last:
            res["mismatches"].append(["score order", a + b, scores[t], last])
        last = scores[t]
    for t, i in vocab.items():
        want = 6 if (len(t) == 6 and t.startswith("<0x") and t.endswith(">")) else None
        if want and types[i] != want:
            res["mismatches"].append(["byte type", t, types[i]])
res["pieces_equal"] = not res["mismatches"]
try:
    from llama_cpp import Llama
except ImportError:
    Llama = None
if Llama is not None and texts:
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(src)
    ll = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    res["llama_cpp_tokens_equal"] = {}
    for path in texts:
        t = open(path, encoding="utf-8", newline="").read()
        want = ref(t)["input_ids"]
        got = ll.tokenize(t.encode("utf-8"), add_bos=True, special=False)
        res["llama_cpp_tokens_equal"][os.path.basename(path)] = [got == want, len(want)]
print(json.dumps(res))
sys.stdout.flush()
os._exit(0)  # llama-cpp-python's finalizers fail at interpreter shutdown
