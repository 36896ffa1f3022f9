"""Elastic Cache: importance-driven cache merging for instruction-following multimodal LLMs
(Liu et al., "Efficient Inference of Vision Instruction-Following Models with Elastic Cache",
ECCV 2024, arXiv 2407.18121).

Instruction encoding (once the prompt is prefilled), per layer, the same for every head:

1. Importance: the attention each entry receives during prefill, summed over all query rows and
   averaged over heads, s(j) = sum_i mean_h A_h[i, j] (gathered block by block in `observe`;
   never an [n, n] matrix).
2. Budget: `ratio` is the fraction EVICTED. The cache is cut to (1 - ratio) * tokens seen:
   f = floor(n_held - (1 - ratio) * n_seen) entries go (f = floor(ratio * n) for a fresh cache).
3. Protected: the first `start_size` entries and the last prompt entry are always kept.
4. Anchors: the other entries, except the f lowest-importance ones, which are evicted. Each
   evicted entry merges into the anchor nearest to it in the sequence (ties: the earlier one):
   k_a <- mean(k_a, {k_e : e -> a}), v_a likewise.

Output generation ("fixed-point elimination", `decode=True`): at compression the press records
p = L0 + distance (L0 = entries kept; distance = -25; a positive distance is used as p itself).
Whenever the cache holds more than (1 - ratio) * tokens seen, the entry at index p (in sequence
order) is evicted: entries [0, p) (the initial tokens and most of the merged prompt) are frozen,
everything after p is a FIFO of the most recent tokens. With ratio 0.2, about every fifth
generated token triggers one eviction.

Defaults: ratio=0.2 (the paper's and the eval scripts'), start_size=1 (the eval scripts'
`--start-size`; the class default in the official code is 4), distance=-25, decode=True.

Deviations from the official code (liuzuyan/ElasticCache, `kv_cache.py`), and why:
- Selection by rank. The official `torch.where(torch.argsort(s) > f)` compares token INDICES
  with f instead of ranks, so it keeps and drops tokens unrelated to their scores (it can drop
  the highest-scored token). Here the f lowest-scored unprotected entries are evicted.
- The official evicted indices lack the `+start_size` offset (they point start_size entries too
  early), and `<=`/`>` evicts f + 1 entries instead of f. Both fixed: exactly f entries go.
- Scores are kept per sequence index for any prompt length (the official buffer holds 2049
  entries and overflows beyond), computed in blocks during chunked prefill instead of a Python
  loop over an eager [n, n] attention matrix; GQA is handled (mean over all query heads).
- Composition with a quantizing press (e.g. "elastic+kivi:2"): the decode eviction only ever
  removes full-precision entries. Once the quantizer has packed the entry at index p, the packed
  part is frozen too and the oldest full-precision entry after it is evicted instead; the newest
  entry (the token just generated) is never evicted. Without a quantizer this is exactly the
  paper's policy.
- p is clamped to [start_size, L0 - 1] so the protected initial entries are never evicted and
  a large positive distance still names an existing entry.
- At least one anchor is always kept (f is capped at the number of unprotected entries - 1), so
  every evicted entry has somewhere to merge (only matters for tiny prompts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..stages import check, register
from .base import KVPress
from .importance import ObservedImportance, StateSlice, make_importance
from .scores import (accumulate, attention_received, entry_scores, gather_entries, key_positions, observed_layers,
                     sequence_order)

SCORES = ("sum", "observed", "window", "expected", "text")


def evict_count(held: int, seen: int, ratio: float) -> int:
    """Entries over the (1 - ratio) * seen budget: floor(held - (1 - ratio) * seen), >= 0."""
    return max(0, math.floor(held - (1.0 - ratio) * seen + 1e-6))


def elastic_select(scores: torch.Tensor, pos: torch.Tensor, start_size: int, f: int):
    """Rank-based selection and positional anchor assignment.

    scores, pos: [H, n] per entry. Evicts the f lowest-scored entries that are not protected (the
    first `start_size` in sequence order and the last one); ties go to the earlier entry.
    Returns (kept [H, n - f] in sequence order, evicted [H, f], anchor [H, f]) as entry indices;
    anchor[h, i] is the unprotected kept entry nearest in sequence to evicted[h, i] (ties: earlier)."""
    h, n = scores.shape
    order = sequence_order(pos)                                          # [H, n]
    rank = order.argsort(dim=1)
    protected = (rank < start_size) | (rank == n - 1)
    pri = scores.float().masked_fill(protected, float("inf"))
    by_score = pri.sort(dim=1, stable=True).indices                      # ascending importance
    evicted = by_score[:, :f]
    drop = torch.zeros(h, n, dtype=torch.bool, device=scores.device).scatter(1, evicted, True)
    drop_sorted = drop.gather(1, order)
    kept = order[~drop_sorted].view(h, -1)
    anchor_mask = (~drop & ~protected).gather(1, order)
    anchors = order[anchor_mask].view(h, -1)                              # [H, A] in sequence order
    return kept, evicted, nearest_anchor(pos, anchors, evicted)


def nearest_anchor(pos: torch.Tensor, anchors: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """Elastic Cache's anchor assignment. pos [H, n] sequence index per entry; anchors [H, A]
    entry indices in increasing sequence order; evicted [H, E] entry indices. Returns [H, E]: the
    anchor nearest in sequence to each evicted entry (ties: the earlier one)."""
    a_pos = pos.long().gather(1, anchors.long())                         # sorted per head
    e_pos = pos.long().gather(1, evicted.long())
    r = torch.searchsorted(a_pos, e_pos)                                 # first anchor at or after
    a = a_pos.shape[1]
    left = (r - 1).clamp(0, a - 1)
    right = r.clamp(0, a - 1)
    d_left = (e_pos - a_pos.gather(1, left)).abs()
    d_right = (a_pos.gather(1, right) - e_pos).abs()
    use_left = (r > 0) & ((d_left <= d_right) | (r >= a))
    return anchors.gather(1, torch.where(use_left, left, right))


def elastic_merge(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor,
                  anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average every evicted entry into its anchor (k_a <- mean(k_a, merged k_e)); return the kept
    keys and values [B, H, K, D] (in `kept` order) in the input dtype."""
    b, h, n, d = keys.shape
    dev = keys.device
    evicted, anchor = evicted.to(dev).long(), anchor.to(dev).long()
    idx = anchor[None, :, :, None].expand(b, -1, -1, d)
    count = 1 + torch.zeros(h, n, device=dev).scatter_add(1, anchor, torch.ones_like(anchor, dtype=torch.float32))
    new_k = keys.float().scatter_add(2, idx, gather_entries(keys, evicted).float()) / count[None, :, :, None]
    new_v = values.float().scatter_add(2, idx, gather_entries(values, evicted).float()) / count[None, :, :, None]
    return gather_entries(new_k, kept).to(keys.dtype), gather_entries(new_v, kept).to(values.dtype)


