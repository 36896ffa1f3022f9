"""The KVPress interface: compression of the KV cache once prefill ends (and during decoding)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ..stages import Stage

TEXT, VISUAL, SEPARATOR = 0, 1, 2


@dataclass
class PressContext:
    """What a KV press may look at besides the cache.

    token_type: [L] int8 per sequence index: TEXT, VISUAL or SEPARATOR (grows while decoding).
    question:   (start, end) sequence indices of the question tokens (prompt tail), or None.
    queries:    {layer: [B, Hq, n, D]} post-RoPE queries of the last n prompt tokens, recorded
                during the question's prefill when a press is query-aware.
    stats:      presses record their extras here (shown in Result.stats.extra).
    state:      press-private data (e.g. attention statistics gathered by `observe`), keyed by
                the press. It is carried from encode() to every ask(): never modify a tensor in
                it in place (state[k] = state[k] + x, not +=), so questions stay independent.
    visual_embeds: [N, D] input embeddings of the kept visual tokens, in sequence order.
    phase:      "encode" (prefix prefill) or "ask" (question prefill and decoding).
    compress:   True at the point where KV compression happens (after the question's prefill by
                default; after the prefix's with compress_at="encode"); prefill policies that
                compress the cache in `end()` check it.
    positions:  [P, L] model positions of the prompt by sequence index (P = 3 for M-RoPE), so
                scorers can un-rotate observed queries and rotate future ones; None outside the pipeline.
    rotary:     positions [P, m] -> (cos, sin) [m, D] fp32: the model's own rotary embedding
                (transformers' rotate-half layout); None outside the pipeline.
    """

    token_type: torch.Tensor
    question: tuple[int, int] | None = None
    queries: dict = field(default_factory=dict)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    question_embeds: torch.Tensor | None = None
    visual_embeds: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    phase: str = "ask"
    compress: bool = True
    positions: torch.Tensor | None = None
    rotary: Callable | None = None

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
    # True when the press cannot run before the question (`mmkv info --json` reads it). A class
    # that does not set it gets its own `query_aware`.
    needs_question: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "needs_question" not in cls.__dict__:
            cls.needs_question = bool(getattr(cls, "query_aware", False))

    def compress(self, cache, ctx: PressContext) -> None:
        raise NotImplementedError

    def on_decode(self, cache, ctx: PressContext, step: int) -> None:
        """Called after decode step `step` (0-based) has appended its token."""

    # Presses that need attention statistics from the prefill define
    #   observe(self, idx, layer, query, key, value, scaling, q_start, ctx) -> None
    # It is called for every layer (index idx, KVLayer layer) and prefill chunk (prefix at encode, question at ask) with the
    # chunk's post-RoPE queries [B, Hq, Lq, D] (sequence indices q_start .. q_start + Lq - 1), and
    # the full-precision keys/values the layer holds, [B, Hk, Lk, D], whose sequence indices are
    # layer.positions() (the chunk's own keys are the last Lq). Store results in ctx.state.
