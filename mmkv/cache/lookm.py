"""LOOK-M: Look-Once Optimization in KV cache for efficient Multimodal long-context inference
(Wan et al., EMNLP 2024 Findings, arXiv 2406.18139).

Once the prompt is prefilled ("look once"), every layer's cache is compressed per KV head:

1. Importance (text prior): the attention the text tokens (system prompt, question; every
   TEXT-typed prompt token) pay to each key, summed over those query rows and, with GQA, over
   the query heads that read the KV head. The rows are computed block by block during prefill
   (`observe`), never as an [n, n] matrix.
2. Budget per head, from the n entries held: hh = floor(hh_ratio * n) "heavy hitters" and
   recent = floor(recent_ratio * n) most recent entries (defaults 0.1 + 0.1: 20% kept, the
   paper's 80% reduction). Every text token is kept; visual tokens fill the hh slots that
   text does not use, chosen per head by importance; the recent window is always kept. Each head
   keeps max(hh, #text outside the recent window) + recent entries (the same count in every
   head; more than hh + recent only when the prompt's text alone exceeds hh).
3. Merge: each evicted entry goes to its most cosine-similar kept key in the same head (kept =
   text, heavy hitters and recent), and the kept key and value are updated:
   - "pivotal" (default): k_m <- mean(k_m, {(k_e + k_m) / 2 : e -> m}), likewise v;
   - "averaged":  k_m <- mean(k_m, {k_e : e -> m}), over the filtered evicted entries;
   - "weighted":  k_m <- mean(k_m, {cos_e * k_e : e -> m}), over the filtered evicted entries;
   - "none": eviction only (the paper's text-prior eviction ablation, official TextH2O).
   The filter (averaged, weighted, as in the official code): an evicted token is merged only if
   its best similarity, averaged over the heads that evict it, is at least the mean best
   similarity over all evicted entries. Values follow their keys' pivots.

No eviction happens while decoding (the cache then grows normally).

Defaults (the paper's scripts): hh_ratio=0.1, recent_ratio=0.1, merge="pivotal".

Deviations from the official code (SUSTechBruce/LOOK-M, `modify_llama.py`), and why:
- Importance is the attention from the TEXT query rows only (`probe="text"`), computed as probe
  rows during chunked prefill. The official code materializes the eager [n, n] attention and sums
  every query row; `probe="all"` reproduces that sum, still block by block.
- Averaged merge: the official code filters the pivot indices but not the merged tensors, so the
  j-th kept pivot is paired with the j-th UNFILTERED evicted key (wrong tokens merged). Here the
  filter applies to both.
- The merge filter averages each token's best similarity over the heads in which it is evicted;
  the official code averages the j-th evicted entry of each head, which are different tokens
  whenever heads evict different tokens.
- GQA: scores are summed over each KV head's query-head group before per-KV-head selection (the
  official code assumes as many KV heads as query heads); no hard-coded head_dim, image size
  (576 tokens) or batch size. Visual tokens are those the adapter marks VISUAL or SEPARATOR.
- Cosine similarity uses a normalization with an epsilon (the official code divides by the raw
  norm: an all-zero key gives NaN).
- Kept entries keep their original positions (as the official code does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..stages import check, register
from .base import TEXT, KVPress
from .importance import Importance, StateSlice, make_importance, text_rows
from .scores import accumulate, attention_received, entry_scores, gather_entries, key_positions, sequence_order

VARIANTS = ("pivotal", "averaged", "weighted", "none")
SCORE_CHOICES = ("text", "observed", "window", "expected")
SIM_ELEMENTS = 1 << 24  # similarity elements per block when matching evicted to kept keys (not CPU)
# On the CPU the search runs in tiles of ROW_TILE evicted x KEY_TILE kept keys per head, a running
# max over the key tiles: a tile's similarities stay in cache instead of a 64 MiB block going out
# to memory and back for the max. The same matches (ties still go to the lowest index) up to the
# rounding of similarities equal to ~1e-7; 1.15x faster alone at 2K kept keys, 2.2-2.8x at 8K
# (benchmarks/match_search.py), the mass merge's prefill +32% -> +14% on the proxy (BENCHMARKS.md).
ROW_TILE, KEY_TILE = 512, 2048


def lookm_select(scores: torch.Tensor, is_text: torch.Tensor, pos: torch.Tensor, hh_ratio: float,
                 recent_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-prior selection. scores, is_text, pos: [H, n] per entry (pos = sequence index).

    Returns (kept [H, K], evicted [H, n - K]) entry indices, each in increasing sequence order,
    with the same K in every head (see the module docstring for K)."""
    h, n = scores.shape
    hh, recent = int(n * hh_ratio), int(n * recent_ratio)
    order = sequence_order(pos)                                           # [H, n]
    if n <= hh + recent:
        return order, order[:, :0]
    rank = order.argsort(dim=1)                                           # sequence rank of each entry
    is_recent = rank >= n - recent
    text = is_text.to(scores.device) & ~is_recent
    k = max(hh, int(text.sum(1).max()), 1 if recent == 0 else 0)  # something to merge into
    pri = scores.float().masked_fill(text, float("inf")).masked_fill(is_recent, float("-inf"))
    top = pri.topk(k, dim=1).indices
    keep = is_recent.scatter(1, top, True)                                # [H, n] bool
    keep_sorted = keep.gather(1, order)
    kept = order[keep_sorted].view(h, -1)
    evicted = order[~keep_sorted].view(h, -1)
    return kept, evicted


