"""Visual tokens and the VisionPress interface (compression before the LLM).

`VisualTokens` is what an adapter's vision encoder produces and what vision presses consume: the
LLM-space embedding of each visual token with its (t, h, w) grid coordinates and its index among
the uncompressed tokens. Presses return a subset (possibly with merged embeddings); the pipeline
places the kept tokens at their ORIGINAL positions (M-RoPE t/h/w for Qwen, 1-D for LLaVA).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from ..stages import Stage


@dataclass
class VisualTokens:
    """Visual tokens of one video or image, in sequence order.

    embeds:   [N, D] LLM-space embeddings (after the projector / patch merger).
    coords:   [N, 3] long (t, h, w): t is the temporal slot (a frame, or a pair of frames for
              Qwen's temporal patch of 2), h/w the token row/column in that slot's grid;
              separators (LLaVA's newline tokens) have h = w = -1.
    index:    [N] long, position of each token among the n_total uncompressed visual tokens.
    is_patch: [N] bool, False for separators, which presses never drop.
    weight:   [N] float, how many original tokens each token stands for (1 unless merged).
    grid:     (T, H, W) of the uncompressed tokens; timestamps: [T] seconds of each slot.
    features: optional [N, Dv] vision-space features for similarity scores (may be None).
    meta:     adapter-specific facts (grid_thw, second_per_grid_ts, image layout, ...).
    """

    embeds: torch.Tensor
    coords: torch.Tensor
    index: torch.Tensor
    is_patch: torch.Tensor
    weight: torch.Tensor
    n_total: int
    grid: tuple[int, int, int]
    timestamps: torch.Tensor
    kind: str = "video"
    features: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num(self) -> int:
        return self.embeds.shape[0]

    def subset(self, keep: torch.Tensor, embeds: torch.Tensor | None = None,
               weight: torch.Tensor | None = None) -> "VisualTokens":
        """Tokens at `keep` (bool mask [N] or sorted indices), optionally with new embeddings/weights
        for the kept rows (merging presses). Separators are always kept."""
        if keep.dtype == torch.bool:
            keep = keep | ~self.is_patch
            idx = keep.nonzero().squeeze(1)
        else:
            idx = torch.unique(torch.cat([keep.long().to(self.index.device), (~self.is_patch).nonzero().squeeze(1)]))
        sel = (lambda x: None if x is None else x[idx])
        return replace(self, embeds=embeds if embeds is not None else self.embeds[idx], coords=self.coords[idx],
                       index=self.index[idx], is_patch=self.is_patch[idx],
                       weight=weight if weight is not None else self.weight[idx], features=sel(self.features))

    @staticmethod
    def cat(parts: list["VisualTokens"], **overrides) -> "VisualTokens":
        """Concatenate chunks of the same media in order (n_total, grid, timestamps from overrides)."""
        first = parts[0]
        feats = None if any(p.features is None for p in parts) else torch.cat([p.features for p in parts])
        return replace(first, embeds=torch.cat([p.embeds for p in parts]), coords=torch.cat([p.coords for p in parts]),
                       index=torch.cat([p.index for p in parts]), is_patch=torch.cat([p.is_patch for p in parts]),
                       weight=torch.cat([p.weight for p in parts]), features=feats, **overrides)

    def per_slot_counts(self) -> torch.Tensor:
        """Kept patch tokens per temporal slot, [T]."""
        t = self.coords[self.is_patch, 0]
        return torch.bincount(t, minlength=self.grid[0])


@dataclass
class VisionContext:
    """What a vision press may look at besides the tokens."""

    adapter: Any = None
    question_embeds: torch.Tensor | None = None  # [Lq, D] for query-aware presses
    stats: dict = field(default_factory=dict)


@dataclass
class VisionPress(Stage):
    """Base of visual-token presses. Streaming presses implement `start`/`step` and see the video
    chunk by chunk as it is encoded; others implement `compress` on all tokens at once."""

    kind: ClassVar[str] = "vision"
    streaming: ClassVar[bool] = False
    query_aware: ClassVar[bool] = False

    def start(self, ctx: VisionContext) -> Any:
        """Fresh streaming state for one media."""
        return None

    def step(self, chunk: VisualTokens, state: Any, ctx: VisionContext) -> VisualTokens:
        """Compress one chunk given the state of the chunks before it (streaming presses)."""
        raise NotImplementedError

    def finish(self, tokens: VisualTokens, state: Any, ctx: VisionContext) -> VisualTokens:
        """Called once after the last chunk with all kept tokens (streaming presses)."""
        return tokens

    def compress(self, tokens: VisualTokens, ctx: VisionContext) -> VisualTokens:
        """Compress all tokens of one media at once. Default: the streaming path in one step."""
        state = self.start(ctx)
        return self.finish(self.step(tokens, state, ctx), state, ctx)
