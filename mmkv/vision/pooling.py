"""Uniform spatial pooling of each frame's token grid (baseline).

LLaVA-Video (Zhang et al., "Video Instruction Tuning with Synthetic Data", arXiv 2410.02713) and
LLaVA-OneVision shrink every video frame's token grid with 2x2 spatial pooling before the LLM.
This press applies the same uniform reduction to the tokens an adapter produced: within each
temporal slot, the tokens of every `size` x `size` block of the grid are averaged (weighted by
how many original tokens each stands for) into one token.

Where the pooled token sits: at the ORIGINAL position of the block's first token (its top-left
one), since mmkv keeps every kept token's original (t, h, w) position; a pooled grid re-indexed
from 0 (what LLaVA-Video trains with) cannot be expressed without moving positions. Blocks at an
odd border are smaller and averaged over the tokens they have. Separators are kept.

Defaults: size=2 (2x2, 25% of the tokens). Images are left untouched unless `images=True`
(LLaVA-Video pools video frames only).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..stages import check, register
from .base import VisionContext, VisionPress, VisualTokens


def pool_groups(coords: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group rows by (t, h // size, w // size). Returns (group id per row [n], first row of each group [G])."""
    key = torch.stack([coords[:, 0], coords[:, 1] // size, coords[:, 2] // size], 1)
    _, inv = torch.unique(key, dim=0, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    first = torch.full((n_groups,), coords.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inv, torch.arange(coords.shape[0]), reduce="amin")
    return inv, first


@register
@dataclass
class Pool(VisionPress):
    """Uniform size x size spatial average pooling of every frame (baseline, as LLaVA-Video)."""

    name: ClassVar[str] = "pool"
    aliases: ClassVar[tuple[str, ...]] = ("pool2x2",)
    main: ClassVar[str] = "size"
    streaming: ClassVar[bool] = True

    size: int = 2
    images: bool = False

    def validate(self):
        check(isinstance(self.size, int) and not isinstance(self.size, bool) and self.size >= 2,
              f"pool: size must be an integer >= 2 (2 pools 2x2 blocks), got {self.size!r}")

    def step(self, chunk: VisualTokens, state, ctx: VisionContext) -> VisualTokens:
        if chunk.kind == "image" and not self.images:
            return chunk
        rows = chunk.is_patch.nonzero().squeeze(1)
        if rows.numel() == 0:
            return chunk
        inv, first = pool_groups(chunk.coords[rows].cpu(), self.size)
        inv, first = inv.to(rows.device), first.to(rows.device)
        w = chunk.weight[rows].float()
        sums = torch.zeros(first.numel(), chunk.embeds.shape[1], device=chunk.embeds.device)
        sums.index_add_(0, inv, chunk.embeds[rows].float() * w[:, None])
        wsum = torch.zeros(first.numel(), device=w.device).index_add_(0, inv, w)
        order = rows[first].argsort()                              # keep sequence order
        keep = rows[first][order]
        out = chunk.subset(keep)
        patch = out.is_patch
        embeds, weight = out.embeds.clone(), out.weight.clone()
        embeds[patch] = (sums[order] / wsum[order, None]).to(embeds.dtype)
        weight[patch] = wsum[order].to(weight.dtype)
        return replace(out, embeds=embeds, weight=weight)
