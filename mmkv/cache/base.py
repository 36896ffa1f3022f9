"""The KVPress interface: compression of the KV cache once prefill ends (and during decoding)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..recipe import Stage

TEXT, VISUAL, SEPARATOR = 0, 1, 2


@dataclass
class PressContext:
    """What a KV press may look at besides the cache.

    token_type: [L] int8 per sequence index: TEXT, VISUAL or SEPARATOR (grows while decoding).
    question:   (start, end) sequence indices of the question tokens (prompt tail), or None.
    queries:    {layer: [B, Hq, n, D]} post-RoPE queries of the last n prompt tokens, recorded
                during the question's prefill when a press is query-aware.
    stats:      presses record their extras here (shown in Result.stats.extra).
    """

    token_type: torch.Tensor
    question: tuple[int, int] | None = None
    queries: dict = field(default_factory=dict)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    question_embeds: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.head_dim ** -0.5


@dataclass
class KVPress(Stage):
    """Base of KV presses. `compress` runs on the whole cache right after prefill (query-aware
    presses: after the question is prefilled); `on_decode` after every generated token."""

    kind: ClassVar[str] = "kv"
    query_aware: ClassVar[bool] = False  # needs the question in the cache and its query rows
    quantizes: ClassVar[bool] = False    # stores low-bit data (must be the last KV press)

    def compress(self, cache, ctx: PressContext) -> None:
        raise NotImplementedError

    def on_decode(self, cache, ctx: PressContext, step: int) -> None:
        """Called after decode step `step` (0-based) has appended its token."""
