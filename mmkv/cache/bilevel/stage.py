"""Video-XL-2's chunk-based prefill and bi-level KV decoding, training-free (Qin et al.,
"Video-XL-2: Towards Very Long-Video Understanding Through Task-Aware KV Sparsification",
arXiv 2506.19225).

Encode (query-agnostic, once per video):
1. Chunked prefill. The visual tokens are prefilled in chunks of `frames` frames (whole temporal
   slots). A chunk attends fully to itself and to the text before the video, and to every
   earlier chunk through that chunk's sparse level only (`cross="sparse"`): per chunk the
   attention reads ~keep x (tokens before it) + chunk entries instead of all of them.
   `cross="dense"` prefills exactly as the plain model (the reference), then splits the levels.
   `window=W` (Video-XL-2's local window: its prefill sees the previous chunks densely) keeps
   the last W chunks dense for the chunk being prefilled: chunk c is sealed once chunk c + W is
   prefilled, so the prefill still grows linearly (W chunks more per chunk) and the device holds
   W chunks more during the prefill only. `prekeep=P` (> keep) lets the later chunks' prefill see
   the top P of each sealed chunk instead of its top `keep` (the same ranking: the sparse level
   and the next entries); the entries beyond `keep` join the offloaded level when the prefill
   ends, so the encoding is the same size, and the device holds P instead of `keep` of the
   sealed chunks during the prefill only.
2. Two levels per chunk, sealed right after its prefill, per layer: the sparse level, the top
   `keep` entries per KV head by a query-agnostic score (`sparse`, see sparse.py), stays on the
   device; the rest of the chunk (its complement: the dense level minus the sparse entries) is
   offloaded (`offload`: CPU memory, pinned under CUDA, or a memory-mapped file). With a
   quantizer after this stage (e.g. "bilevel+kivi:2") both levels are stored in its packed
   format (its own `flush`, whole groups; leftovers in full precision).
Ask (per question, per layer, while the question is prefilled):
3. Relevance of every chunk from the question's queries at that layer (`score`, relevance.py),
   then the complements of the most relevant chunks within `budget` are fetched back; the
   layer's attention for the question and every decoded token reads: the text, every chunk's
   sparse level, and the chosen chunks' complements (= those chunks dense). One prefill of the
   question: a layer selects from its own queries, then attends over the mix.
The encoding is never modified: each question's mix is built in its own copy of the cache.
With `mass=1` (mmkv's addition, mmkv/cache/mass.py) a sparse level also stands for its chunk's
complement: each complement entry adds its weight to the most similar sparse entry of its head
(a log-count on that entry's logit), in the prefill's cross-chunk attention and at every question
for the chunks it leaves sparse; a chunk brought back dense has its sparse entries' weights
reset to 0 for that question (a re-weighted copy of the pool's segments, the codes shared).

Positions: original everywhere (keys keep the rotation of their original position; decoding
continues after the uncompressed prompt).

Defaults: frames=16 (Video-XL-2's chunk of 4 groups of 4 frames; research brief §9), keep=0.04 and
budget=0.05 (the device holds the text, 4% of the video's entries as sparse levels, and at most
5% more brought back per question: 9.3% of the uncompressed KV during decoding on the long
benchmark at 2,048 frames, where keep=0.05 held 10.1%; +0.8 [-0.8, +2.5] under `encode` and
+1.5 [-0.2, +3.2] under `multiturn`, 600 questions each, the best of five settings tried on
those videos; +0.0 [-1.3, +1.3] under `encode` on 200 fresh ones, BENCHMARKS.md), sparse="attn",
score="quest" (both measured best of their alternatives, docs/bilevel.md), share=1 (one
ranking of each chunk for all layers: on the long benchmark at 2,048 frames 66.3% against 57.3%
with each layer ranking by its own scores, whose layer 0 drops most object tokens; the same on
the quick needle set within one answer), mass=True and window=3 (together, on the long
benchmark: 561 of 600 answers equal to uncompressed at 2,048 frames, +0.3 [-1.0, +1.7], against
502 and +0.0 [-2.0, +2.0] with neither; 284 of 300 against 248 at 1,024 frames; mass alone did
not help; `mass=0` with a quantizer other than kivi), cross="sparse", offload="cpu".

Deviations from Video-XL-2 (the paper and its released evaluation code), and why:
- Training-free on the supported models, so no chunk window or global timestamp tokens: a chunk
  sees all earlier chunks, through their sparse levels (Video-XL-2's prefill sees the previous
  3 chunks densely and the others through timestamp tokens only, a mask its model is trained
  with; its released code builds that mask densely, with no compute saving).
- The sparse level is a subset of the chunk's entries chosen by query-agnostic importance, not
  4x average pooling of post-RoPE keys (which mixes the rotations of different positions, and
  under M-RoPE of different rows and columns).
- Relevance comes from the question's own queries per layer (ReKV-style internal retrieval);
  Video-XL-2 reads chunk choices from an external retriever's files, per benchmark category.
- The dense level really is offloaded and only the chosen chunks come back (the released code
  keeps the whole dense cache on the GPU and gathers from it).
- Positions stay the original ones; Video-XL-2 re-indexes the question and decoded tokens to the
  compressed length.
- One question prefill (each layer selects from its own queries before its attention), where
  Video-XL-2 prefills the question twice (once to select, once over the mix).
- Follow-ups in a conversation re-select: each question brings back its own chunks within the
  budget (the earlier question's chunks return to sparse; the earlier turns' tokens stay).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ...stages import check, register
from ..base import KVPress
from ..mass import mass_merge
from .offload import Offload
from .parts import join, pack_level, storage_bytes
from .plan import ChunkPlan, plan_chunks
from .relevance import RULES, choose, relevance, summarize
from .sparse import BUILTIN, KEY, make_scorer, select_top


@dataclass
class Encoding:
    """What one encoded video's bi-level cache needs besides its device cache (kept in the press
    context's state, shared read-only by every question)."""

    plan: ChunkPlan
    keep: list[int]                      # sparse entries per chunk (per KV head)
    seen: list[int]                      # entries per chunk the later chunks' prefill sees (>= keep)
    quantizer: Any
    offload: Offload
    scorer: Any
    num_layers: int
    dense: list = field(default_factory=list)        # [layer][chunk] offloaded complement segments
    dense_bytes: list = field(default_factory=list)  # [layer][chunk] K/V bytes of each complement
    pool: list = field(default_factory=list)         # [layer] device segments of all sparse levels
    summary: list = field(default_factory=list)      # [layer] [H, C, 2|1, D] or None
    chunk_summaries: list = field(default_factory=list)  # [layer] per-chunk summaries while sealing
    seen_pool: list = field(default_factory=list)    # [layer] device segments seen by the prefill, not kept
    final_w: list = field(default_factory=list)      # [layer] [(pos [H, k], logw [H, k])]: after the prefill
    sealed: int = 0                      # chunks sealed (in order), the same in every layer
    peak: int = 0                        # device KV bytes at the prefill's peak
    done: bool = False

    def summary_bytes(self) -> int:
        return sum(s.nbytes for s in self.summary if s is not None)

    def offloaded_bytes(self) -> int:
        return sum(sum(row) for row in self.dense_bytes)


