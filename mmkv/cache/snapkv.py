"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469) and Ada-SnapKV (AdaKV, Feng et al., "Ada-KV: Optimizing KV Cache Eviction by
Adaptive Budget Allocation for Efficient LLM Inference", arXiv 2407.11550).

Importance of key j: the mean softmax attention of the prompt's last `window` rows (the
"observation window"), pooled along the sequence (max-pool of `kernel`, stride 1), per KV head
(mean over its query heads). The window's own entries are always kept, as SnapKV keeps them.
`adakv` is the same with AdaKV's per-head budgets (budget="head", alpha=0.2).

Before the question (compress_at="encode") the window is the end of the prefix: the last frames'
tokens and the template text after the video, not a question. That is SnapKV's premise broken
(its window IS the question); the table in BENCHMARKS.md measures what remains.

Defaults: window=32, kernel=7, pool="max" (the paper's LongBench configurations and AdaKV's);
ratio=0.5, budget="uniform" (snapkv) / "head" (adakv), merge="none", sink=4, keep_text=True.

Deviations and choices:
- GQA: scores are averaged over each KV head's query heads and entries selected per KV head
  (the official code selects from a cache replicated per query head: G times the memory).
- The window rows are computed apart from SDPA (a [w, n] block), in whichever prefill chunk
  holds them. When the cache is compressed after a question shorter than the window, the window
  is the question plus the prefix's last `window` rows.
- Pooling runs over sequence indices: for video that smooths along raster order inside a frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..stages import check, register
from .evict import EvictionPress
from .importance import WindowImportance

POOLS = ("max", "avg", "none")


@register
@dataclass
class SnapKV(EvictionPress):
    """SnapKV: evict by the pooled attention of the prompt's last rows (arXiv 2404.14469)."""

    name: ClassVar[str] = "snapkv"
    needs_question: ClassVar[bool] = False

    window: int = 32
    kernel: int = 7
    pool: str = "max"

    def validate(self):
        super().validate()
        check(self.window >= 1, f"{self.name}: window must be >= 1, got {self.window}")
        check(self.kernel >= 1 and self.kernel % 2 == 1, f"{self.name}: kernel must be odd and >= 1, got {self.kernel}")
        check(self.pool in POOLS, f"{self.name}: pool must be one of {', '.join(POOLS)}, got {self.pool!r}")

    def importance(self):
        return WindowImportance(window=self.window, kernel=self.kernel, pool=self.pool, proxy=bool(self.proxy))

    def protected(self, layer, ctx):
        prot = super().protected(layer, ctx)
        if self.proxy and ctx.phase == "encode":
            return prot  # the window was the proxy's rows, whose entries are already gone
        return prot | (layer.pos.long() >= ctx.token_type.numel() - self.window)


@register
@dataclass
class AdaKV(SnapKV):
    """Ada-SnapKV: SnapKV scores with AdaKV's per-head budgets (arXiv 2407.11550)."""

    name: ClassVar[str] = "adakv"
    aliases: ClassVar[tuple[str, ...]] = ("ada-snapkv", "ada_snapkv")

    budget: str = "head"
