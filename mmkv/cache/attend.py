"""Attention split over parts of a cache, merged exactly with log-sum-exp (flash-decoding style).

A compressed layer holds several parts (quantized segments, a full-precision recent window);
attention over their union equals the lse-weighted merge of attention over each part, so no
part ever needs to be materialized next to another. This is the PyTorch path; the fused Triton
kernels in `mmkv.kernels` compute the same thing without dequantizing to memory.
"""
from __future__ import annotations

import torch


def causal_mask(lq: int, lk: int, device) -> torch.Tensor | None:
    """Bottom-right aligned causal mask [lq, lk] (True = visible): the lq queries are the last lq
    keys, everything before them is visible. None when every key is visible (lq == 1)."""
    if lq <= 1:
        return None
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril_(lk - lq)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                      mask: torch.Tensor | None = None,
                      logw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over one part of the keys, with its log-sum-exp.

    q: [B, Hq, Lq, D]; k, v: [B, Hk, Lk, D] with Hq % Hk == 0 (GQA); mask: [Lq, Lk] bool or None;
    logw: [Hk, Lk] log-weights added to every query's logits of that key (a mass merge: an entry
    standing for n merged entries weighs as n), or None.
    Returns out [B, Hq, Lq, D] (fp32, normalized within the part) and lse [B, Hq, Lq] (fp32).
    Rows whose keys are all masked get out = 0 and lse = -inf.
    """
    b, hq, lq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    qg = q.float().reshape(b, hk, g * lq, d)                             # [B, Hk, G*Lq, D]
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scaling         # [B, Hk, G*Lq, Lk]
    s = s.view(b, hk, g, lq, -1)
    if logw is not None:
        s = s + logw.to(s.device, torch.float32)[None, :, None, None, :]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                     # [B, Hk, G, Lq]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.matmul(p.view(b, hk, g * lq, -1), v.float())            # [B, Hk, G*Lq, D]
    return out.view(b, hq, lq, d), lse.view(b, hq, lq)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine [(out_i, lse_i)] from disjoint key sets into the attention over their union."""
    lses = torch.stack([lse for _, lse in parts])                        # [P, B, Hq, Lq]
    m = lses.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)                                              # [P, B, Hq, Lq]
    num = sum(w[i].unsqueeze(-1) * o for i, (o, _) in enumerate(parts))
    return num / w.sum(0).clamp_min(1e-30).unsqueeze(-1)
