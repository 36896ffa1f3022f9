"""Kernels with their PyTorch references and dispatchers.

Every kernel lives beside a PyTorch reference in the same module; a dispatcher picks the Triton
kernel on CUDA and the reference elsewhere. Tests run the kernels on CPU with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch

from ..cache.attend import merge_partials, partial_attention


def segment_attention(query: torch.Tensor, segment, scaling: float, block: int = 4096):
    """Attention of `query` [B, Hq, Lq, D] over one compressed segment -> (out, lse).

    Uses the segment's fused kernel when it has one for this device, else dequantizes
    `block` tokens at a time (never the whole segment at once)."""
    fused = getattr(segment, "fused_attention", None)
    if fused is not None:
        res = fused(query, scaling)
        if res is not None:
            return res
    parts = [partial_attention(query, k, v, scaling) for k, v in segment.blocks(query.dtype, block)]
    if len(parts) == 1:
        return parts[0]
    out = merge_partials(parts)
    lse = torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)
    return out, lse