@register
@dataclass
class BiLevel(KVPress):
    """Video-XL-2: chunked prefill, sparse level on the device, dense offloaded, reloaded per question (arXiv 2506.19225).

    frames: frames per chunk (whole temporal slots). keep: the sparse level, a fraction of each
    chunk's visual entries (<= 1) or entries per layer for the whole video (> 1). budget: entries
    brought back dense per question and layer, a fraction of the video's visual entries (<= 1;
    1 = every chunk) or a count (> 1); budget_mib > 0 replaces it by MiB per question (all layers).
    sparse: attn | norm | uniform | a KV stage with entry_scores. score: quest | attn | mean.
    cross: sparse | dense (reference). offload: cpu | disk (dir: where the file goes).
    ends: always bring back the first and last chunk first. mass: a chunk left sparse keeps its
    complement's share of the attention (merge=mass, mmkv/cache/mass.py). share: each layer's
    scores mixed with their mean over the layers (the eviction presses' share). window: chunks
    before each chunk that its prefill attends densely (cross=sparse; with cross=dense every chunk is
    seen densely and it changes nothing). prekeep: the share of each sealed chunk the later
    chunks' prefill sees (> keep; 0 = keep), offloaded beyond keep after the prefill. Module
    docstring: details.
    """

    name: ClassVar[str] = "bilevel"
    aliases: ClassVar[tuple[str, ...]] = ("videoxl2",)
    main: ClassVar[str] = "budget"
    bilevel: ClassVar[bool] = True  # the pipeline chunks the prefill and calls the hooks below

    budget: float = 0.05
    keep: float = 0.04
    frames: int = 16
    sparse: str = "attn"
    score: str = "quest"
    cross: str = "sparse"
    offload: str = "cpu"
    dir: str = ""
    ends: bool = False
    budget_mib: float = 0.0
    mass: bool = True
    share: float = 1.0
    window: int = 3
    prekeep: float = 0.0

    def validate(self):
        check(self.frames >= 1, f"bilevel: frames must be >= 1, got {self.frames}")
        check(self.keep > 0, f"bilevel: keep must be positive (a fraction <= 1 or a count), got {self.keep}")
        check(self.keep <= 1 or float(self.keep).is_integer(), f"bilevel: keep > 1 is a count, got {self.keep}")
        check(self.budget >= 0, f"bilevel: budget must be >= 0, got {self.budget}")
        check(self.budget <= 1 or float(self.budget).is_integer(), f"bilevel: budget > 1 is a count, got {self.budget}")
        check(self.budget_mib >= 0, f"bilevel: budget_mib must be >= 0, got {self.budget_mib}")
        check(self.score in RULES, f"bilevel: score must be one of {', '.join(RULES)}, got {self.score!r}")
        check(self.cross in ("sparse", "dense"), f"bilevel: cross must be 'sparse' or 'dense', got {self.cross!r}")
        check(self.offload in ("cpu", "disk"), f"bilevel: offload must be 'cpu' or 'disk', got {self.offload!r}")
        check(self.window >= 0, f"bilevel: window must be >= 0 (chunks seen densely), got {self.window}")
        check(self.prekeep >= 0, f"bilevel: prekeep must be >= 0 (0: the sparse level), got {self.prekeep}")
        check(self.prekeep <= 1 or float(self.prekeep).is_integer(),
              f"bilevel: prekeep > 1 is a count, got {self.prekeep}")
        check(0 <= self.share <= 1, f"bilevel: share must be in [0, 1], got {self.share}")
        check(not (self.share and self.sparse == "uniform"), "bilevel: share mixes scores; sparse=uniform has none")
        if self.sparse not in BUILTIN:
            make_scorer(self.sparse)  # raises RecipeError naming the choices

    # ------------------------------------------------------------------ encode
    def check_recipe(self, recipe, deferred: bool) -> None:
        """The recipes this stage runs in: vision presses before it, at most a quantizing press
        after it, no prefill policy (it owns the prefill), and a video prefilled before the question."""
        others = [s.name for s in recipe.kv if s is not self and not getattr(s, "quantizes", False)]
        check(not others, f"bilevel builds its own sparse level; instead of a separate KV press "
                          f"({', '.join(others)}), name an eviction press with entry_scores as its scorer "
                          "(bilevel:sparse=NAME), and put a quantizer after it (e.g. 'bilevel+kivi:2')")
        check(recipe.prefill is None, f"bilevel chunks the prefill itself; it cannot run with the prefill policy "
                                      f"{getattr(recipe.prefill, 'name', '')!r}")
        check(not deferred, "bilevel needs the video prefilled before the question; a query-aware stage defers it")
        quant = [s.name for s in recipe.kv if getattr(s, "quantizes", False)]
        check(not any(getattr(s, "salient", 0) for s in recipe.kv if s is not self),
              "bilevel packs each level with the quantizer's codes alone; kivi:salient (exact salient entries) "
              "is not applied inside it, so leave salient=0 after bilevel")
        check(not self.mass or quant in ([], ["kivi"]), f"bilevel's mass=1 (the default) carries its log-weights into "
                                                      f"kivi's segments only, not {', '.join(quant)}'s: with "
                                                      f"{', '.join(quant)} write bilevel:mass=0")

    def begin(self, ctx, visual, adapter, recipe=None) -> None:
        """Plan the chunks of the prefix about to be prefilled (called by the pipeline)."""
        quantizer = next((s for s in recipe.kv if getattr(s, "quantizes", False)), None) if recipe else None
        plan = plan_chunks(ctx.token_type, visual, adapter.frames_per_chunk(self.frames), adapter.temporal_patch)
        n_layers = adapter.num_layers
        keep = plan.counts(self.keep)
        seen = [max(k, p) for k, p in zip(keep, plan.counts(self.prekeep))] if self.prekeep > 0 else list(keep)
        enc = Encoding(plan, keep, seen, quantizer, Offload(self.offload, self.dir or None),
                       make_scorer(self.sparse), n_layers,
                       dense=[[None] * plan.n for _ in range(n_layers)],
                       dense_bytes=[[0] * plan.n for _ in range(n_layers)],
                       pool=[[] for _ in range(n_layers)], summary=[None] * n_layers,
                       chunk_summaries=[[] for _ in range(n_layers)],
                       seen_pool=[[] for _ in range(n_layers)],
                       final_w=[[] for _ in range(n_layers)])
        ctx.state[(KEY,)] = enc
        ctx.stats.update(bilevel_chunks=plan.n, bilevel_chunk_frames=plan.frames,
                         bilevel_chunk_spans=[list(s) for s in plan.spans],
                         bilevel_chunk_tokens=plan.sizes.tolist(), bilevel_offload=enc.offload.kind)

    def cuts(self, ctx) -> list[int]:
        """Sequence indices where a prefill slice must end: every chunk boundary."""
        enc = ctx.state.get((KEY,))
        if enc is None or enc.done:
            return []
        return sorted(set(enc.plan.starts.tolist()) | set(enc.plan.ends.tolist()))

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx) -> None:
        enc = ctx.state.get((KEY,))
        if enc is None or enc.done or enc.sealed >= enc.plan.n:
            return
        if layer.seen <= int(enc.plan.starts[enc.sealed]):
            return  # the text before the video: no chunk entry in the layer yet
        enc.scorer.observe(idx, layer, query, key, value, scaling, q_start, ctx)

    def after_forward(self, cache, ctx, end: int, last: bool) -> None:
        """Called after each prefill slice ending at sequence index `end` (`last`: the end of
        this prefill call): seals the chunks that are complete (all of them at the end with
        cross="dense")."""
        enc = ctx.state.get((KEY,))
        if enc is None or enc.done:
            return
        enc.peak = max(enc.peak, cache.nbytes())
        ends = enc.plan.ends.tolist()
        if self.cross == "sparse":
            upto = enc.sealed
            while upto < enc.plan.n and ends[upto] <= end:
                upto += 1
            if not last:  # the last `window` complete chunks stay dense for the chunks after them
                upto = max(enc.sealed, upto - self.window)
        else:
            upto = enc.plan.n if last else enc.sealed
        if upto > enc.sealed:
            self._seal(cache, ctx, enc, range(enc.sealed, upto))
            enc.sealed = upto
            enc.peak = max(enc.peak, cache.nbytes())
        if last and enc.sealed >= enc.plan.n:
            self._finish(cache, ctx, enc)

    def _chunk_rows(self, layer, idx: int, plan, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = layer.pos[0]                                                    # the tail is in sequence order
        s, e = int(plan.starts[c]), int(plan.ends[c])
        inside = (pos >= s) & (pos < e)
        rows = inside.nonzero().squeeze(1)
        if rows.numel() != e - s:
            raise RuntimeError(f"bilevel: layer {idx} holds {rows.numel()} of chunk {c}'s {e - s} entries "
                               "in full precision; another press changed the cache during the prefill")
        return inside, rows

    def _shared_scores(self, cache, ctx, enc: Encoding, chunks: range) -> dict:
        """Each (layer, chunk)'s entry scores scaled to mean 1, mixed with their mean over the layers
        (and KV heads) as `share` says (evict.share_across_layers' rule): {(idx, c): [H, n]}."""
        per: dict = {}
        for idx, layer in enumerate(cache.layers):
            if not layer.is_initialized:
                continue
            for c in chunks:
                _, rows = self._chunk_rows(layer, idx, enc.plan, c)
                sc = enc.scorer.entry_scores(idx, layer.keys.index_select(2, rows), layer.values.index_select(2, rows),
                                             layer.pos.index_select(1, rows), ctx).float()
                per[(idx, c)] = sc / sc.mean().clamp_min(1e-30)
        mean = {c: torch.stack([s.mean(0).cpu() for (_, cc), s in per.items() if cc == c]).mean(0) for c in chunks}
        return {(idx, c): (1 - self.share) * s + self.share * mean[c].to(s.device) for (idx, c), s in per.items()}

    def _select(self, enc: Encoding, shared: dict, idx: int, c: int, K, V, P, k: int, ctx) -> torch.Tensor:
        """[H, k] ascending indices of chunk c's top k entries in layer idx."""
        return select_top(shared[(idx, c)], k) if shared else enc.scorer.select(idx, K, V, P, k, ctx)

    def _seal(self, cache, ctx, enc: Encoding, chunks: range) -> None:
        plan = enc.plan
        shared = self._shared_scores(cache, ctx, enc, chunks) if self.share > 0 else {}
        for idx, layer in enumerate(cache.layers):
            if not layer.is_initialized:
                continue
            drop = torch.zeros_like(layer.pos[0], dtype=torch.bool)
            new_sparse, new_extra = [], []
            for c in chunks:
                s, e = int(plan.starts[c]), int(plan.ends[c])
                inside, rows = self._chunk_rows(layer, idx, plan, c)
                drop |= inside
                K = layer.keys.index_select(2, rows)                         # [B, H, n, D]
                V = layer.values.index_select(2, rows)
                P = layer.pos.index_select(1, rows)                          # [H, n]
                n, k, pk = e - s, enc.keep[c], enc.seen[c]
                h = P.shape[0]
                every = torch.arange(n, device=P.device).expand(h, n)
                seen = every if pk >= n else self._select(enc, shared, idx, c, K, V, P, pk, ctx)  # [H, pk]
                if k >= seen.shape[1]:
                    sel = seen
                else:   # the sparse level: the top k of the entries the prefill sees
                    sub = {(idx, c): shared[(idx, c)].gather(1, seen)} if shared else {}
                    sel = seen.gather(1, self._select(enc, sub, idx, c, _take(K, seen), _take(V, seen),
                                                      P.gather(1, seen), k, ctx))
                rest = torch.ones(h, n, dtype=torch.bool, device=P.device).scatter_(1, sel, False)
                comp = rest.nonzero()[:, 1].view(h, n - sel.shape[1])            # [H, n - k] ascending
                unseen, wide = comp, seen.shape[1] > sel.shape[1]
                if wide:   # prekeep: seen by the prefill, offloaded (and off the device after it)
                    far = torch.ones(h, n, dtype=torch.bool, device=P.device).scatter_(1, seen, False)
                    unseen = far.nonzero()[:, 1].view(h, n - seen.shape[1])
                    extra = (rest & ~far).nonzero()[:, 1].view(h, seen.shape[1] - sel.shape[1])
                # mass: the sparse entries stand for the complement too (a log-count each), until
                # a question brings the chunk back dense (prepare zeroes them then); during the
                # prefill the entries it sees stand for the ones it does not
                w = mass_merge(K, sel, comp) if self.mass and sel.shape[1] < n else None
                if self.mass and self.prekeep > 0:   # the weights after the prefill, with their entries
                    fin = w if w is not None else torch.zeros(sel.shape)
                    enc.final_w[idx].append((P.gather(1, sel).long().cpu(), fin.float().cpu()))
                ew = None
                if wide and self.mass:   # during the prefill, the seen entries stand for the unseen ones
                    w_pre = mass_merge(K, seen, unseen) if unseen.shape[1] else torch.zeros(seen.shape, device=K.device)
                    by_entry = torch.zeros(h, n, device=K.device).scatter_(1, seen, w_pre)
                    w, ew = by_entry.gather(1, sel), by_entry.gather(1, extra)
                if wide:
                    new_extra += pack_level(_take(K, extra), _take(V, extra), P.gather(1, extra), None, "seen", ew)
                new_sparse += pack_level(_take(K, sel), _take(V, sel), P.gather(1, sel), enc.quantizer, "sparse", w)
                dense = pack_level(_take(K, unseen), _take(V, unseen), P.gather(1, unseen), enc.quantizer, "dense")
                if wide:   # the offloaded level holds the seen entries too (read only at a question)
                    dense += pack_level(_take(K, extra), _take(V, extra), P.gather(1, extra), enc.quantizer, "dense")
                enc.dense_bytes[idx][c] = sum(p.nbytes for p in dense)
                enc.dense[idx][c] = [enc.offload.put(p) for p in dense]
                summ = summarize(self.score, K)
                if summ is not None:
                    enc.chunk_summaries[idx].append(summ)
            keep_rows = (~drop).nonzero().squeeze(1)
            layer.set_residual(layer.keys.index_select(2, keep_rows), layer.values.index_select(2, keep_rows),
                               layer.pos.index_select(1, keep_rows))
            old = enc.pool[idx] + enc.seen_pool[idx]
            enc.pool[idx] = join(enc.pool[idx] + new_sparse)
            enc.seen_pool[idx] = join(enc.seen_pool[idx] + new_extra)
            layer.segments = ([s for s in layer.segments if not any(s is o for o in old)]
                              + enc.pool[idx] + enc.seen_pool[idx])

    def _finish(self, cache, ctx, enc: Encoding) -> None:
        for idx, layer in enumerate(cache.layers):   # prekeep: the entries only the prefill saw leave the device
            gone = enc.seen_pool[idx]
            if not gone:
                continue
            old = enc.pool[idx]
            if enc.final_w[idx]:   # the sparse entries now stand for the whole complement
                pos, order = torch.cat([p for p, _ in enc.final_w[idx]], 1).sort(1)
                w = torch.cat([w for _, w in enc.final_w[idx]], 1).gather(1, order)
                enc.pool[idx] = [p if getattr(p, "logw", None) is None else dataclasses.replace(
                    p, logw=_by_pos(pos, w, p.pos).to(p.logw.device)) for p in old]
            layer.segments = [s for s in layer.segments if not any(s is o for o in old + gone)] + enc.pool[idx]
        enc.seen_pool, enc.final_w = [], []
        for idx in range(enc.num_layers):
            if enc.chunk_summaries[idx]:
                enc.summary[idx] = torch.stack(enc.chunk_summaries[idx], 1)  # [H, C, 2|1, D]
        enc.chunk_summaries = []
        enc.done = True
        ctx.stats.update(bilevel_offloaded_bytes=enc.offloaded_bytes(),
                         bilevel_offloaded_storage_bytes=enc.offload.stored_bytes,
                         bilevel_summary_bytes=enc.summary_bytes(),
                         bilevel_summary_elements=sum(t.numel() for t in enc.summary if t is not None),
                         bilevel_encoded_device_bytes=cache.nbytes() + enc.summary_bytes(),
                         bilevel_prefill_peak_device_bytes=max(enc.peak, cache.nbytes()),
                         bilevel_sparse_entries=sum(enc.keep))

    def compress(self, cache, ctx) -> None:
        """Nothing left to do after the prefill: the levels are built while it runs."""

    # ------------------------------------------------------------------ ask
    def prepare(self, idx, layer, query, scaling, q_start, ctx) -> None:
        """Before layer `idx` attends for a prefill slice holding question rows: choose this
        question's chunks from its queries and put their complements into the layer."""
        enc = ctx.state.get((KEY,))
        q = ctx.question
        if enc is None or not enc.done or q is None or enc.plan.n == 0:
            return
        lo, hi = max(q[0], q_start), min(q[1], q_start + query.shape[2])
        if lo >= hi or ctx.state.get((KEY, "asked", idx)) == q:
            return
        ctx.state[(KEY, "asked", idx)] = q
        if ctx.state.get((KEY, "question")) != q:                            # first layer of a new question
            ctx.state[(KEY, "question")] = q
            ctx.stats.update(bilevel_chosen=[[] for _ in range(enc.num_layers)], bilevel_reloaded_bytes=0,
                             bilevel_reloaded_tokens=0, bilevel_reload_s=0.0, bilevel_brought_back=[])
        qrows = query[:, :, lo - q_start:hi - q_start]
        rel = self._relevance(enc, idx, qrows, scaling)
        chosen = choose(rel, *self._costs(enc, idx), ends=self.ends)
        t0 = time.perf_counter()
        device = layer.keys.device
        fetched = [enc.offload.fetch(p, device) for c in chosen for p in enc.dense[idx][c]]
        mix = join(fetched)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        old = ctx.state.get((KEY, "mix", idx), [])      # what the previous question put in
        new = mix
        if self.mass:  # the chosen chunks are dense again: their sparse entries stand for themselves
            old = old + enc.pool[idx]
            new = [_unweigh(s, enc.plan, chosen) for s in enc.pool[idx]] + mix
        layer.segments = [s for s in layer.segments if not any(s is o for o in old)] + new
        ctx.state[(KEY, "mix", idx)] = new
        st = ctx.stats
        st["bilevel_reload_s"] += time.perf_counter() - t0
        st["bilevel_reloaded_bytes"] += sum(enc.dense_bytes[idx][c] for c in chosen)
        st["bilevel_reloaded_tokens"] += sum(int(enc.plan.sizes[c]) - enc.keep[c] for c in chosen)
        st["bilevel_chosen"][idx] = chosen
        st["bilevel_brought_back"] = sorted(set(st["bilevel_brought_back"]) | set(chosen))  # in any layer

    def _costs(self, enc: Encoding, idx: int) -> tuple[list[float], float]:
        """(cost of bringing back each chunk, budget) in entries, or in bytes with budget_mib."""
        if self.budget_mib > 0:
            return [float(b) for b in enc.dense_bytes[idx]], self.budget_mib * 2**20 / enc.num_layers
        cost = [float(n - k) for n, k in zip(enc.plan.sizes.tolist(), enc.keep)]
        total = enc.plan.total
        return cost, (self.budget * total if self.budget <= 1 else self.budget)

    def _relevance(self, enc: Encoding, idx: int, query, scaling) -> torch.Tensor:
        if self.score != "attn":
            return relevance(self.score, query, scaling, enc.plan.n, summary=enc.summary[idx].to(query.device))
        keys = torch.cat([p.keys.dequantize(torch.float32) for p in enc.pool[idx]], 2)
        pos = torch.cat([p.pos for p in enc.pool[idx]], 1)
        return relevance("attn", query, scaling, enc.plan.n, keys=keys.to(query.device),
                         chunk=enc.plan.chunk_of(pos))


def _unweigh(seg, plan, chosen: list[int]):
    """`seg` with the log-weights of the entries of the `chosen` chunks set to 0 (a new segment
    sharing the codes; `seg` itself, the encoding's, is unchanged)."""
    w = getattr(seg, "logw", None)
    if w is None or not chosen:
        return seg
    back = torch.zeros(plan.n, dtype=torch.bool, device=w.device)
    back[torch.tensor(chosen, dtype=torch.long, device=w.device)] = True
    c = plan.chunk_of(seg.pos.to(w.device))
    return dataclasses.replace(seg, logw=w.masked_fill((c >= 0) & back[c.clamp_min(0)], 0.0))


def _by_pos(pos: torch.Tensor, w: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """w [H, n] of the entries at sequence indices pos [H, n] (ascending per head), read at the
    indices `at` [H, m] (each one of pos)."""
    at = at.long().cpu()
    j = torch.searchsorted(pos, at).clamp_max(pos.shape[1] - 1)
    if not torch.equal(pos.gather(1, j), at):
        raise RuntimeError("bilevel: a sparse entry has no weight after the prefill")
    return w.gather(1, j)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, D], idx [H, k] -> [B, H, k, D]."""
    b, _, _, d = x.shape
    return x.gather(2, idx.to(x.device)[None, :, :, None].expand(b, -1, -1, d))


def device_bytes(cache, ctx) -> int:
    """Device-resident KV bytes of a bi-level cache: its stored tensors plus the relevance summaries."""
    enc = ctx.state.get((KEY,)) if ctx is not None else None
    return cache.nbytes() + (enc.summary_bytes() if enc is not None else 0)


__all__ = ["BiLevel", "Encoding", "device_bytes", "storage_bytes"]
