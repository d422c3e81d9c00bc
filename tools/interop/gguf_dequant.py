"""Every tensor of a GGUF file as gguf-py (llama.cpp's own Python package) reads and
dequantizes it, for comparing with pumice's values bit for bit.

usage: python gguf_dequant.py FILE.gguf OUT.safetensors

Writes each tensor as F32 under its GGUF name, in numpy's shape (the reverse of ggml's ne), and
prints one JSON line: the metadata keys with scalar values, and each tensor's ggml type.
"""
import json, sys
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

r = GGUFReader(sys.argv[1])
out, types = {}, {}
for t in r.tensors:
    v = dequantize(t.data, t.tensor_type).astype(np.float32)
    shape = [int(d) for d in reversed(t.shape.tolist())]
    out[t.name] = np.ascontiguousarray(v.reshape(shape))
    types[t.name] = t.tensor_type.name
save_file(out, sys.argv[2])
meta = {}
for k, f in r.fields.items():
    if len(f.types) == 1 and f.types[0].name != "STRING":
        meta[k] = f.parts[f.data[0]].tolist()[0]
    elif len(f.types) == 1:
        meta[k] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    else:
        meta[k] = f"array[{len(f.data)}]"
print(json.dumps({"metadata": meta, "types": types}))
