#!/usr/bin/env python3
"""An independent torch (CPU) implementation of `pumice finetune --lora-rank R`, for side-by-side
speed and loss (issue 16): transformers' Llama in float32 with PEFT LoRA adapters.

The same job, written from the method's description, not from pumice:
- data: `--samples` windows of `--len` tokens drawn from the `--data` text as pumice draws them
  (gptq_torch.draw_windows), visited in pumice's order (a SplitMix64 Fisher-Yates shuffle seeded
  by seed ^ 0x5EED_F17E, sequences taken from the end, reshuffled when used up);
- adapters: LoRA of rank r, α (scale α/r) on the seven linears of every layer, A uniform in
  ±1/√in, B = 0 (PEFT's default initialization), the model frozen;
- objective: next-token cross-entropy (mean over the positions that have a next token), or with
  `--teacher DIR` KL(teacher ‖ model) per position (mean over all positions);
- optimizer: AdamW (β 0.9/0.999, ε 1e-8, no weight decay), linear warm-up over `--warmup` steps
  (default a tenth), cosine decay to a tenth of `--lr`, global gradient norm clipped to 1;
  `--batch` sequences per step;
- held-out: the first `--eval-windows` windows of `--len` tokens of `--eval-text`: KL(teacher ‖
  model) over every position (the teacher: `--teacher`, else the model without adapters) and
  perplexity over positions 0..len−2, before and after.

Prints one JSON line: train seconds, tokens/s, the mean loss of the first and last ten steps,
held-out before/after.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from gptq_torch import MASK, draw_windows, splitmix


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--teacher")
    ap.add_argument("--data", required=True, nargs="+")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--eval-text")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    teacher = None
    if a.teacher:
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    docs = []
    for f in a.data:
        with open(f, encoding="utf-8") as fh:
            docs.append(tok(fh.read(), add_special_tokens=False)["input_ids"])
    data = draw_windows(docs, a.samples, a.len, a.seed)
    held = None
    if a.eval_text:
        with open(a.eval_text, encoding="utf-8") as fh:
            ids = tok(fh.read(), add_special_tokens=False)["input_ids"]
        n = min(len(ids) // a.len, a.eval_windows)
        held = torch.tensor(ids[: n * a.len], dtype=torch.long).view(n, a.len)

    cfg = LoraConfig(
        r=a.rank,
        lora_alpha=a.alpha if a.alpha is not None else 2 * a.rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        bias="none",
    )
    model = get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def teacher_logits(x):
        with torch.no_grad():
            if teacher is not None:
                return teacher(x).logits
            with model.disable_adapter():
                return model(x).logits

    def loss_of(x):
        z = model(x).logits
        if teacher is not None:
            lt = F.log_softmax(teacher_logits(x), -1)
            return (lt.exp() * (lt - F.log_softmax(z, -1))).sum(-1).mean()
        return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), x[:, 1:].reshape(-1))

    def held_out():
        if held is None:
            return None
        kl, nll, rows, scored = 0.0, 0.0, 0, 0
        with torch.no_grad():
            for i in range(0, held.shape[0], a.batch):
                x = held[i : i + a.batch]
                z = F.log_softmax(model(x).logits.double(), -1)
                lt = F.log_softmax(teacher_logits(x).double(), -1)
                kl += (lt.exp() * (lt - z)).sum().item()
                nll -= z[:, :-1].gather(-1, x[:, 1:, None]).sum().item()
                rows += x.numel()
                scored += x.shape[0] * (a.len - 1)
        return {"kl": kl / rows, "perplexity": math.exp(nll / scored)}

    before = held_out()
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warmup = a.warmup if a.warmup is not None else a.steps // 10

    def schedule(s):
        if s <= warmup:
            return s / max(warmup, 1)
        p = min((s - warmup) / max(a.steps - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    state, order = (a.seed ^ 0x5EEDF17E) & MASK, []

    def next_seq():
        nonlocal state, order
        if not order:
            order = list(range(data.shape[0]))
            for i in range(len(order) - 1, 0, -1):
                state, r = splitmix(state)
                j = r % (i + 1)
                order[i], order[j] = order[j], order[i]
        return order.pop()

    per = min(a.batch, data.shape[0])
    losses = []
    model.train()
    t0 = time.perf_counter()
    for s in range(1, a.steps + 1):
        for g in opt.param_groups:
            g["lr"] = a.lr * schedule(s)
        x = data[[next_seq() for _ in range(per)]]
        loss = loss_of(x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    model.eval()
    after = held_out()
    k = min(10, len(losses))
    print(
        json.dumps(
            {
                "peer": "finetune_torch",
                "steps": a.steps,
                "tokens_per_step": per * a.len,
                "train_seconds": train_s,
                "tokens_per_second": a.steps * per * a.len / train_s,
                "first_loss": sum(losses[:k]) / k,
                "last_loss": sum(losses[-k:]) / k,
                "before": before,
                "after": after,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
