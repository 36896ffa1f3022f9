"""Score-based eviction: the base the query-agnostic presses share (observed attention, SnapKV,
Expected Attention, AdaKV), and the merges any of them may add.

A press is an `Importance` (importance.py: what each entry is worth, from statistics gathered in
`observe` during prefill) plus a budget (budgets.py: how many entries each layer and head keeps)
plus an optional merge of the evicted entries into the kept ones:

- merge="none": plain eviction.
- merge="pivotal" / "averaged" / "weighted": LOOK-M's merges (Wan et al., arXiv 2406.18139; see
  lookm.py): each evicted entry joins its most cosine-similar kept key in the same head.
- merge="anchor": Elastic Cache's (Liu et al., arXiv 2407.18121; see elastic.py): each evicted
  entry is averaged into the kept, unprotected entry nearest to it in the sequence.
- merge="mass": mmkv's mass-preserving merge (mass.py, after Token Merging's proportional
  attention): each evicted entry adds its weight to the kept entry of its head with the most
  similar key, which then weighs log n more in every later softmax; keys and values unchanged.
  reach=R (default 0: the whole head) limits its search to the kept entries within R positions.

Shared choices (each press's docstring adds its own):
- `ratio` is the fraction of the held entries EVICTED, per compression; kept entries keep their
  original positions (post-RoPE keys, never re-rotated) and the next token continues from the
  uncompressed length.
- Protected, inside the budget: the first `sink` entries (attention sinks, StreamingLLM) and,
  with keep_text, every TEXT entry (system prompt, template, question). This follows the
  research brief's "never evict" list; the papers evict text too.
- Compression happens once (after the prefix with compress_at="encode", else after the
  question); nothing is evicted while decoding. Observation stops once compressed.
- share (mmkv's choice, 0 = each layer ranks by its own scores, as the papers): every layer's
  scores are scaled to mean 1 and mixed with the mean over all layers of each token's score,
  s_l <- (1 - share) s_l + share * mean_l' s_l'[token]. A token's importance is then partly a
  property of the token, not of the layer. Related: GemFilter (Shi et al., arXiv 2409.17422)
  selects one token set with an early layer's attention for all layers. On the bundled model,
  deep layers' prefix rows barely attend to the needles the question reads (a per-layer
  ranking drops them there); the shared ranking keeps them (BENCHMARKS.md).
- proxy: a stand-in question ("tail" = the chat template's assistant header alone, or any
  text) is prefilled after the prefix over a throwaway copy of the cache at encode, so its rows
  can vote (SnapKV's window becomes those rows; observed attention adds them); its KV is
  dropped. StreamMem uses chat-template tokens as such a proxy [research brief, secondary].
- With per-head budgets the heads hold different counts: they are stored in a `RaggedSegment`
  (real savings, no padding). A quantizing press after it only sees the layer's full-precision
  tail (what the question and answer add), so per-head budgets and quantization do not compose;
  use budget="layer" there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..stages import check
from .base import TEXT, KVPress
from .budgets import MODES, head_budgets, layer_budgets, mass_entries, select
from .elastic import elastic_merge, nearest_anchor
from .importance import Importance, StateSlice
from .lookm import lookm_merge
from .mass import mass_merge
from .ragged import RaggedSegment
from .scores import gather_entries, sequence_order

MERGES = ("none", "pivotal", "averaged", "weighted", "anchor", "mass")


def merge_into_kept(keys, values, pos, keep: torch.Tensor, protect: torch.Tensor, merge: str,
                    logw: torch.Tensor | None = None, reach: int = 0):
    """One head set with the same count per head. keys, values [B, H, n, D]; pos [H, n]; keep,
    protect [H, n] bool; logw [H, n] the entries' log-weights or None (core.py). Returns (keys,
    values [B, H, k, D], pos [H, k], logw [H, k] or None) in sequence order. reach: the mass
    merge's search distance (mass.py; 0 = the whole head)."""
    h, n = keep.shape
    order = sequence_order(pos)                                           # [H, n]
    ks = keep.gather(1, order)
    kept = order[ks].view(h, -1)
    evicted = order[~ks].view(h, -1)
    new_pos = pos.gather(1, kept.to(pos.device))
    if merge == "mass":
        w = mass_merge(keys, kept, evicted, logw, pos, reach)
        return gather_entries(keys, kept), gather_entries(values, kept), new_pos, w
    # the other merges: the kept entries keep the weights they had
    new_logw = None if logw is None else logw.gather(1, kept.to(logw.device))
    if merge == "none" or evicted.shape[1] == 0:
        return gather_entries(keys, kept), gather_entries(values, kept), new_pos, new_logw
    if merge == "anchor":
        amask = (keep & ~protect).gather(1, order)
        if bool((amask.sum(1) == 0).any()) or bool((amask.sum(1) != amask.sum(1)[0]).any()):
            amask = ks                                                    # no (or uneven) free anchors: any kept entry
        anchors = order[amask].view(h, -1)
        anchor = nearest_anchor(pos, anchors, evicted)
        k, v = elastic_merge(keys, values, kept, evicted, anchor)
        return k, v, new_pos, new_logw
    k, v = lookm_merge(keys, values, kept, evicted, pos, merge)
    return k, v, new_pos, new_logw


