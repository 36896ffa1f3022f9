"""Random keep: every frame keeps a uniformly random fraction of its tokens (baseline).

The floor every informed press must beat at the same budget: within each temporal slot,
round(keep * n) of its n tokens are kept, chosen uniformly at random with a generator seeded by
`seed` (the same video gives the same choice), in sequence order, at their original positions.
Separators are kept. Streaming (slot by slot). Images pass through unless `images=True` (then
each view keeps the same fraction). Defaults: keep=0.25, seed=0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..stages import check, register
from .base import VisionContext, VisionPress, VisualTokens


@register
@dataclass
class RandomKeep(VisionPress):
    """Random keep: each frame keeps a random `keep` fraction of its tokens (baseline)."""

    name: ClassVar[str] = "random"
    main: ClassVar[str] = "keep"
    streaming: ClassVar[bool] = True

    keep: float = 0.25
    seed: int = 0
    images: bool = False

    def validate(self):
        check(isinstance(self.keep, (int, float)) and not isinstance(self.keep, bool) and 0.0 < self.keep <= 1.0,
              f"random: keep (fraction of tokens kept) must be in (0, 1], got {self.keep!r}")

    def start(self, ctx: VisionContext) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def step(self, chunk: VisualTokens, gen: torch.Generator, ctx: VisionContext) -> VisualTokens:
        if chunk.kind == "image" and not self.images:
            return chunk
        rows = chunk.is_patch.nonzero().squeeze(1)
        if rows.numel() == 0:
            return chunk
        t = chunk.coords[rows, 0]
        keep = []
        for s in torch.unique_consecutive(t).tolist():
            r = rows[t == s]
            k = int(self.keep * r.numel() + 0.5)
            keep.append(r[torch.randperm(r.numel(), generator=gen)[:k].to(r.device)])
        return chunk.subset(torch.cat(keep).sort().values)
