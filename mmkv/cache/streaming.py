"""StreamingLLM sink + recent eviction (Xiao et al., "Efficient Streaming Language Models with
Attention Sinks", ICLR 2024, arXiv 2309.17453).

Keeps the first `sink` tokens (attention sinks) and the `recent` most recent ones; everything in
between is evicted once prefill ends and, with `decode=True`, one entry per generated token after
that, so the cache never exceeds sink + recent entries per layer.

Defaults: sink=4 (the paper's setting), recent=1020 (a 1024-entry cache, one of the paper's sizes).
`ratio` (the fraction evicted, as every eviction press takes it) replaces the fixed window: the
cache is cut to round((1 - ratio) * tokens seen) entries, the `sink` first plus the most recent,
and with `decode=True` it is kept at that fraction of the tokens seen while generating.
Deviation from the official code: kept entries keep their ORIGINAL positions (keys are cached
after RoPE and the next token continues from the uncompressed length), where the official code
re-assigns positions inside the cache. Original positions are what every other mmkv press uses,
and they make the evicted run equal to attention restricted to the kept tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..stages import check, register
from .base import KVPress
from .budgets import uniform_keep


@register
@dataclass
class StreamingLLM(KVPress):
    """StreamingLLM: keep `sink` first and `recent` last tokens, or evict `ratio` of them (arXiv 2309.17453)."""

    name: ClassVar[str] = "streaming"
    aliases: ClassVar[tuple[str, ...]] = ("sink",)
    main: ClassVar[str] = "recent"
    decode_evicts: ClassVar[bool] = True

    recent: int = 1020
    sink: int = 4
    decode: bool = True
    ratio: float | None = None

    def validate(self):
        check(self.sink >= 0, f"streaming: sink must be >= 0, got {self.sink}")
        check(self.recent >= 1, f"streaming: recent must be >= 1, got {self.recent}")
        check(self.ratio is None or 0 <= self.ratio < 1,
              f"streaming: ratio (fraction evicted) must be in [0, 1), got {self.ratio}")

    def budget_for(self, layer) -> tuple[int, int]:
        """(sink, recent) entries this layer keeps now."""
        if self.ratio is None:
            return self.sink, self.recent
        keep = uniform_keep(layer.seen, self.ratio)
        sink = min(self.sink, keep)
        return sink, keep - sink

    @property
    def budget(self) -> int:
        return self.sink + self.recent

    def _evict(self, layer) -> None:
        n = layer.residual_len
        if layer.segments:
            raise RuntimeError("streaming eviction runs before quantization; put it before the quantizing press")
        sink, recent = self.budget_for(layer)
        if n <= sink + recent:
            return
        dev = layer.keys.device
        idx = torch.cat([torch.arange(sink, device=dev), torch.arange(n - recent, n, device=dev)])
        layer.select(idx)

    def compress(self, cache, ctx) -> None:
        for layer in cache.layers:
            self._evict(layer)

    def on_decode(self, cache, ctx, step: int) -> None:
        if self.decode:
            for layer in cache.layers:
                self._evict(layer)
