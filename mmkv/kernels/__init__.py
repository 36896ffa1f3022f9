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
    `block` tokens at a time (never the whole segment at once). A segment's log-weights (a mass
    merge, mmkv.cache.core) are added on the block path; a segment that has them has no kernel."""
    fused = getattr(segment, "fused_attention", None)
    if fused is not None:
        res = fused(query, scaling)
        if res is not None:
            return res
    logw, parts, at = getattr(segment, "logw", None), [], 0
    for k, v in segment.blocks(query.dtype, block):  # in token order: the log-weights follow by offset
        n = k.shape[2]
        parts.append(partial_attention(query, k, v, scaling, None, None if logw is None else logw[:, at:at + n]))
        at += n
    if len(parts) == 1:
        return parts[0]
    out = merge_partials(parts)
    lse = torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)
    return out, lse


def interpreter_problem() -> str | None:
    """Why `TRITON_INTERPRET=1` cannot run mmkv's kernels with the installed packages, or None.

    Triton 3.6's interpreter turns loop bounds into ints with `int()` on 1-element arrays, which
    numpy 2.4 refuses (`only 0-dimensional arrays can be converted to Python scalars`): every
    kernel with a runtime `range()` loop fails. Triton 3.8 (checked) is fine. The compiled kernels
    are unaffected."""
    try:
        import numpy
        import triton
    except ImportError:
        return "triton is not installed"

    def version(s):
        return tuple(int(x) for x in s.split("+")[0].split(".")[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails on runtime loops with numpy {numpy.__version__} "
                "(int() of a 1-element array); the interpreter tests need triton >= 3.8 or numpy < 2.4")
    return None
