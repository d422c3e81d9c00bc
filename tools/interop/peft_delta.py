"""What a PEFT LoRA adapter adds to each weight, as PEFT itself computes it.

usage: python peft_delta.py BASE_DIR ADAPTER_DIR OUT.safetensors

BASE_DIR is a model transformers loads (only its shapes matter); PEFT puts ADAPTER_DIR on it
and every LoRA layer's `get_delta_weight` (s·B·A with PEFT's own scale: α/r, α/√r with rsLoRA,
alpha_pattern/rank_pattern) is written, float32 [out, in], under the weight's name in the base
model (`model.layers.0.self_attn.q_proj.weight`). Prints one JSON line: the modules written
and their scales.
"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

base_dir, adapter_dir, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter_dir)
deltas, scales = {}, {}
prefix = "base_model.model."
for name, mod in model.named_modules():
    if not hasattr(mod, "get_delta_weight") or "default" not in getattr(mod, "lora_A", {}):
        continue
    with torch.no_grad():
        d = mod.get_delta_weight("default").float().contiguous()
    key = name[len(prefix):] if name.startswith(prefix) else name
    deltas[key + ".weight"] = d
    scales[key + ".weight"] = float(mod.scaling["default"])
save_file(deltas, out)
print(json.dumps({"modules": len(deltas), "scales": scales}))
