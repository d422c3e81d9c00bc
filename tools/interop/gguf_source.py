"""The source (uncompressed) model as a GGUF file, for llama.cpp's own quantizer and as the
KL-divergence base of `llama-perplexity`: every tensor of a pumice GGUF export of that model
(metadata, tokenizer, tensor order, llama's q/k row order) with each linear weight replaced by
the source's, in the source dtype (bf16 stays bf16, so nothing is rounded).

usage: python gguf_source.py SOURCE_DIR PUMICE.gguf OUT.gguf

llama.cpp's convert_hf_to_gguf.py refuses tokenizers whose pre-tokenizer it does not know by
hash (the asset models'); pumice's export names it, so its metadata are reused here.
"""
import sys
import json
import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter, GGUFValueType, GGMLQuantizationType
from safetensors import safe_open

src, pumice_gguf, out = sys.argv[1:4]
cfg = json.load(open(f"{src}/config.json"))
r = GGUFReader(pumice_gguf)
arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
w = GGUFWriter(out, arch)
for name, f in r.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    vtype = f.types[0]
    if vtype == GGUFValueType.ARRAY:
        w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
    else:
        w.add_key_value(name, f.contents(), vtype)

names = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
files = [f"{src}/model.safetensors"]
try:
    idx = json.load(open(f"{src}/model.safetensors.index.json"))
    files = sorted({f"{src}/{v}" for v in idx["weight_map"].values()})
except FileNotFoundError:
    pass
source = {}
for fn in files:
    with safe_open(fn, "pt") as sf:
        for k in sf.keys():
            source[k] = sf.get_tensor(k)


def llama_rows(w, heads):
    # GGUF row h·d + 2i + j is HF row h·d + j·d/2 + i.
    rows = w.shape[0]
    d = rows // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


for t in r.tensors:
    parts = t.name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in names and parts[3] == "weight":
        hf = source[f"model.layers.{parts[1]}.{names[parts[2]]}.weight"]
        if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if parts[2] == "attn_q" else cfg.get(
                "num_key_value_heads", cfg["num_attention_heads"])
            hf = llama_rows(hf, heads)
        if hf.dtype == torch.bfloat16:
            # As bytes [rows, 2·cols]: gguf-py derives the element shape from the byte shape.
            raw = hf.contiguous().view(torch.int16).numpy().view(np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=GGMLQuantizationType.BF16)
        else:
            w.add_tensor(t.name, hf.float().numpy())
    else:
        # The reader's data are float arrays (F32, F16) or bytes in the byte shape (the rest).
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
