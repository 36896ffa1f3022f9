"""The PrefillPolicy interface: how attention is computed while the prompt is prefilled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..stages import Stage


@dataclass
class PrefillPolicy(Stage):
    """Base of prefill policies (e.g. ZipVL's sparse attention). While a prompt chunk of more
    than one token is prefilled, the `mmkv` attention function calls `attend`; returning None
    falls back to dense attention for that call."""

    kind: ClassVar[str] = "prefill"

    def begin(self, press_ctx) -> None:
        """Called before prefill with the PressContext (token types, question span)."""

    def attend(self, module, query, key, value, scaling, fctx):
        """query [B, Hq, Lq, D], key/value [B, Hk, Lk, D] (post-RoPE) -> out [B, Lq, Hq, D] or None."""
        return None

    def end(self, cache, press_ctx) -> None:
        """Called after each prefill call (the prefix at encode, the question at ask). It may
        compress the cache using what it recorded, when `press_ctx.compress` is True."""

    def on_decode(self, cache, press_ctx, step: int) -> None:
        """Called after each decode step (e.g. periodic re-selection)."""
