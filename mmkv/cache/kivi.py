"""KIVI: tuning-free asymmetric 2/4-bit KV quantization (Liu et al., ICML 2024, arXiv 2402.02750).

Keys are quantized per channel (min-max statistics over `group` consecutive tokens of each
channel), values per token (over `group` consecutive channels of each token); the `residual` most
recent tokens stay in full precision. During decoding, once the full-precision window holds
`residual + group` tokens, its oldest whole groups are quantized and appended to the packed part.

Defaults (the paper's): bits=2, group=32, residual=128, stats=16. Storage per element: `bits` for
the code plus an fp16 scale and zero per group (32 / group bits): 3 bits at the defaults.
`stats=8` (1- and 2-bit only) stores the keys' per-channel scales and zeros in a byte each
(`quant.py`'s 8-bit statistics, as VidKV's default): keys 2.5 bits, 2.75 bits per element overall
at bits=2; the values' per-token statistics stay fp16.
Deviations from the official code: the official code flushes the whole key window when it reaches
`residual` tokens and streams values one token at a time; here both flush whole groups once the
window exceeds `residual`, so at least `residual` recent tokens are always exact. When head_dim is
smaller than `group`, values use one group per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..stages import check, register
from .base import KVPress
from .core import QuantSegment
from .quant import quantize
from .storage import own


@register
@dataclass
class KIVI(KVPress):
    """KIVI: 2/4-bit KV quantization, keys per channel, values per token (arXiv 2402.02750)."""

    name: ClassVar[str] = "kivi"
    main: ClassVar[str] = "bits"
    quantizes: ClassVar[bool] = True

    bits: int = 2
    group: int = 32
    residual: int = 128
    stats: int = 16

    def validate(self):
        check(self.bits in (1, 2, 4, 8), f"kivi: bits must be 1, 2, 4 or 8, got {self.bits}")
        check(self.stats in (8, 16), f"kivi: stats must be 8 or 16 (bits per key scale / zero), got {self.stats}")
        check(self.stats == 16 or self.bits <= 2, f"kivi: stats=8 is for 1- and 2-bit codes, got bits={self.bits}")
        check(self.group >= 1, f"kivi: group must be >= 1, got {self.group}")
        check(self.residual >= 0, f"kivi: residual must be >= 0, got {self.residual}")

    def value_group(self, head_dim: int) -> int:
        g = min(self.group, head_dim)
        return g if head_dim % g == 0 else head_dim

    def flush(self, layer) -> None:
        """Quantize the oldest whole groups of the full-precision window beyond `residual`."""
        n = (layer.residual_len - self.residual) // self.group * self.group
        if n <= 0:
            return
        # slices of the window: the codes are new tensors, the positions are copied (a kept view
        # would keep the whole window alive); set_residual copies the new window likewise
        k, v, pos = layer.keys[:, :, :n], layer.values[:, :, :n], own(layer.pos[:, :n])
        label = f"int{self.bits}"
        last = layer.segments[-1] if layer.segments and layer.segments[-1].label == label else None
        anchor = last.keys.anchor if last is not None else None  # groups added later join its segment
        seg = QuantSegment(quantize(k, self.bits, self.group, "channel", self.stats, anchor),
                           quantize(v, self.bits, self.value_group(v.shape[-1]), "token"),
                           pos, label=label)
        if last is not None:
            layer.segments = layer.segments[:-1] + [last.cat(seg)]
        else:
            layer.segments = layer.segments + [seg]
        layer.set_residual(layer.keys[:, :, n:], layer.values[:, :, n:], layer.pos[:, n:])

    def compress(self, cache, ctx) -> None:
        for layer in cache.layers:
            self.flush(layer)
            layer.on_update = self.flush
