"""Budgets for KV eviction: how many entries each layer and each head keeps, and which.

`ratio` is always the fraction of entries EVICTED. The total kept over the layers compressed is
sum_l round((1 - ratio) * n_l) (n_l = entries the layer holds); the modes only move it around:

- "uniform": every layer keeps round((1 - ratio) * n_l), every head the same count.
- "layer" (ZipVL's attention-mass rule, He et al., arXiv 2410.08584, Eq. 6): a layer whose
  attention is concentrated needs fewer entries. p_l = the fewest entries whose raw mass (summed
  over heads), largest first, reaches tau of the layer's total mass. ZipVL keeps p_l; here p_l
  only sets the SHARES of the fixed total (choice: the budget must mean what it says): layer l
  keeps floor * uniform_l + (1 - floor) * total * p_l / sum p, capped at n_l, the excess passed
  on to the other layers.
- "head" (AdaKV, Feng et al., arXiv 2407.11550): within a layer keeping k entries per head on
  average (H * k in all), the top H * k scores over ALL heads are found; head h wins w_h of them
  and keeps alpha * k + (1 - alpha) * w_h (AdaKV's safeguard alpha, 0.2 as AdaKV suggests with
  GQA), rounded so the heads sum to exactly H * k. Heads then hold different counts (ragged).
- "layer+head": both.

Protected entries (sinks, text, a window) are kept first, inside the budget; if they alone
exceed it, only they are kept.
"""
from __future__ import annotations

import math

import torch

MODES = ("uniform", "layer", "head", "layer+head")


def uniform_keep(n: int, ratio: float) -> int:
    """Entries kept out of n when `ratio` of them are evicted (at least one)."""
    return max(1, min(n, n - math.floor(ratio * n + 1e-6)))


def mass_entries(mass: torch.Tensor, tau: float) -> int:
    """ZipVL Eq. 6: the fewest entries whose mass (summed over heads), largest first, reaches
    tau of the total. mass [H, n] -> p."""
    m = mass.float().sum(0).sort(descending=True).values
    total = float(m.sum())
    if total <= 0:
        return m.numel()
    c = m.cumsum(0)
    return int(torch.searchsorted(c, torch.tensor(tau * total, dtype=c.dtype, device=c.device)).clamp_max(m.numel() - 1)) + 1


def layer_budgets(sizes: list[int], ratio: float, needs: list[int] | None = None, floor: float = 0.2) -> list[int]:
    """Entries each layer keeps. sizes: n_l; needs: p_l from `mass_entries` (None: uniform).
    The sum is always sum_l uniform_keep(n_l, ratio)."""
    base = [uniform_keep(n, ratio) for n in sizes]
    if needs is None or len(sizes) <= 1:
        return base
    total = sum(base)
    share = [max(p, 1) for p in needs]
    want = [floor * b + (1 - floor) * total * s / sum(share) for b, s in zip(base, share)]
    out = [0] * len(sizes)
    free = list(range(len(sizes)))
    left = total
    while free:  # cap at n_l, hand the excess to the layers that are not full (water filling)
        w = sum(want[i] for i in free)
        capped = [i for i in free if want[i] / w * left >= sizes[i]]
        if not capped:
            break
        for i in capped:
            out[i] = sizes[i]
            left -= sizes[i]
            free.remove(i)
    if free:
        w = sum(want[i] for i in free)
        alloc = [want[i] / w * left for i in free]
        ints = [max(1, math.floor(a)) for a in alloc]
        rem = left - sum(ints)
        order = sorted(range(len(free)), key=lambda j: alloc[j] - math.floor(alloc[j]), reverse=True)
        for j in order:  # largest remainders first; never above n_l
            if rem <= 0:
                break
            if ints[j] < sizes[free[j]]:
                ints[j] += 1
                rem -= 1
        for i, v in zip(free, ints):
            out[i] = min(v, sizes[i])
    return out


def head_budgets(scores: torch.Tensor, keep: int, protect: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """AdaKV allocation: [H] entries per head, summing to H * keep.
    scores, protect: [H, n]; protected entries are kept in their head first."""
    h, n = scores.shape
    n_prot = protect.sum(1)                                                       # [H]
    free_budget = int(h * keep - n_prot.sum())
    if free_budget <= 0:
        return n_prot.clone()
    pri = scores.float().masked_fill(protect, float("-inf"))
    avail = n - n_prot                                                            # [H]
    top = pri.reshape(-1).topk(min(free_budget, int(avail.sum()))).indices
    wins = torch.bincount(top // n, minlength=h).to(scores.device)               # [H]
    even = free_budget / h
    want = (alpha * even + (1 - alpha) * wins.float()).minimum(avail.float())
    out = want.floor().long()
    rem = free_budget - int(out.sum())
    frac = (want - want.floor()).masked_fill(out >= avail, -1.0)
    while rem > 0:  # largest remainders first, then any head with room
        room = out < avail
        if not bool(room.any()):
            break
        j = int(frac.masked_fill(~room, -2.0).argmax())
        out[j] += 1
        frac[j] = -1.0
        rem -= 1
    return out + n_prot


def select(scores: torch.Tensor, counts: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
    """Keep mask [H, n]: the protected entries, then the highest scores, `counts[h]` in head h
    (ties: the earlier entry in storage order)."""
    h, n = scores.shape
    pri = scores.float().masked_fill(protect, float("inf"))
    order = pri.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    return rank < counts.to(scores.device).view(h, 1)
