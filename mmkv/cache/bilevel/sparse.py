"""The sparse level: which of a chunk's entries stay on the device, chosen before any question.

A scorer ranks a chunk's entries when the chunk is sealed (right after its prefill); the top k
per KV head form the sparse level. The protocol (any object with these methods plugs in):

    observe(idx, layer, query, key, value, scaling, q_start, ctx)   optional; the KVPress hook,
        called for every prefill slice (the chunk's own queries against the keys the layer holds
        in full precision: the text before the video and the chunk itself)
    entry_scores(idx, keys, values, pos, ctx) -> [H, n]              higher = keep; keys, values
        [B, H, n, D] are the chunk's entries of layer idx, pos [H, n] their sequence indices

`sparse=NAME` picks a built-in below, or a registered KV stage whose class defines
`entry_scores` (an eviction press: its query-agnostic importance then chooses the sparse level;
the press itself never runs on the cache).

Built-ins:
- "attn" (default): the attention each entry receives from the chunk's own queries, divided by
  the number of queries that could see it (H2O's accumulated attention, count-normalized so the
  chunk's early tokens are not favoured for being visible longer; Zhang et al., arXiv 2306.14048),
  summed over the query heads of each KV head. Its evidence is complete when the chunk ends.
- "norm": the smallest key L2 norms (Devoto et al., "A Simple and Effective L2 Norm-Based
  Strategy for KV Cache Compression", arXiv 2406.11430): no statistics at all.
- "uniform": evenly spaced entries of each chunk (the subsampling baseline).
"""
from __future__ import annotations

import torch

from ...errors import RecipeError
from ..scores import accumulate, attention_received, key_positions

KEY = "bilevel"


class Scorer:
    """Base of the built-in scorers: top-k of `entry_scores`, in sequence order."""

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx) -> None:
        pass

    def entry_scores(self, idx, keys, values, pos, ctx) -> torch.Tensor:
        raise NotImplementedError

    def select(self, idx, keys, values, pos, k: int, ctx) -> torch.Tensor:
        """[H, k] entry indices (ascending) of the entries to keep."""
        return select_top(self.entry_scores(idx, keys, values, pos, ctx), k)


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.float().topk(k, dim=1).indices.sort(1).values


class ObservedAttention(Scorer):
    """Count-normalized attention received from the chunk's own queries (see module docstring)."""

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx) -> None:
        kpos = key_positions(layer, key)
        qpos = torch.arange(q_start, q_start + query.shape[2], device=query.device)
        got = attention_received(query, key, kpos, qpos, scaling)                # [Hk, Lk]
        g = query.shape[1] // key.shape[1]
        ctx.state[(KEY, "attn", idx)] = accumulate(ctx.state.get((KEY, "attn", idx)), got / g, kpos, layer.seen)
        ctx.state[(KEY, "rows", idx)] = q_start + query.shape[2]               # rows observed so far

    def entry_scores(self, idx, keys, values, pos, ctx) -> torch.Tensor:
        acc = ctx.state.get((KEY, "attn", idx))
        if acc is None:
            raise RuntimeError("bilevel: no attention was observed for this chunk (it needs the pipeline's prefill)")
        p = pos.long().to(acc.device)
        if acc.shape[1] <= int(p.max()):
            acc = torch.cat([acc, acc.new_zeros(acc.shape[0], int(p.max()) + 1 - acc.shape[1])], 1)
        seen_by = (ctx.state[(KEY, "rows", idx)] - p).clamp_min(1).float()     # queries at or after each entry
        return acc.gather(1, p) / seen_by


class KeyNorm(Scorer):
    def entry_scores(self, idx, keys, values, pos, ctx) -> torch.Tensor:
        return -keys.float().norm(dim=-1).mean(0)                                # [H, n]


class Uniform(Scorer):
    def select(self, idx, keys, values, pos, k: int, ctx) -> torch.Tensor:
        h, n = pos.shape
        idx_ = torch.linspace(0, n - 1, k, device=pos.device).round().long().unique()
        if idx_.numel() < k:  # rounding collisions (k close to n): fill with the first unused
            rest = torch.ones(n, dtype=torch.bool, device=pos.device)
            rest[idx_] = False
            idx_ = torch.cat([idx_, rest.nonzero().squeeze(1)[: k - idx_.numel()]]).sort().values
        return idx_.expand(h, k)


class StageScorer(Scorer):
    """A registered KV stage's query-agnostic importance (its `observe` and `entry_scores`)."""

    def __init__(self, stage):
        self.stage = stage

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx) -> None:
        fn = getattr(self.stage, "observe", None)
        if fn is not None:
            fn(idx, layer, query, key, value, scaling, q_start, ctx)

    def entry_scores(self, idx, keys, values, pos, ctx) -> torch.Tensor:
        return self.stage.entry_scores(idx, keys, values, pos, ctx)


BUILTIN = {"attn": ObservedAttention, "norm": KeyNorm, "uniform": Uniform}


def make_scorer(name: str) -> Scorer:
    """The scorer `name` names: a built-in, or a registered KV stage that defines entry_scores."""
    if name in BUILTIN:
        return BUILTIN[name]()
    from ...stages import STAGES

    cls = STAGES.get(name)
    if cls is not None and cls.kind == "kv" and hasattr(cls, "entry_scores"):
        return StageScorer(cls())
    stages = sorted(n for n, c in STAGES.items() if c.kind == "kv" and hasattr(c, "entry_scores"))
    raise RecipeError(f"bilevel: sparse={name!r} is neither a built-in scorer ({', '.join(BUILTIN)}) nor a KV "
                      f"stage with entry_scores ({', '.join(stages) or 'none registered'})")
