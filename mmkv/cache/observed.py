"""Observed attention (H2O, Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", NeurIPS 2023, arXiv 2306.14048), count-normalized as ZipVL's
Eq. 7 (He et al., arXiv 2410.08584).

Importance of key j: the softmax attention it receives from the prompt's own rows (every row, or
ZipVL's probe rows), summed, divided by the number of those rows allowed to see it (causally,
the rows at or after j); with GQA, the mean over the query heads of each KV head. Before the
question the rows are the video prefix's own; no question is needed. Rows are computed apart
from the layer's SDPA / FlashAttention, a block at a time (no [n, n] matrix).

Defaults: ratio=0.5 (fraction evicted), probes=0 (every row), budget="uniform", merge="none",
sink=4, keep_text=True.

Deviations from H2O, and why:
- H2O evicts while decoding, keeping heavy hitters plus a recent window by accumulated (raw)
  sums; here the prompt's cache is compressed once, by the normalized score, with no recent
  window: the raw sum favours old tokens only because more rows see them (the official code
  has this normalization written and commented out), and at encode the "recent" tokens are the
  last frames, no more relevant than any other.
- The selection is per KV head over scores averaged across its query heads (GQA), not per query
  head over a replicated cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..stages import check, register
from .evict import EvictionPress
from .importance import ObservedImportance


@register
@dataclass
class ObservedAttention(EvictionPress):
    """Observed attention (H2O, count-normalized as ZipVL Eq. 7): evict the least-attended entries (arXiv 2306.14048)."""

    name: ClassVar[str] = "observed"
    aliases: ClassVar[tuple[str, ...]] = ("h2o", "observed_attention")
    needs_question: ClassVar[bool] = False

    probes: int = 0

    def validate(self):
        super().validate()
        check(self.probes >= 0, f"observed: probes must be >= 0 (0 = every row), got {self.probes}")

    def importance(self):
        return ObservedImportance(probes=self.probes)
