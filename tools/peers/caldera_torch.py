#!/usr/bin/env python3
"""An independent torch (CPU) implementation of what `pumice compress` does by default (CALDERA
with incoherence processing), for side-by-side timing and fidelity (issue 15).

Written from the method's description (design/methods.md), not from pumice's code; the
calibration, the stage order and the output are gptq_torch.py's (`run`). Per weight W (m × n)
with its input Hessian H (n × n, f64):
- incoherence: W ← T_m W T_nᵀ, H ← T_n H T_nᵀ with T = (Hadamard_{2^a} ⊗ B_k)·diag(±1)/√2^a
  (B_k a random orthogonal block for the odd part k of the size); undone at the end;
- rank: the largest k with Q's bits + Lᵀ's + R's ≤ `--target-bpw` · m · n, counting codes in
  whole 32-bit words per row and an f16 scale (and an f16 zero where the grid stores one) per
  group;
- `--outer` iterations: A = W − Q; R from the rank-k SVD of A·S (S the Cholesky factor of the
  damped H): R = √Σ Vᵀ S⁻¹, quantized; `--inner` rounds of L ← A H Rᵀ (R H Rᵀ)⁻¹ (quantized as
  Lᵀ, groups along m) and R ← (LᵀL)⁻¹ Lᵀ A (quantized), keeping the pair of least
  tr((A − LR) H (A − LR)ᵀ); then Q ← GPTQ(W − LR, H) on the backbone grid; the iterate of least
  tr(ΔW H ΔWᵀ) is kept;
- grids: Q `--bits` (2) midrise in groups of `--group-size` (64): scale = 2·max|x|/maxq in f16,
  zero maxq/2 implied; L and R `--lr-bits` (4) asymmetric in groups of `--lr-group-size` (64),
  f16 scale and integer zero; both with the least-squares clip search of gptq_torch.py.

Evaluate the output with `pumice eval OUT --ref MODEL ...`. Prints one JSON line with wall time
by stage (gptq_torch.py's) and the mean relative weighted error of the kept iterates.
"""
import argparse
import math

import torch

from gptq_torch import add_common_args, f16, group_params, ldlq, run


def midrise_params(w, bits, clip):
    """Per-row scale of a midrise grid for the columns of w (rows × g); zero = maxq/2."""
    maxq = float(2 ** bits - 1)
    zero = maxq / 2.0
    m0 = torch.maximum(w.max(dim=1).values.clamp(min=0.0), -w.min(dim=1).values.clamp(max=0.0))
    best_err = torch.full((w.shape[0],), float("inf"))
    best_s = torch.zeros(w.shape[0])
    for t in range(10 if clip else 1):
        m = m0 * torch.tensor((20 - t) * 0.05, dtype=torch.float32)
        m = torch.where(m == 0, torch.ones_like(m), m)
        s = torch.clamp(f16(2.0 * m / maxq), min=2.0 ** -24)
        q = torch.clamp(torch.round(w / s[:, None] + zero), 0, maxq)
        err = ((w - s[:, None] * (q - zero)) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s, torch.full_like(best_s, zero)


def rtn(x, bits, group, clip):
    """Round to nearest on the asymmetric grid, per row, groups along the row (f32 in, out)."""
    x = x.float()
    maxq = float(2 ** bits - 1)
    out = torch.empty_like(x)
    for g0 in range(0, x.shape[1], group):
        g = x[:, g0:g0 + group]
        s, z = group_params(g, bits, clip)
        out[:, g0:g0 + group] = s[:, None] * (torch.clamp(torch.round(g / s[:, None] + z[:, None]), 0, maxq) - z[:, None])
    return out


def hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def transform(n, gen):
    """An orthogonal n × n incoherence transform (dense, f64)."""
    pow2 = n & -n
    k = n // pow2
    block = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0]
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return torch.kron(hadamard(pow2), block.contiguous()) * signs[None, :] / math.sqrt(pow2)


def grid_bits(rows, cols, bits, group, zeros):
    if rows == 0:
        return 0
    words = -(-cols * bits // 32)
    groups = -(-cols // group)
    return rows * (words * 32 + groups * 16 * (2 if zeros else 1))


def rank_for_budget(m, n, a):
    budget = math.floor(a.target_bpw * m * n)
    q = grid_bits(m, n, a.bits, a.group_size, False)
    if q > budget:
        return 0
    k = 0
    while k < min(m, n) and q + grid_bits(k + 1, m, a.lr_bits, a.lr_group_size, True) \
            + grid_bits(k + 1, n, a.lr_bits, a.lr_group_size, True) <= budget:
        k += 1
    return k


def spd_inv(x):
    ridge = 0.0
    scale = max(float(torch.diagonal(x).abs().mean()), 1e-30)
    while True:
        c, info = torch.linalg.cholesky_ex(x + ridge * torch.eye(x.shape[0], dtype=x.dtype))
        if int(info) == 0:
            return torch.cholesky_inverse(c)
        ridge = 1e-10 * scale if ridge == 0.0 else ridge * 100.0


def caldera(w, h, a, gen, errors):
    m, n = w.shape
    w = w.double()
    tm, tn = transform(m, gen), transform(n, gen)
    wr = tm @ w @ tn.T
    hr = tn @ h @ tn.T
    k = rank_for_budget(m, n, a)
    hd = hr.clone()
    hd += torch.eye(n, dtype=torch.float64) * (a.damp * torch.diagonal(hr).mean())
    s = torch.linalg.cholesky(hd)
    s_inv = torch.linalg.solve_triangular(s, torch.eye(n, dtype=torch.float64), upper=False)
    hinv_u = torch.linalg.cholesky(torch.cholesky_inverse(s), upper=True).float()
    wf = wr.float()
    norm = float(((wr @ hr) * wr).sum())
    q = torch.zeros(m, n, dtype=torch.float64)
    best = (float("inf"), None)
    for _ in range(a.outer):
        amat = wr - q
        lr = torch.zeros(m, n, dtype=torch.float64)
        if k > 0:
            u, sig, vt = torch.linalg.svd(amat @ s, full_matrices=False)
            r = rtn((sig[:k, None].sqrt() * vt[:k]) @ s_inv, a.lr_bits, a.lr_group_size, True).double()
            ah = amat @ hr
            best_lr = (float("inf"), None)
            for _ in range(a.inner):
                l = (ah @ r.T) @ spd_inv(r @ hr @ r.T)
                l = rtn(l.T, a.lr_bits, a.lr_group_size, True).double().T
                r = spd_inv(l.T @ l) @ (l.T @ amat)
                r = rtn(r, a.lr_bits, a.lr_group_size, True).double()
                d = amat - l @ r
                e = float(((d @ hr) * d).sum())
                if e < best_lr[0]:
                    best_lr = (e, l @ r)
            lr = best_lr[1]
        q = ldlq((wr - lr).float(), hinv_u, a.bits, a.group_size, True, midrise_params).double()
        d = wr - q - lr
        rel = float(((d @ hr) * d).sum()) / norm
        if rel < best[0]:
            best = (rel, q + lr)
    errors.append(best[0])
    return (tm.T @ best[1] @ tn).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--lr-bits", type=int, default=4)
    ap.add_argument("--lr-group-size", type=int, default=64)
    ap.add_argument("--target-bpw", type=float, default=2.5)
    ap.add_argument("--outer", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(a.seed)
    errors = []
    run(a, "torch-cpu caldera", lambda _l, _n, w, h: caldera(w, h, a, gen, errors))
    print(f"mean relative weighted error {sum(errors) / len(errors):.5f} over {len(errors)} matrices")


if __name__ == "__main__":
    main()
