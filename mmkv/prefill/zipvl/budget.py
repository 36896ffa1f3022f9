"""ZipVL's budget and important set (arXiv 2410.08584, Eq. 6-8): how many keys a layer keeps,
and which; and when keeping them is slower than attending densely (the break-even)."""
from __future__ import annotations

import math

import torch

# Kept ratio p / n above which the sparse attention of one layer costs more than dense causal SDPA,
# per treatment of the unimportant rows. Measured on CPU (PyTorch path, Qwen2-0.5B layer shape, 1K-8K
# tokens; `python benchmarks/zipvl_breakeven.py`, BENCHMARKS.md): rows="keys" computes every row
# against the p kept keys under a mask (about 2 p / n of causal dense), crossing 1 at 0.55 / 0.44 /
# 0.40 of the keys at 1K / 4K / 8K tokens; rows="zero" is causal attention among the p kept tokens
# ((p / n)^2 of dense plus the gather), crossing at 0.95-0.97. The defaults take the long-prompt
# (lower) crossing, rounded down. Not measured for the Triton kernel on a GPU.
BREAK_EVEN = {"keys": 0.4, "zero": 0.9}


def adaptive_budget(received: torch.Tensor, tau: float, ratio: float | None = None) -> int:
    """Eq. 6: the fewest keys whose attention, largest first, reaches tau of the total (tau >= 1:
    all keys); with `ratio`, ceil(ratio * n) instead. At least 1."""
    n = received.numel()
    if n == 0:
        return 0
    if ratio is not None:
        return max(1, min(n, math.ceil(ratio * n)))
    if tau >= 1.0:
        return n
    c = received.float().sort(descending=True).values.cumsum(0)
    return max(1, min(n, int(torch.searchsorted(c, tau * c[-1:]).item()) + 1))


def select_important(received: torch.Tensor, nnz: torch.Tensor, p: int) -> torch.Tensor:
    """Eq. 7-8: the p keys with the largest received / nnz, as sorted long indices."""
    score = received / nnz.clamp_min(1)
    return score.topk(p).indices.sort().values


def runs_dense(p: int, n: int, dense_above: float) -> bool:
    """True when keeping p of n keys is past the break-even: the layer attends densely instead."""
    return p >= n or p > dense_above * n
