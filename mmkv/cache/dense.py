"""Full-precision entries of a layer kept as a segment of their own, apart from the layer's
append tail: the levels of a bi-level layer (bilevel/parts.py) and the salient entries a
quantizing press keeps exact (salient.py). Attention reads them directly (`fused_attention`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .attend import partial_attention
from .core import SegmentParts


@dataclass
class FullTensor:
    """A full-precision [B, H, n, D] tensor behind the `dequantize` interface of packed tensors."""

    data: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.data[:, :, start:end].to(dtype)

    def cat(self, other: "FullTensor") -> "FullTensor":
        return FullTensor(torch.cat([self.data, other.data.to(self.data.device, self.data.dtype)], 2))


@dataclass
class DenseSegment(SegmentParts):
    """Full-precision entries of a layer kept as a segment (not in the layer's append tail)."""

    keys: FullTensor
    values: FullTensor
    pos: torch.Tensor  # [H, n] int32 sequence index of each entry
    label: str = "dense"
    logw: torch.Tensor | None = None  # [H, n] fp32 log-weights of a mass merge (mmkv.cache.mass), or None

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, label: str,
           logw: torch.Tensor | None = None) -> "DenseSegment":
        return cls(FullTensor(keys), FullTensor(values), pos.to(torch.int32), label, logw)

    def fused_attention(self, query: torch.Tensor, scaling: float):
        """(out, lse) of `query` over these entries (every entry precedes the query), log-weights added."""
        return partial_attention(query, self.keys.data, self.values.data, scaling, None, self.logw)

    def blocks(self, dtype: torch.dtype, block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, self.num_tokens, block):
            yield self.keys.dequantize(dtype, s, s + block), self.values.dequantize(dtype, s, s + block)
