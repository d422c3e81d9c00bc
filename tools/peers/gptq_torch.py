#!/usr/bin/env python3
"""An independent torch (CPU) implementation of what `pumice compress --method gptq` does, for
side-by-side timing and fidelity (issue 15).

Same inputs and the same algorithm, written from the method's description, not from pumice:
- calibration: `--samples` windows of `--len` tokens drawn from the text as pumice draws them
  (text read in Python's text mode, tokenized by the model's tokenizer without special tokens,
  window starts chosen with SplitMix64 seeded by `--seed` over the union of valid starts);
- layer by layer, true-sequential stages [q,k,v], [o], [gate,up], [down]: H = XᵀX of each
  stage's input over the calibration tokens, GPTQ (damping `--damp` × mean diagonal, blocks of
  128 columns, groups of `--group-size` whose asymmetric grid — f16 scale, integer zero — is fixed
  when the group's first column is reached, from the error-updated weights, with the same
  least-squares clip search over shrink factors 1 − t/20, t < 10), then the next stage's inputs
  computed through the quantized weights;
- output: an HF checkpoint with the dequantized weights in f32 (evaluate it with
  `pumice eval OUT --ref MODEL ...`).

Prints one JSON line with wall time by stage.
"""
import argparse
import json
import os
import shutil
import time

import torch

MASK = (1 << 64) - 1


def splitmix(state):
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def draw_windows(docs, samples, length, seed):
    starts = [max(len(d) + 1 - length, 0) for d in docs]
    total = sum(starts)
    if total == 0:
        raise SystemExit(f"no calibration file of at least {length} tokens")
    state, out = seed, []
    for _ in range(samples):
        state, r = splitmix(state)
        u, f = r % total, 0
        while u >= starts[f]:
            u -= starts[f]
            f += 1
        out.append(docs[f][u:u + length])
    return torch.tensor(out, dtype=torch.long)


def f16(x):
    return x.to(torch.float16).to(torch.float32)


def group_params(w, bits, clip):
    """Per-row (scale, zero) of an asymmetric grid for the columns of w (rows × g)."""
    maxq = float(2 ** bits - 1)
    lo0 = torch.clamp(w.min(dim=1).values, max=0.0)
    hi0 = torch.clamp(w.max(dim=1).values, min=0.0)
    best_err = torch.full((w.shape[0],), float("inf"))
    best_s = torch.zeros(w.shape[0])
    best_z = torch.zeros(w.shape[0])
    for t in range(10 if clip else 1):
        fac = torch.tensor((20 - t) * 0.05, dtype=torch.float32)
        lo, hi = lo0 * fac, hi0 * fac
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        same = lo == hi
        lo = torch.where(same, torch.full_like(lo, -1.0), lo)
        hi = torch.where(same, torch.full_like(hi, 1.0), hi)
        s = torch.clamp(f16((hi - lo) / maxq), min=2.0 ** -24)
        z = torch.clamp(torch.round(-lo / s), 0, maxq)
        q = torch.clamp(torch.round(w / s[:, None] + z[:, None]), 0, maxq)
        err = ((w - s[:, None] * (q - z[:, None])) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def prepare(h, damp):
    """Dead inputs (zero diagonal) and the upper Cholesky factor of (H + λI)⁻¹, λ = damp × mean
    diagonal, in f32."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(h.shape[0], dtype=h.dtype) * (damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return dead, hinv.float()


def ldlq(w, hinv, bits, group, clip, params=group_params, block=128):
    """GPTQ/LDLQ of w (rows × n, f32) with the upper Cholesky factor of (H + λI)⁻¹: columns in
    order, lazy blocks, each group's grid from `params` (rows × g → scale, zero) fixed at its
    first column from the error-updated weights. Returns the dequantized weights."""
    w = w.clone()
    n = w.shape[1]
    maxq = float(2 ** bits - 1)
    q_all = torch.zeros_like(w)
    s = z = None
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                g1 = min(col + group, n)
                cur = torch.cat([wb[:, i:], w[:, b1:g1]], dim=1)[:, : g1 - col]
                s, z = params(cur, bits, clip)
            x = wb[:, i]
            q = s * (torch.clamp(torch.round(x / s + z), 0, maxq) - z)
            q_all[:, col] = q
            e = (x - q) / hb[i, i]
            wb[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q_all


def gptq(w, h, bits, group, damp, clip, block=128):
    dead, hinv = prepare(h, damp)
    w = w.clone().float()
    w[:, dead] = 0.0
    return ldlq(w, hinv, bits, group, clip, group_params, block)


def add_common_args(ap):
    """The model, output and calibration arguments both peers take."""
    ap.add_argument("model")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--calib", required=True, nargs="+")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=0)


def run(a, peer, quantize):
    """Calibrate, then layer by layer and stage by stage: H = XᵀX of the stage's input (f64),
    `quantize(layer, name, weight, h)` → the dequantized weight (f32), the next stage's inputs
    through the quantized weights; write the checkpoint and print the JSON line."""
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    stages = {}
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    model.eval()
    files = []
    for p in a.calib:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".txt"))
        else:
            files.append(p)
    docs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            docs.append(tok(fh.read(), add_special_tokens=False)["input_ids"])
    ids = draw_windows(docs, a.samples, a.len, a.seed)
    stages["load_and_tokenize"] = time.perf_counter() - t0

    t = time.perf_counter()
    inner = model.model
    with torch.no_grad():
        hidden = inner.embed_tokens(ids)
        pos = torch.arange(a.len)[None, :].expand(ids.shape[0], -1)
        rot = inner.rotary_emb(hidden, pos)
        # Causal mask, explicit so every attention implementation applies it.
        mask = torch.full((a.len, a.len), float("-inf")).triu(1)[None, None]
    stages["calibration"] = time.perf_counter() - t
    # Forward passes through each stage's layer (with the Hessian hooks) and through the
    # quantized layer; the quantizer itself.
    stages["forwards_and_hessians"] = 0.0
    stages["quantization"] = 0.0
    for li, layer in enumerate(inner.layers):
        groups = [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
            ["mlp.down_proj"],
        ]
        for names in groups:
            mods = [layer.get_submodule(n) for n in names]
            hs = {}
            tp = time.perf_counter()

            def hook(mod, inp, _out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                hs[id(mod)] = hs.get(id(mod), 0) + x.T @ x

            handles = [m.register_forward_hook(hook) for m in mods[:1]]
            with torch.no_grad():
                layer(hidden, attention_mask=mask, position_embeddings=rot, position_ids=pos)
            for hd in handles:
                hd.remove()
            h = hs[id(mods[0])]
            stages["forwards_and_hessians"] += time.perf_counter() - tp
            tq = time.perf_counter()
            for name, m in zip(names, mods):
                with torch.no_grad():
                    m.weight.copy_(quantize(li, name, m.weight.data.float(), h))
            stages["quantization"] += time.perf_counter() - tq
        tp = time.perf_counter()
        with torch.no_grad():
            out = layer(hidden, attention_mask=mask, position_embeddings=rot, position_ids=pos)
        hidden = out[0] if isinstance(out, tuple) else out
        stages["forwards_and_hessians"] += time.perf_counter() - tp

    t = time.perf_counter()
    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    stages["writing"] = time.perf_counter() - t
    print(json.dumps({
        "peer": peer,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
        "stages": stages,
        "calibration_tokens": int(ids.numel()),
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-clip", action="store_true")
    a = ap.parse_args()
    run(a, "torch-cpu gptq",
        lambda _l, _n, w, h: gptq(w, h.float(), a.bits, a.group_size, a.damp, not a.no_clip))


if __name__ == "__main__":
    main()
