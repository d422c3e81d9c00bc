"""Every tensor of IN.safetensors (f32) through gguf-py's own Q8_0 quantizer and back
(gguf.quants.quantize / dequantize: llama.cpp's Python reference of quantize_row_q8_0), for
comparing with a Q8_0 tensor pumice wrote.

usage: python gguf_q8_0.py IN.safetensors OUT.safetensors
"""
import sys
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file, save_file

t = load_file(sys.argv[1])
out = {}
for k, v in t.items():
    q = quantize(np.ascontiguousarray(v, dtype=np.float32), GGMLQuantizationType.Q8_0)
    out[k] = np.ascontiguousarray(dequantize(q, GGMLQuantizationType.Q8_0).astype(np.float32).reshape(v.shape))
save_file(out, sys.argv[2])
