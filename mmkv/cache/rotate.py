"""Quantization in a rotated basis: an orthogonal R [D, D] applied to keys and values before their
codes are computed (QuaRot, Ashkboos et al., NeurIPS 2024, arXiv 2404.00456, section 4: the KV
cache quantized after a Hadamard rotation of each head).

Why it helps a 2-bit cache: a few channels of a head carry most of the keys' energy, and the
queries are large in those same channels, so their quantization error is what the logits feel
(q . e weights the error of channel c by q_c). A rotation spreads every channel over all of them:
the error becomes about equal across channels, and the values' per-token groups no longer have a
few outliers that stretch the scale of every other channel in the group. Attention is unchanged by
an exact rotation: q . k = (q R) . (k R) and softmax(.) V = (softmax(.) V R) R^T, so

- dequantizing returns (codes' values) R^T, the tensor in its own basis (`RotatedQuant.dequantize`);
- a fused kernel reads the rotated codes with the query rotated (q R) and rotates its output
  back (`QuantSegment.fused_attention`).

R is the Sylvester-Hadamard matrix H_D / sqrt(D) with its rows' signs flipped by a fixed
pseudo-random +-1 draw (seed 0), QuaRot's randomized Hadamard, when D is a power of two; for other
head dims a fixed random orthogonal matrix (the Q of a seeded Gaussian's QR). It is a constant of
the format, regenerated from D (never stored with the cache, so no byte of the cache is R; it is
D * D fp32 once per process and device: 16 KiB at D = 64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import QuantTensor, WrappedCodes

_ROTATIONS: dict = {}


def rotation(d: int, device=None) -> torch.Tensor:
    """The fixed orthogonal rotation of head dim `d`, fp32 [d, d] (module docstring)."""
    key = (d, str(device))
    if key not in _ROTATIONS:
        g = torch.Generator().manual_seed(0)
        if d >= 1 and d & (d - 1) == 0:
            h = torch.ones(1, 1, dtype=torch.float64)
            while h.shape[0] < d:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
            signs = torch.randint(0, 2, (d, 1), generator=g).double() * 2 - 1
            r = signs * h / d ** 0.5
        else:
            q, rr = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            r = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)  # a unique Q (Haar-distributed)
        _ROTATIONS[key] = r.float().to(device)
    return _ROTATIONS[key]


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] in the rotated basis (x R), fp32."""
    return x.float() @ rotation(x.shape[-1], x.device)


def unrotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] from the rotated basis back to its own (x R^T), fp32."""
    return x.float() @ rotation(x.shape[-1], x.device).T


@dataclass
class RotatedQuant(WrappedCodes):
    """A quantized tensor whose codes hold x R (R = `rotation(D)`); same interface as QuantTensor
    (num_tokens, nbytes, dequantize, cat, select). `dequantize` returns x itself (codes' values
    times R^T). It has no packed-code attributes of its own, so a fused kernel that reads a
    QuantTensor's fields never mistakes it for one: `QuantSegment.fused_attention` unwraps it and
    rotates the query and the output instead."""

    inner: QuantTensor  # the codes of x R

    @property
    def axis(self) -> str:
        return self.inner.axis

    @property
    def stats(self) -> int:
        return self.inner.stats

    @property
    def anchor(self) -> torch.Tensor | None:
        return self.inner.anchor

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        return unrotate(self.inner.dequantize(torch.float32, start, end)).to(dtype)

    def cat(self, other: "RotatedQuant") -> "RotatedQuant":
        if not isinstance(other, RotatedQuant):
            raise ValueError("cannot concatenate a rotated quantized tensor with an unrotated one")
        return RotatedQuant(self.inner.cat(other.inner))

    def select(self, idx: torch.Tensor) -> "RotatedQuant":
        return RotatedQuant(self.inner.select(idx))
