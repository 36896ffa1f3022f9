"""Chunks of a video's visual tokens: whole temporal slots, contiguous in the LLM sequence.

Chunk c holds the visual patch tokens of temporal slots [c * S, (c + 1) * S), S = frames per chunk
/ frames per slot (Qwen2-VL's slot is 2 frames, LLaVA-OneVision's 1); after a vision press, the
kept ones. They are consecutive in the sequence (the adapters emit slot-major order), so a chunk
is one range of sequence indices [start, end). Text, separators (LLaVA's newline) and everything
outside the video belong to no chunk: they stay full-precision on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import TEXT


@dataclass
class ChunkPlan:
    starts: torch.Tensor             # [C] long: sequence index of each chunk's first entry
    ends: torch.Tensor               # [C] long: one past its last
    slots: list[tuple[int, int]]     # temporal slots [s0, s1) of each chunk
    spans: list[tuple[float, float]]  # seconds [t0, t1) of each chunk
    frames: int                      # frames per chunk

    @property
    def n(self) -> int:
        return len(self.starts)

    @property
    def sizes(self) -> torch.Tensor:
        return self.ends - self.starts

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    def chunk_of(self, pos: torch.Tensor) -> torch.Tensor:
        """Chunk id of every sequence index in `pos` (any shape), -1 outside every chunk."""
        p = pos.long()
        starts = self.starts.to(p.device)
        c = torch.searchsorted(starts, p.reshape(-1), right=True).view(p.shape) - 1
        inside = (c >= 0) & (p < self.ends.to(p.device)[c.clamp_min(0)])
        return torch.where(inside, c, torch.full_like(c, -1))

    def counts(self, amount: float) -> list[int]:
        """Entries per chunk for `amount`: a fraction of each chunk (<= 1), or a number of entries
        for the whole video (> 1), spread over the chunks in proportion to their sizes; at least
        one per chunk, at most all of it."""
        sizes = self.sizes.tolist()
        if amount <= 1:
            return [min(n, max(1, round(amount * n))) for n in sizes]
        total = max(1, self.total)
        return [min(n, max(1, round(amount * n / total))) for n in sizes]


def empty_plan(frames: int) -> ChunkPlan:
    """No chunks (an image: it stays whole, in full precision on the device)."""
    none = torch.zeros(0, dtype=torch.long)
    return ChunkPlan(none, none.clone(), [], [], frames)


def plan_chunks(token_type: torch.Tensor, visual, frames: int, temporal_patch: int) -> ChunkPlan:
    """The chunks of `visual` (VisualTokens, in sequence order) placed at the non-text rows of
    `token_type` [L] (the kept prefix sequence). An image has none."""
    if visual.kind != "video":
        return empty_plan(frames)
    rows = (token_type != TEXT).nonzero().squeeze(1)
    if rows.numel() != visual.num:
        raise RuntimeError(f"{rows.numel()} visual rows in the sequence for {visual.num} visual tokens")
    patch = visual.is_patch.to(rows.device)
    prow, slot = rows[patch], visual.coords[patch, 0].to(rows.device)
    per = max(1, frames // max(1, temporal_patch))                       # slots per chunk
    cid = torch.div(slot, per, rounding_mode="floor")
    if prow.numel() and not bool((cid[1:] >= cid[:-1]).all()):
        raise RuntimeError("visual tokens are not in temporal order; bilevel needs slot-major tokens")
    ids, counts = torch.unique_consecutive(cid, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    starts, ends = prow[first], prow[first + counts - 1] + 1
    if bool(((ends - starts) != counts).any()):
        raise RuntimeError("a chunk's visual tokens are not contiguous in the sequence")
    ts = visual.timestamps.double()
    t_n = ts.numel()
    step = float((ts[-1] - ts[0]) / (t_n - 1)) if t_n > 1 else 0.0
    slots, spans = [], []
    for c in ids.tolist():
        s0, s1 = c * per, (c + 1) * per
        slots.append((s0, s1))
        t0 = float(ts[min(s0, t_n - 1)]) if t_n else 0.0
        t1 = float(ts[s1]) if s1 < t_n else (float(ts[-1]) + step if t_n else 0.0)
        spans.append((t0, t1 if math.isfinite(t1) else t0))
    return ChunkPlan(starts.long().cpu(), ends.long().cpu(), slots, spans, frames)
