"""Perplexity of a GGUF model as llama.cpp computes it (through llama-cpp-python, which builds
llama.cpp from source), under pumice eval's protocol: the token ids of --token-file cut into
consecutive non-overlapping windows of --ctx tokens (tail dropped, no BOS added), each window
scored on its positions 1..ctx-1, perplexity = exp(mean NLL).

usage: python llama_cpp_ppl.py MODEL.gguf --token-file IDS.txt --ctx 256 [--lora ADAPTER.gguf]
       [--max-windows N]
Prints one JSON line.
"""
import argparse, json, math
import numpy as np
import llama_cpp
from llama_cpp import Llama

# llama.cpp's extra CPU buffer types (AMX / weight repacking) crashed (SIGSEGV) on the first
# quantized matmul of the 192-wide asset model on this AMX CPU; plain CPU buffers do not.
_default = llama_cpp.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False
    return p
llama_cpp.llama.llama_cpp.llama_model_default_params = _params

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--token-file", required=True)
ap.add_argument("--ctx", type=int, default=256)
ap.add_argument("--lora")
ap.add_argument("--max-windows", type=int)
a = ap.parse_args()
ids = [int(t) for t in open(a.token_file).read().split()]
kw = {"lora_path": a.lora} if a.lora else {}
llm = Llama(model_path=a.model, n_ctx=a.ctx, n_batch=a.ctx, logits_all=True, verbose=False,
            n_threads=2, **kw)
windows = len(ids) // a.ctx
if a.max_windows:
    windows = min(windows, a.max_windows)
nll, n = 0.0, 0
for w in range(windows):
    win = ids[w * a.ctx:(w + 1) * a.ctx]
    llm.reset()
    llm.eval(win)
    logits = np.asarray(llm.scores[: a.ctx], dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    for p in range(1, a.ctx):
        nll -= logp[p - 1, win[p]]
        n += 1
print(json.dumps({"model": a.model, "lora": a.lora, "ctx": a.ctx, "windows": windows,
                  "positions": n, "mean_nll": nll / n, "perplexity": math.exp(nll / n)}))
