"""Logits of a model directory as transformers computes them (float32, CPU), for comparing
pumice's exports with pumice's own forward pass.

usage: python hf_logits.py MODEL_DIR OUT.safetensors --ids 0,5,7;3,9,1 [--adapter DIR]

MODEL_DIR is any directory transformers loads (dense, compressed-tensors, GPTQ); a
compressed-tensors model is dequantized on load (CompressedTensorsConfig(dequantize=True)); a GPTQ
model is loaded by transformers + GPTQModel and every quantized module replaced by a float32
Linear of GPTQModel's own dequantization (its unpacking of qweight/qzeros/g_idx, with the f16
scales widened to f32 first, so scale * (q - z) is exact); the printed line then also gives
`gptq_f16_max_diff`, how far GPTQModel's native f16 dequantization is from that value rounded
to f16 (0: its f16 serving path computes exactly these weights); with
--gguf FILE the model is MODEL_DIR/FILE, dequantized by transformers' GGUF loader (gguf-py).
--adapter puts a PEFT adapter on top. Writes `input_ids` I64 [nseq, T] and `logits` F32
[nseq, T, vocab], and prints one JSON line: what was loaded and how.
"""
import argparse, json, os
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--ids", required=True, help="sequences separated by ';', ids by ','")
ap.add_argument("--adapter")
ap.add_argument("--gguf", help="a GGUF file inside MODEL_DIR (transformers dequantizes it)")
a = ap.parse_args()
torch.set_num_threads(max(1, os.cpu_count() or 1))

kw = {}
if a.gguf:
    kw["gguf_file"] = a.gguf
    qc = {"quant_method": "gguf"}
else:
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    qc = cfg.get("quantization_config") or {}
if qc.get("quant_method") == "compressed-tensors":
    from transformers import CompressedTensorsConfig
    kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw)
info = {}
if qc.get("quant_method") == "gptq":
    # GPTQModel computes scale * (q - z) in the scales' f16 even in a float32 model; dequantize
    # with its own code, once natively (f16) and once with f32 scales (exact), and put the exact
    # weights in plain float32 Linears.
    f16_diff, n, kernel = 0.0, 0, None
    for name, mod in list(model.named_modules()):
        if not hasattr(mod, "dequantize_weight") or not hasattr(mod, "qweight"):
            continue
        kernel = f"{type(mod).__module__}.{type(mod).__name__}"
        with torch.no_grad():
            native = mod.dequantize_weight().detach().T.to(torch.float16).float()
            mod.scales = mod.scales.float()
            exact = mod.dequantize_weight().detach().T.float().contiguous()
            f16_diff = max(f16_diff, (native - exact.half().float()).abs().max().item())
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.copy_(exact)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.float())
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, lin)
        n += 1
    info = {"gptq_modules": n, "gptq_kernel": kernel, "gptq_f16_max_diff": f16_diff}
if a.adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, a.adapter)
model.eval()
seqs = [[int(t) for t in s.split(",")] for s in a.ids.split(";")]
ids = torch.tensor(seqs, dtype=torch.long)
with torch.no_grad():
    logits = model(ids).logits.float().contiguous()
save_file({"input_ids": ids.contiguous(), "logits": logits}, a.out)
print(json.dumps({"model": a.model, "adapter": a.adapter, "quant_method": qc.get("quant_method"),
                  "class": type(model).__name__, "shape": list(logits.shape), **info}))