def share_across_layers(layers, share: float):
    """Mix each layer's scores with the mean over layers of every token's score (each layer's
    scores first scaled to mean 1): s_l <- (1 - share) s_l + share * mean_l' mean_h s_l'[token]."""
    n_seq = max(int(lay.pos.max()) + 1 for _, lay, *_ in layers)
    total = None
    norm = []
    for idx, lay, sc, mass, prot in layers:
        s = sc.float() / sc.float().mean().clamp_min(1e-30)
        norm.append(s)
        tok = torch.zeros(n_seq, device=s.device).scatter_add(0, lay.pos.reshape(-1).long().to(s.device), s.reshape(-1))
        cnt = torch.zeros(n_seq, device=s.device).scatter_add(0, lay.pos.reshape(-1).long().to(s.device),
                                                              torch.ones_like(s.reshape(-1)))
        t = tok / cnt.clamp_min(1)
        total = t if total is None else total + t.to(total.device)
    g = total / len(layers)
    return [(idx, lay, (1 - share) * s + share * g.to(s.device)[lay.pos.long().to(s.device)], mass, prot)
            for (idx, lay, _, mass, prot), s in zip(layers, norm)]


@dataclass
class EvictionPress(KVPress):
    """Base of score-based eviction presses (see module docstring). Subclasses set `name` and
    build their scorer in `importance()`."""

    main: ClassVar[str] = "ratio"

    ratio: float = 0.5
    budget: str = "uniform"
    merge: str = "none"
    sink: int = 4
    keep_text: bool = True
    tau: float = 0.975
    alpha: float = 0.2
    proxy: str = ""
    share: float = 0.0
    reach: int = 0

    def validate(self):
        check(0 <= self.ratio < 1, f"{self.name}: ratio (fraction evicted) must be in [0, 1), got {self.ratio}")
        check(self.budget in MODES, f"{self.name}: budget must be one of {', '.join(MODES)}, got {self.budget!r}")
        check(self.merge in MERGES, f"{self.name}: merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        check(self.merge != "mass" or "head" not in self.budget,
              f"{self.name}: merge='mass' needs the same count in every head (budget uniform or layer), "
              f"got budget={self.budget!r}")
        check(self.sink >= 0, f"{self.name}: sink must be >= 0, got {self.sink}")
        check(self.reach >= 0, f"{self.name}: reach (the mass merge's search distance in positions, 0 = all) "
                               f"must be >= 0, got {self.reach}")
        check(self.reach == 0 or self.merge == "mass",
              f"{self.name}: reach limits the mass merge's search; it needs merge='mass', got merge={self.merge!r}")
        check(0 < self.tau <= 1, f"{self.name}: tau must be in (0, 1], got {self.tau}")
        check(0 <= self.alpha <= 1, f"{self.name}: alpha must be in [0, 1], got {self.alpha}")

    def importance(self) -> Importance:
        raise NotImplementedError

    @property
    def _imp(self) -> Importance:
        imp = self.__dict__.get("_imp_cache")
        if imp is None:
            imp = self.__dict__["_imp_cache"] = self.importance()
        return imp

    def state(self, ctx) -> StateSlice:
        return StateSlice(ctx.state, self.name)

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx):
        st = self.state(ctx)
        if st.get("done"):
            return  # already compressed (compress_at="encode"): later rows change nothing
        self._imp.observe(st, idx, layer, query, key, value, scaling, q_start, ctx)

    def protected(self, layer, ctx) -> torch.Tensor:
        """[H, n] bool: the entries always kept."""
        pos = layer.pos.long()
        prot = pos < self.sink
        if self.keep_text:
            tt = ctx.token_type.to(pos.device)
            prot |= tt[pos.clamp_max(tt.numel() - 1)] == TEXT
        return prot

    def layer_scores(self, idx, layer, ctx):
        """(scores, mass) [H, n] of the entries layer idx holds (the reusable scorer API)."""
        return self._imp.scores(self.state(ctx), idx, layer, ctx)

    def compress(self, cache, ctx) -> None:
        st = self.state(ctx)
        layers = []
        for idx, layer in enumerate(cache.layers):
            if not layer.is_initialized or layer.residual_len == 0:
                continue
            if layer.segments:
                raise RuntimeError(f"{self.name} runs before quantization; put it before the quantizing press")
            if not self._imp.ready(st, idx):
                raise RuntimeError(f"{self.name}: no attention statistics were gathered for layer {idx}; it needs "
                                   "the pipeline's prefill (observe) before compress")
            scores, mass = self.layer_scores(idx, layer, ctx)
            layers.append((idx, layer, scores, mass, self.protected(layer, ctx)))
        if not layers:
            return
        if self.share > 0:
            layers = share_across_layers(layers, self.share)
        sizes = [lay.pos.shape[1] for _, lay, *_ in layers]
        needs = [mass_entries(m, self.tau) for *_, m, _ in layers] if "layer" in self.budget else None
        keeps = layer_budgets(sizes, self.ratio, needs)
        held = kept = 0
        per_layer = []
        for (idx, layer, scores, mass, prot), k in zip(layers, keeps):
            h, n = scores.shape
            if "head" in self.budget:
                counts = head_budgets(scores, k, prot, self.alpha)
            else:
                counts = torch.full((h,), k, dtype=torch.long)
            counts = torch.maximum(counts.cpu(), prot.sum(1).cpu()).clamp_max(n)
            keep = select(scores, counts, prot)
            self._store(layer, keep, prot)
            held += h * n
            kept += int(counts.sum())
            per_layer.append(int(counts.sum()) / h)
        st["done"] = True
        ctx.stats[f"{self.name}_kept_fraction"] = kept / held
        ctx.stats[f"{self.name}_kept_per_layer"] = per_layer

    def _store(self, layer, keep: torch.Tensor, prot: torch.Tensor) -> None:
        counts = keep.sum(1)
        if bool((counts == counts[0]).all()):
            k, v, p, w = merge_into_kept(layer.keys, layer.values, layer.pos, keep, prot, self.merge, layer.logw,
                                         self.reach)
            layer.set_residual(k, v, p, w)
            return
        if self.merge == "mass" or layer.logw is not None:
            raise RuntimeError(f"{self.name}: per-head counts (a ragged layer) cannot carry a mass merge's log-weights")
        ks, vs, ps = [], [], []
        for h in range(keep.shape[0]):
            k, v, p, _ = merge_into_kept(layer.keys[:, h:h + 1], layer.values[:, h:h + 1], layer.pos[h:h + 1],
                                         keep[h:h + 1], prot[h:h + 1], self.merge)
            ks.append(k[:, 0])
            vs.append(v[:, 0])
            ps.append(p[0])
        layer.segments = [RaggedSegment.from_heads(ks, vs, ps)]
        layer.set_residual(layer.keys[:, :, :0], layer.values[:, :, :0], layer.pos[:, :0])
