"""EVS: vLLM's video-token pruning rule (baseline).

Efficient Video Sampling, Bagrov et al., arXiv 2510.14624; in vLLM as `--video-pruning-rate q`
(PR #22980, `vllm/multimodal/evs.py`, Qwen2.5-VL / Qwen3-VL / Nemotron-Nano-VL). The rule:
1. score every token by its cosine dissimilarity 1 - cos(x_tj, x_(t-1)j) to the token at the same
   spatial position in the previous frame (temporal slot);
2. the first frame scores 255, so it is always kept whole;
3. keep the global top-k over the whole video, k = max(tokens per frame, int(total * (1 - q))),
   with a stable descending sort (earlier tokens win ties).
This press follows it exactly, with `keep` = 1 - q (the fraction kept, like mmkv's other
presses), applied to the tokens an adapter produced. "Exactly" includes the float arithmetic:
`keep=0.1` stands for `--video-pruning-rate 0.9`, q is that decimal complement as a float
(`vllm_rate`), and k is vLLM's `int(total * (1 - q))` computed from it, which is one token less
than `int(total * keep)` wherever float rounding makes 1 - q fall below keep (total 80, keep 0.1:
7, not 8); the cosine similarity is torch's `cosine_similarity` in the embeddings' own dtype,
as in vLLM. Kept tokens keep their original positions
(vLLM re-derives M-RoPE positions for the kept tokens; the result is the same positions).
A token whose same-position predecessor was dropped by an earlier press scores as new (255).

Not streaming: the top-k is global, so every token of the video is held until the end (as in
vLLM). Images pass through (vLLM prunes videos only). Default keep=0.25 (q=0.75), mmkv's choice
for comparisons at PVC's and 2x2 pooling's budget; vLLM has no default (pruning is off unless set).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..stages import check, register
from .base import VisionContext, VisionPress, VisualTokens

FIRST_FRAME_SCORE = 255.0


def evs_scores(tokens: VisualTokens, rows: torch.Tensor) -> torch.Tensor:
    """Dissimilarity of each patch row to the same (h, w) token of the previous slot (255 if none)."""
    T, H, W = tokens.grid
    c = tokens.coords[rows].to(rows.device)
    t, h, w = c[:, 0], c[:, 1], c[:, 2]
    table = torch.full((T + 1, H, W), -1, dtype=torch.long, device=rows.device)
    table[t + 1, h, w] = torch.arange(rows.numel(), device=rows.device)   # slot t stored at t + 1
    prev = table[t, h, w]                                                   # slot t - 1 (row 0: none)
    x = tokens.embeds[rows]
    dis = 1 - F.cosine_similarity(x, x[prev.clamp(min=0)], dim=-1)         # vLLM: in the embeddings' dtype
    return torch.where(prev >= 0, dis, torch.full_like(dis, FIRST_FRAME_SCORE))


def vllm_rate(keep: float) -> float:
    """vLLM's pruning rate q for `keep`: the decimal 1 - keep as written (keep=0.1 -> q=0.9), as a
    float, i.e. the value `--video-pruning-rate` would parse to."""
    return float(Decimal(1) - Decimal(repr(float(keep))))


def evs_retained(tokens_per_frame: int, total: int, keep: float) -> int:
    """vLLM's `compute_retained_tokens_count` (max(tokens per frame, int(total * (1 - q)))) with
    q = vllm_rate(keep), capped at the tokens there are."""
    q = vllm_rate(keep)
    return min(total, max(tokens_per_frame, int(total * (1 - q))))


@register
@dataclass
class EVS(VisionPress):
    """EVS (vLLM): frame 0, then a global top-k by dissimilarity to the previous frame (arXiv 2510.14624)."""

    name: ClassVar[str] = "evs"
    main: ClassVar[str] = "keep"

    keep: float = 0.25

    def validate(self):
        check(isinstance(self.keep, (int, float)) and not isinstance(self.keep, bool) and 0.0 < self.keep <= 1.0,
              f"evs: keep (fraction of video tokens kept, 1 - vLLM's pruning rate) must be in (0, 1], "
              f"got {self.keep!r}")

    def compress(self, tokens: VisualTokens, ctx: VisionContext) -> VisualTokens:
        if tokens.kind != "video":
            return tokens
        rows = tokens.is_patch.nonzero().squeeze(1)
        if rows.numel() == 0:
            return tokens
        score = evs_scores(tokens, rows)
        k = evs_retained(tokens.grid[1] * tokens.grid[2], rows.numel(), self.keep)
        order = torch.argsort(score, descending=True, stable=True)
        return tokens.subset(rows[order[:k]].sort().values)
