"""ZipVL's budget and important set (arXiv 2410.08584, Eq. 6-8): how many keys a layer keeps,
and which."""
from __future__ import annotations

import math

import torch


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