@register
@dataclass
class ElasticCache(KVPress):
    """Elastic Cache: evict low-importance entries, merge them into the nearest anchor (arXiv 2407.18121).

    Defaults: ratio=0.2 (fraction evicted), start_size=1 protected initial entries (+ the last
    prompt entry), distance=-25 for the decode policy, decode=True. See the module docstring for
    the algorithm and the deviations from the official code.
    """

    name: ClassVar[str] = "elastic"
    aliases: ClassVar[tuple[str, ...]] = ("elastic_cache", "elasticcache")
    main: ClassVar[str] = "ratio"
    decode_evicts: ClassVar[bool] = True
    # its decode eviction never touches a quantized entry, so it may precede a quantizing press
    decode_evicts_full_precision_only: ClassVar[bool] = True

    ratio: float = 0.2
    start_size: int = 1
    distance: int = -25
    decode: bool = True
    score: str = "sum"
    probes: int = 0

    def validate(self):
        check(0 < self.ratio < 1, f"elastic: ratio (fraction evicted) must be in (0, 1), got {self.ratio}")
        check(self.start_size >= 0, f"elastic: start_size must be >= 0, got {self.start_size}")
        check(self.score in SCORES, f"elastic: score must be one of {', '.join(SCORES)}, got {self.score!r}")
        check(self.probes >= 0, f"elastic: probes must be >= 0 (0 = every row), got {self.probes}")

    def _importance(self):
        return make_importance(self.score, probes=self.probes)

    def _key(self, *k):
        return (self.name, *k)

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx):
        if ctx.state.get(self._key("p", idx)) is not None:
            return  # already compressed (compress_at="encode"): later prompt rows are not used
        if self.score != "sum":
            return self._importance().observe(StateSlice(ctx.state, self.name), idx, layer, query, key, value,
                                              scaling, q_start, ctx)
        kpos = key_positions(layer, key)
        qpos = torch.arange(q_start, q_start + query.shape[2], device=query.device)
        rows = ObservedImportance(probes=self.probes).rows(query.shape[2], q_start, query.device)
        got = attention_received(query, key, kpos, qpos, scaling, rows) / query.shape[1]  # mean over heads
        ctx.state[self._key("scores", idx)] = accumulate(ctx.state.get(self._key("scores", idx)), got, kpos,
                                                          layer.seen)

    def _layers(self, cache, ctx):
        """(idx, layer, [H, n] scores, the same for every head) of the layers to compress."""
        if self.score == "sum":
            for idx, layer, acc in observed_layers(cache, ctx, "elastic", lambda i: self._key("scores", i)):
                yield idx, layer, entry_scores(acc.sum(0, keepdim=True), layer.pos)
            return
        st, imp = StateSlice(ctx.state, self.name), self._importance()
        for idx, layer in enumerate(cache.layers):
            if not layer.is_initialized or layer.residual_len == 0:
                continue
            if layer.segments:
                raise RuntimeError("elastic runs before quantization; put it before the quantizing press")
            if not imp.ready(st, idx):
                raise RuntimeError(f"elastic: no attention statistics were gathered for layer {idx}; it needs the "
                                   "pipeline's prefill (observe) before compress")
            sc = imp.scores(st, idx, layer, ctx)[0]                       # [H, n] per head
            tok = torch.zeros(int(layer.pos.max()) + 1, device=sc.device).scatter_add(
                0, layer.pos.reshape(-1).long().to(sc.device), sc.float().reshape(-1))
            yield idx, layer, tok[layer.pos.long().to(sc.device)]        # summed over heads, per token

    def compress(self, cache, ctx) -> None:
        held_total = kept_total = 0
        for idx, layer, scores in self._layers(cache, ctx):
            pos = layer.pos
            h, n = pos.shape
            candidates = n - min(n, self.start_size) - 1
            f = min(evict_count(n, layer.seen, self.ratio), max(0, candidates - 1))
            held_total += n
            kept_total += n - f
            if f > 0:
                kept, evicted, anchor = elastic_select(scores, pos, self.start_size, f)
                k, v = elastic_merge(layer.keys, layer.values, kept, evicted, anchor)
                layer.set_residual(k, v, pos.gather(1, kept.to(pos.device)))
            elif bool((pos[:, 1:] < pos[:, :-1]).any()):
                layer.select(sequence_order(pos))                        # the decode policy indexes in order
            l0 = layer.stored
            p = self.distance if self.distance > 0 else l0 + self.distance
            ctx.state[self._key("p", idx)] = min(max(p, self.start_size), l0 - 1)
        if held_total:
            ctx.stats["elastic_kept_fraction"] = kept_total / held_total

    def on_decode(self, cache, ctx, step: int) -> None:
        if not self.decode:
            return
        for idx, layer in enumerate(cache.layers):
            p = ctx.state.get(self._key("p", idx))
            if p is None or not layer.is_initialized:
                continue
            over = evict_count(layer.stored, layer.seen, self.ratio)
            if over > 0:
                self._evict_at(layer, p, over)

    @staticmethod
    def _evict_at(layer, p: int, count: int) -> None:
        """Drop `count` entries starting at index p (sequence order, packed segments first); entries
        already packed by a quantizer are frozen, and the newest entry is never dropped."""
        packed = layer.stored - layer.residual_len
        n = layer.residual_len
        r = max(0, p - packed)
        r_end = min(r + count, n - 1)
        if r_end <= r:
            return
        dev = layer.keys.device
        idx = torch.cat([torch.arange(r, device=dev), torch.arange(r_end, n, device=dev)])
        layer.select(idx)