def _best_match(kept_k: torch.Tensor, ev_k: torch.Tensor, kept_pos: torch.Tensor | None = None,
                ev_pos: torch.Tensor | None = None, reach: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the most cosine-similar kept key of every evicted key.
    kept_k [B, H, K, D], ev_k [B, H, E, D] -> (similarity [B, H, E], pivot index into K [B, H, E]).

    reach > 0 (with kept_pos [H, K] and ev_pos [H, E], each head's sequence indices in increasing
    order): an evicted entry is matched only among the kept entries within `reach` sequence
    positions of it, and its nearest kept entry on each side (so it always has a candidate). The
    search then costs about 2 x reach x (kept share) similarities per evicted entry instead of K.
    Ties go to the lowest index either way."""
    if reach > 0 and kept_pos is not None and ev_pos is not None:
        return _best_match_near(kept_k, ev_k, kept_pos, ev_pos, reach)
    kk, e = kept_k.shape[2], ev_k.shape[2]
    kn = F.normalize(kept_k.float(), dim=-1).transpose(-1, -2)            # [B, H, D, K]
    if kept_k.device.type == "cpu" and kk and e:
        return _best_match_tiled(kn, ev_k)
    return _best_match_blocked(kn, ev_k)


def _best_match_blocked(kn: torch.Tensor, ev_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_best_match` in blocks of evicted rows against every kept key at once, up to SIM_ELEMENTS
    similarities per block (kn: the normalized kept keys, [B, H, D, K]); the path off the CPU."""
    b, h, _, kk = kn.shape
    e = ev_k.shape[2]
    step = max(1, SIM_ELEMENTS // max(1, b * h * kk))
    sims, pivots = [], []
    for s in range(0, e, step):
        sim = torch.matmul(F.normalize(ev_k[:, :, s:s + step].float(), dim=-1), kn)  # [B, H, r, K]
        m, i = sim.max(-1)
        sims.append(m)
        pivots.append(i)
    return torch.cat(sims, 2), torch.cat(pivots, 2)


def _best_match_tiled(kn: torch.Tensor, ev_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_best_match` in ROW_TILE x KEY_TILE tiles (kn: the normalized kept keys, [B, H, D, K]);
    with fewer kept keys than KEY_TILE, proportionally more rows per tile. Key tiles run in
    increasing order and a later tile wins only when strictly more similar, so ties go to the
    lowest index as in the one-block search."""
    kk, e = kn.shape[-1], ev_k.shape[2]
    rows = ROW_TILE * max(1, KEY_TILE // kk)
    sims, pivots = [], []
    for s in range(0, e, rows):
        q = F.normalize(ev_k[:, :, s:s + rows].float(), dim=-1)            # [B, H, r, D]
        best, arg = torch.matmul(q, kn[..., :KEY_TILE]).max(-1)
        for c in range(KEY_TILE, kk, KEY_TILE):
            m, i = torch.matmul(q, kn[..., c:c + KEY_TILE]).max(-1)
            up = m > best
            best = torch.where(up, m, best)
            arg = torch.where(up, i + c, arg)
        sims.append(best)
        pivots.append(arg)
    return torch.cat(sims, 2), torch.cat(pivots, 2)


def _best_match_near(kept_k, ev_k, kept_pos, ev_pos, reach: int):
    """`_best_match` with the candidates of each evicted entry limited to the kept entries within
    `reach` positions (see there). Blocks of evicted entries about 2 x reach positions long are
    matched against the union of their candidates, the others masked out."""
    b, h, kk, _ = kept_k.shape
    e = ev_k.shape[2]
    if e == 0 or kk == 0:
        return _best_match(kept_k, ev_k)
    kpos = kept_pos.to(kept_k.device).long().contiguous()
    epos = ev_pos.to(kept_k.device).long().contiguous()
    ins = torch.searchsorted(kpos, epos)                                  # [H, E] first kept entry after
    lo = torch.minimum(torch.searchsorted(kpos, epos - reach), (ins - 1).clamp_min(0))
    hi = torch.maximum(torch.searchsorted(kpos, epos + reach, right=True), (ins + 1).clamp_max(kk))
    kn = F.normalize(kept_k.float(), dim=-1)                              # [B, H, K, D]
    span = int((hi - lo).max())
    per_pos = e / (int(epos.max()) + 1)                                   # evicted entries per position
    step = max(32, min(int(2 * reach * per_pos), SIM_ELEMENTS // max(1, b * h * span)))
    sims, pivots = [], []
    for s in range(0, e, step):
        lo_b, hi_b = lo[:, s:s + step], hi[:, s:s + step]                 # [H, r]
        c0, c1 = int(lo_b.min()), int(hi_b.max())
        sim = torch.matmul(F.normalize(ev_k[:, :, s:s + step].float(), dim=-1),
                           kn[:, :, c0:c1].transpose(-1, -2))             # [B, H, r, C]
        j = torch.arange(c0, c1, device=sim.device)
        sim = sim.masked_fill((j < lo_b[..., None]) | (j >= hi_b[..., None]), float("-inf"))
        m, i = sim.max(-1)
        sims.append(m)
        pivots.append(i + c0)
    return torch.cat(sims, 2), torch.cat(pivots, 2)


def _merge_filter(sim: torch.Tensor, ev_pos: torch.Tensor) -> torch.Tensor:
    """Keep evicted entries whose token's best similarity, averaged over the heads that evict it,
    is >= the mean best similarity of all evicted entries. sim [B, H, E], ev_pos [H, E] -> [B, H, E] bool."""
    b, h, e = sim.shape
    tok = ev_pos.to(sim.device).long().reshape(-1)                       # [H*E]
    n = int(tok.max()) + 1
    tsum = sim.new_zeros(b, n).scatter_add(1, tok[None].expand(b, -1), sim.reshape(b, -1))
    tcnt = sim.new_zeros(n).scatter_add(0, tok, torch.ones_like(tok, dtype=sim.dtype))
    tmean = tsum / tcnt.clamp_min(1)
    per_entry = tmean.gather(1, tok[None].expand(b, -1)).view(b, h, e)
    return per_entry >= sim.mean(dim=(1, 2), keepdim=True)


def lookm_merge(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor,
                pos: torch.Tensor, variant: str = "pivotal") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the evicted entries of every head into their most similar kept key (see module docstring).

    keys, values: [B, H, n, D]; kept [H, K], evicted [H, E]: entry indices; pos [H, n] sequence index.
    Returns the kept keys and values after merging, [B, H, K, D], in the input dtype."""
    kk, kv = gather_entries(keys, kept), gather_entries(values, kept)
    if variant == "none" or evicted.shape[1] == 0:
        return kk, kv
    ek, ev = gather_entries(keys, evicted).float(), gather_entries(values, evicted).float()
    sim, piv = _best_match(kk, ek)                                        # [B, H, E]
    if variant in ("averaged", "weighted"):
        use = _merge_filter(sim, pos.to(keys.device).gather(1, evicted.to(keys.device).long())).float()
    else:
        use = torch.ones_like(sim)
    pk, pv = kk.float(), kv.float()
    if variant == "pivotal":
        src_k = (ek + gather_pivots(pk, piv)) / 2
        src_v = (ev + gather_pivots(pv, piv)) / 2
    elif variant == "weighted":
        src_k, src_v = sim.unsqueeze(-1) * ek, sim.unsqueeze(-1) * ev
    elif variant == "averaged":
        src_k, src_v = ek, ev
    else:
        raise ValueError(f"unknown LOOK-M merge variant {variant!r}; choose one of {VARIANTS}")
    d = keys.shape[-1]
    idx = piv.unsqueeze(-1).expand(-1, -1, -1, d)
    w = use.unsqueeze(-1)
    count = 1 + use.new_zeros(pk.shape[:3]).scatter_add(2, piv, use)     # [B, H, K]
    new_k = pk.scatter_add(2, idx, src_k * w) / count.unsqueeze(-1)
    new_v = pv.scatter_add(2, idx, src_v * w) / count.unsqueeze(-1)
    return new_k.to(keys.dtype), new_v.to(values.dtype)


def gather_pivots(x: torch.Tensor, piv: torch.Tensor) -> torch.Tensor:
    """x [B, H, K, D], piv [B, H, E] -> x at the pivots [B, H, E, D]."""
    return x.gather(2, piv.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


@register
@dataclass
class LOOKM(KVPress):
    """LOOK-M: text-prior KV eviction, evicted keys merged into similar kept keys (arXiv 2406.18139).

    Defaults: hh_ratio=0.1 important + recent_ratio=0.1 recent entries per head (20% kept), or
    `ratio` (fraction evicted; the kept share split evenly between the two); all text tokens kept,
    merge="pivotal" (or "averaged", "weighted", "none"), probe="text" (importance from the text
    query rows; "all" sums every prompt row, as the official code). score="text" is that prior;
    "observed", "window" or "expected" ranks the visual entries by another importance (see
    importance.py). Before the question (compress_at="encode") the text rows are the prompt's
    text before the question; when no text row can see the media, observed attention is used.
    See the module docstring for the algorithm and the deviations from the official code.
    """

    name: ClassVar[str] = "lookm"
    aliases: ClassVar[tuple[str, ...]] = ("look-m", "look_m")
    main: ClassVar[str] = "merge"
    needs_question: ClassVar[bool] = False

    merge: str = "pivotal"
    hh_ratio: float = 0.1
    recent_ratio: float = 0.1
    probe: str = "text"
    ratio: float | None = None
    score: str = "text"
    proxy: str = ""
    min_text: int = 4

    def validate(self):
        check(self.merge in VARIANTS, f"lookm: merge must be one of {', '.join(VARIANTS)}, got {self.merge!r}")
        check(0 <= self.hh_ratio <= 1, f"lookm: hh_ratio must be in [0, 1], got {self.hh_ratio}")
        check(0 <= self.recent_ratio <= 1, f"lookm: recent_ratio must be in [0, 1], got {self.recent_ratio}")
        check(0 < self.hh_ratio + self.recent_ratio, "lookm: hh_ratio + recent_ratio must be positive")
        check(self.probe in ("text", "all"), f"lookm: probe must be 'text' or 'all', got {self.probe!r}")
        check(self.ratio is None or 0 <= self.ratio < 1,
              f"lookm: ratio (fraction evicted) must be in [0, 1), got {self.ratio}")
        check(self.min_text >= 0, f"lookm: min_text must be >= 0, got {self.min_text}")
        check(self.score in SCORE_CHOICES, f"lookm: score must be one of {', '.join(SCORE_CHOICES)}, "
                                           f"got {self.score!r}")

    @property
    def budget(self) -> tuple[float, float]:
        """(hh_ratio, recent_ratio) in effect."""
        if self.ratio is None:
            return self.hh_ratio, self.recent_ratio
        return (1 - self.ratio) / 2, (1 - self.ratio) / 2

    def _key(self, idx: int):
        return (self.name, "scores", idx)

    def _fallback(self) -> Importance:
        name = "observed" if self.score == "text" else self.score
        return make_importance(name)

    def _text_sees_media(self, ctx) -> bool:
        """Whether at least `min_text` text rows of this phase come after a media token (can see
        the media): a template's delimiter after the video alone is no text prior."""
        tt = ctx.token_type
        media = (tt != TEXT).nonzero()
        if media.numel() == 0:
            return True
        if self.proxy and ctx.phase == "encode":
            return True
        return int((tt[int(media[0]) + 1:] == TEXT).sum()) >= self.min_text

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx):
        st = StateSlice(ctx.state, self.name)
        if st.get("done"):
            return  # already compressed (compress_at="encode")
        if self.score == "text":
            self._observe_text(idx, layer, query, key, scaling, q_start, ctx)
        if self.score != "text" or (ctx.compress and not self._text_sees_media(ctx)):
            # the fallback, only gathered in the phase that compresses without a text prior
            self._fallback().observe(st, idx, layer, query, key, value, scaling, q_start, ctx)

    def _observe_text(self, idx, layer, query, key, scaling, q_start, ctx):
        lq = query.shape[2]
        rows = None
        if self.probe == "text":
            rows = text_rows(ctx, q_start, lq)
            if rows.numel() == 0:
                return
        kpos = key_positions(layer, key)
        qpos = torch.arange(q_start, q_start + lq, device=query.device)
        got = attention_received(query, key, kpos, qpos, scaling, rows)   # [Hk, Lk]
        ctx.state[self._key(idx)] = accumulate(ctx.state.get(self._key(idx)), got, kpos, layer.seen)

    def _scores(self, idx, layer, ctx):
        acc = ctx.state.get(self._key(idx))
        if self.score == "text" and acc is not None and self._text_sees_media(ctx):
            return entry_scores(acc, layer.pos)
        st = StateSlice(ctx.state, self.name)
        imp = self._fallback()
        if not imp.ready(st, idx):
            raise RuntimeError(f"lookm: no attention statistics were gathered for layer {idx}; it needs the "
                               "pipeline's prefill (observe) before compress")
        return imp.scores(st, idx, layer, ctx)[0]

    def compress(self, cache, ctx) -> None:
        kept_total = held_total = 0
        hh_ratio, recent_ratio = self.budget
        for idx, layer in enumerate(cache.layers):
            if not layer.is_initialized or layer.residual_len == 0:
                continue
            if layer.segments:
                raise RuntimeError("lookm runs before quantization; put it before the quantizing press")
            pos = layer.pos
            scores = self._scores(idx, layer, ctx)                        # [H, n]
            tt = ctx.token_type.to(pos.device)
            is_text = tt[pos.long()] == TEXT
            kept, evicted = lookm_select(scores, is_text, pos, hh_ratio, recent_ratio)
            held_total += pos.shape[1]
            kept_total += kept.shape[1]
            if evicted.shape[1] == 0:
                continue
            k, v = lookm_merge(layer.keys, layer.values, kept, evicted, pos, self.merge)
            layer.set_residual(k, v, pos.gather(1, kept.to(pos.device)))
        StateSlice(ctx.state, self.name)["done"] = True
        if held_total:
            ctx.stats["lookm_kept_fraction"] = kept_total / held_total
