"""ZipVL: layer-adaptive token-sparse prefill and mixed-precision KV (He et al., "ZipVL: Efficient
Large Vision-Language Models with Dynamic Token Sparsification", arXiv 2410.08584; ICCV 2025 as
"ZipVL: Accelerating VLMs through Dynamic Token Sparsity").

Per decoder layer, during prefill (keys after RoPE):
1. probe queries P: the `probes_recent` most recent queries plus `probes_random` drawn uniformly
   (without replacement, seeded) from the others;
2. probe attention A' = softmax(Q[P] K^T * scaling + causal mask), computed explicitly (the layer's
   real output still comes from SDPA / the sparse kernel), summed over heads, batch and probe rows:
   a_j = attention key j receives;
3. layer-adaptive budget (Eq. 6): p = the fewest keys whose raw a_j, largest first, reach tau *
   sum_j a_j (tau = 1 keeps every key; `ratio` fixes p = ceil(ratio * n) instead, the paper's
   fixed-ratio ablation);
4. important set T (Eq. 7-8): the top-p keys by the normalized score a_j / nnz_j, nnz_j = the
   number of probes allowed to see key j (probes at or after j);
5. token-sparse attention: O_T = Attention(Q[T], K[T], V[T]), causal within the subset by original
   position (`mmkv.kernels.sparse_prefill`: Triton on CUDA, gather + SDPA elsewhere);
6. KV (when the pipeline compresses, `press_ctx.compress`): T's keys and values at `bits_high`, the
   rest at `bits_low` (paper v1, kv="mixed"), or the rest evicted (paper v2, kv="evict");
7. decoding: every `every` generated tokens, the attention of those tokens' queries over all keys
   re-runs 3-4 on the new tokens, which are then quantized (mixed) or evicted (evict).

Defaults: tau=0.975 (the paper reports 0.96 and 0.975), 64 recent + 64 random probes, 4/2 bits,
re-selection every 100 tokens. Provenance of each (methods.md §1): the probe counts, the 4/2-bit
split and the 100-token interval are [SEC]; the official code is not available.

Choices where the paper is silent, and deviations (each also in docs/zipvl.md):
- Unimportant query rows (rows="keys", default): they attend to the important keys T (cost n*p
  instead of p^2 / 2). rows="zero" gives them a zero attention output instead, so those tokens skip
  token mixing in this layer (residual + FFN only) [INF, methods.md]. "zero" was the first default;
  on the trained bundled model it took the needle benchmark from 97% to 50% at tau=0.975 (the
  question's own tokens, which must read the video, are mostly outside T), while "keys" kept 97%
  (`mmkv bench quality`, BENCHMARKS.md).
- Dense layers: the first `dense_layers` (2) layers attend densely (they still score for the KV).
- Heads: a_j sums every query head (GQA groups included), giving one T per layer shared by heads.
- Chunked prefill (prompts longer than the pipeline's prefill_chunk, or encode() then ask()): each
  chunk picks its own probes among its queries and its T among all keys held; the KV selection
  uses a_j and nnz_j summed over every chunk's probes (one chunk: exactly the paper). A chunk with
  no more queries than probes is attended densely, from the probe rows themselves (they are the
  whole attention then), e.g. the question at ask() after encode().
- query_aware=False (default): encode() prefills the video once (probes from the prompt before the
  question); the question's probes join at ask(). query_aware=True defers the whole prefill to
  ask(), so the probes include the question as in the paper's single prefill (generate() always
  prefills video + question in one call).
- KV quantizer granularity follows ZipCache [INF]: keys per channel (one min-max per channel over
  the class's tokens), values channel-separable per token (x / sqrt(max|x|) per channel, then
  min-max per token). ZipCache shares one channel scale across both classes; here each class has
  its own (self-contained segments; D fp16 values per head and class). T is shared by the heads.
- Decode re-selection normalizes the new tokens' scores by how many of the recorded queries can
  see them, as in step 4 (ZipCache's decode path leaves them unnormalized).

Also registered on its own as the transformers attention implementation "zipvl" (plus its mask
function) for plain HF models, sparse prefill only (see `zipvl_session`).
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..cache.base import PressContext
from ..cache.core import QuantSegment
from ..cache.quant import quantize, quantize_channel_separable
from ..kernels.sparse_prefill import sparse_attention
from ..stages import check, register
from .base import PrefillPolicy

ATTN_NAME = "zipvl"
_COUNTS = "zipvl_counts"    # state: {layer: [kept keys, keys, dense pairs, sparse pairs, probe pairs, flops/pair]}
_SCORES = "zipvl_scores"    # state: {layer: (a [seen] fp32, nnz [seen] fp32)} by sequence index
_DECODE_Q = "zipvl_decode_q"  # state: {layer: [B, Hq, m, D]} queries of tokens not yet re-selected
_DECODE = "zipvl_decode"    # state: {layer: [kept, total]} decode re-selection counts
_DONE = "zipvl_done"        # state: {layer: sequence index up to which entries were classified}


@dataclass
class ZipSegment(QuantSegment):
    """A QuantSegment whose values are channel-scaled (ChannelScaledQuant); attention reads it
    through the PyTorch block path (fused kernels do not know the channel scale)."""

    fused_attention = None


# --------------------------------------------------------------------------- selection helpers
def pick_probes(lq: int, recent: int, random: int, gen: torch.Generator) -> torch.Tensor:
    """Probe rows of a chunk of `lq` queries: the last `recent` plus `random` others drawn without
    replacement. Sorted [P] long (on CPU)."""
    n_recent = min(recent, lq)
    rest = lq - n_recent
    n_rand = min(random, rest)
    rows = torch.arange(rest, lq)
    if n_rand:
        rows = torch.cat([torch.randperm(rest, generator=gen)[:n_rand], rows])
    return rows.sort().values


def probe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, scaling: float,
                    with_output: bool = False, block: int = 64):
    """Attention of query rows `rows` over all keys, causal by position (query row i is key lk - lq + i).

    q [B, Hq, Lq, D]; k, v [B, Hk, Lk, D]. Returns received [Lk] fp32 (the attention each key gets,
    summed over batch, query heads and probe rows) and, with_output, out [B, Hq, P, D] in v's dtype."""
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    g = hq // hk
    off = lk - lq
    rows = rows.to(q.device)
    received = torch.zeros(lk, dtype=torch.float32, device=q.device)
    outs = []
    kt = k.transpose(-1, -2)
    key_pos = torch.arange(lk, device=q.device)
    for s in range(0, rows.numel(), block):
        r = rows[s:s + block]
        n = r.numel()
        qp = q[:, :, r].reshape(b, hk, g * n, d)                                   # [B, Hk, G*n, D]
        logits = torch.matmul(qp, kt).float().mul_(scaling).view(b, hk, g, n, lk)  # [B, Hk, G, n, Lk] (fresh)
        logits.masked_fill_(key_pos[None, :] > (r + off)[:, None], float("-inf"))  # causal
        probs = torch.softmax(logits, -1)
        received += probs.sum((0, 1, 2, 3))
        if with_output:
            o = torch.matmul(probs.view(b, hk, g * n, lk).to(v.dtype), v)           # [B, Hk, G*n, D]
            outs.append(o.view(b, hq, n, d))
    return received, (torch.cat(outs, 2) if with_output else None)


def probes_seeing(lk: int, probe_pos: torch.Tensor) -> torch.Tensor:
    """nnz_j for j < lk: how many probes (at key indices probe_pos, sorted) can see key j. fp32 [lk]."""
    j = torch.arange(lk, device=probe_pos.device)
    return (probe_pos.numel() - torch.searchsorted(probe_pos, j)).float()


def adaptive_budget(received: torch.Tensor, tau: float, ratio: float | None = None) -> int:
    """Eq. 6: the fewest keys whose attention, largest first, reaches tau of the total (tau >= 1:
    all keys); with `ratio`, ceil(ratio * n) instead. At least 1."""
    n = received.numel()
    if n == 0:
        return 0
    if ratio is not None:
        return max(1, min(n, math.ceil(ratio * n)))
    if tau >= 1.0:
        return n
    c = received.float().sort(descending=True).values.cumsum(0)
    return max(1, min(n, int(torch.searchsorted(c, tau * c[-1:]).item()) + 1))


def select_important(received: torch.Tensor, nnz: torch.Tensor, p: int) -> torch.Tensor:
    """Eq. 7-8: the p keys with the largest received / nnz, as sorted long indices."""
    score = received / nnz.clamp_min(1)
    return score.topk(p).indices.sort().values


def _lse_over_layer(layer, q: torch.Tensor, qpos: torch.Tensor, scaling: float):
    """Logits of q [B, Hq, m, D] (at sequence indices qpos [m]) over every entry of `layer`,
    causal by sequence index; returns (lse [B, Hq, m], residual logits [B, Hq, m, R])."""
    b, hq, m, d = q.shape
    hk = layer.keys.shape[1]
    g = hq // hk
    qg = q.float().reshape(b, hk, g * m, d)

    def logits(k, pos):
        s = torch.matmul(qg, k.float().transpose(-1, -2)).view(b, hk, g, m, -1) * scaling
        s = s.masked_fill(~(pos[None, :] <= qpos[:, None]), float("-inf"))
        return s.view(b, hq, m, -1)

    lses = []
    for seg in layer.segments:  # ZipVL's own segments: keys are one channel-wise group, read whole
        kb = seg.keys.dequantize(torch.float32)
        lses.append(torch.logsumexp(logits(kb, seg.pos[0].to(q.device)), -1))
    res = logits(layer.keys, layer.pos[0].to(q.device))
    lses.append(torch.logsumexp(res, -1))
    return torch.logsumexp(torch.stack(lses), 0), res


# --------------------------------------------------------------------------- the policy
@register
@dataclass
class ZipVL(PrefillPolicy):
    """ZipVL: layer-adaptive sparse prefill + 4/2-bit mixed-precision KV (arXiv 2410.08584)."""

    name: ClassVar[str] = "zipvl"
    main: ClassVar[str] = "tau"

    tau: float = 0.975               # attention mass the important set must reach (Eq. 6)
    ratio: float | None = None       # fixed kept ratio instead of tau (ablation / benchmarks)
    probes_recent: int = 64
    probes_random: int = 64
    seed: int = 0
    dense_layers: int = 2            # the first layers attend densely
    rows: str = "keys"               # unimportant query rows: "keys" (attend to T's keys) | "zero"
    kv: str = "mixed"                # "mixed" (v1: 4/2 bits) | "evict" (v2) | "none"
    bits_high: int = 4
    bits_low: int = 2
    values: str = "channel_separable"  # value quantizer: "channel_separable" (ZipCache) | "token"
    every: int = 100                 # decode re-selection interval in tokens (0: never)
    query_aware: bool = False        # defer the prefill to ask() so the probes see the question

    def validate(self):
        check(0 < self.tau <= 1, f"zipvl: tau must be in (0, 1], got {self.tau}")
        check(self.ratio is None or 0 < self.ratio <= 1, f"zipvl: ratio must be in (0, 1] or none, got {self.ratio}")
        check(self.probes_recent >= 0 and self.probes_random >= 0,
              f"zipvl: probe counts must be >= 0, got recent={self.probes_recent}, random={self.probes_random}")
        check(self.probes_recent + self.probes_random >= 1, "zipvl: at least one probe query is needed")
        check(self.dense_layers >= 0, f"zipvl: dense_layers must be >= 0, got {self.dense_layers}")
        check(self.rows in ("zero", "keys"), f"zipvl: rows must be 'zero' or 'keys', got {self.rows!r}")
        check(self.kv in ("mixed", "evict", "none"), f"zipvl: kv must be 'mixed', 'evict' or 'none', got {self.kv!r}")
        check(self.bits_high in (1, 2, 4, 8) and self.bits_low in (1, 2, 4, 8),
              f"zipvl: bits must be 1, 2, 4 or 8, got bits_high={self.bits_high}, bits_low={self.bits_low}")
        check(self.bits_low <= self.bits_high, f"zipvl: bits_low ({self.bits_low}) > bits_high ({self.bits_high})")
        check(self.values in ("channel_separable", "token"),
              f"zipvl: values must be 'channel_separable' or 'token', got {self.values!r}")
        check(self.every >= 0, f"zipvl: every must be >= 0, got {self.every}")

    @property
    def compresses_kv(self) -> bool:
        """True when the policy compresses the KV cache itself (no other KV press may follow)."""
        return self.kv != "none"

    @property
    def decode_queries(self) -> bool:
        """Asks the pipeline for each decode step's query rows (press_ctx.queries) for re-selection."""
        return self.kv != "none" and self.every > 0

    # ------------------------------------------------------------------ prefill
    def begin(self, press_ctx) -> None:
        st = press_ctx.state
        # fresh containers: the state dict is shared by every ask() of one encoding
        st[_COUNTS] = {k: list(v) for k, v in st.get(_COUNTS, {}).items()}
        st[_SCORES] = dict(st.get(_SCORES, {}))
        st[_DONE] = dict(st.get(_DONE, {}))
        self._pctx = press_ctx

    def _state(self) -> dict:
        pctx = getattr(self, "_pctx", None)
        if pctx is None:  # attend() without begin(): a throwaway context
            self.begin(PressContext(token_type=torch.zeros(0, dtype=torch.int8)))
            pctx = self._pctx
        return pctx.state

    def attend(self, module, query, key, value, scaling, fctx):
        idx = module.layer_idx
        b, hq, lq, d = query.shape
        lk = key.shape[2]
        layer = fctx.cache.layers[idx] if fctx is not None and fctx.cache is not None else None
        if layer is not None and layer.segments:
            return None  # compressed parts: the cache attends (key/value here are only its tail)
        if fctx is None and lq == 1:
            return None  # standalone decode step
        st = self._state()
        off = lk - lq
        dense_pairs = lq * off + lq * (lq + 1) // 2
        dense_layer = idx < self.dense_layers
        score_kv = self.kv != "none" and layer is not None
        keep_all = self.tau >= 1.0 and self.ratio is None
        if (dense_layer or keep_all) and not score_kv:
            self._count(st, idx, lk, lk, dense_pairs, dense_pairs, 0, hq * d)
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + idx * 7919 + off)
        rows = pick_probes(lq, self.probes_recent, self.probes_random, gen).to(query.device)
        all_rows = rows.numel() == lq
        received, probe_out = probe_attention(query, key, value, rows, scaling,
                                              with_output=all_rows and not dense_layer)
        probe_pos = rows + off
        nnz = probes_seeing(lk, probe_pos)
        probe_pairs = int((probe_pos + 1).sum())
        if score_kv:
            self._accumulate(st, idx, layer, received, nnz)
        if dense_layer:
            self._count(st, idx, lk, lk, dense_pairs, dense_pairs, probe_pairs, hq * d)
            return None
        if all_rows:  # the probe rows are the whole attention of this chunk
            self._count(st, idx, lk, lk, dense_pairs, dense_pairs, 0, hq * d)
            return probe_out.transpose(1, 2).contiguous().to(query.dtype)
        p = adaptive_budget(received, self.tau, self.ratio)
        if p >= lk:
            self._count(st, idx, lk, lk, dense_pairs, dense_pairs, probe_pairs, hq * d)
            return None  # keep all: exactly the dense path
        keep = select_important(received, nnz, p)                                  # [p] key indices
        q_idx = keep[keep >= off] - off if self.rows == "zero" else torch.arange(lq, device=query.device)
        sparse_pairs = int(torch.searchsorted(keep, q_idx + off, right=True).sum())
        self._count(st, idx, p, lk, dense_pairs, sparse_pairs, probe_pairs, hq * d)
        return sparse_attention(query, key, value, q_idx, keep, scaling)

    @staticmethod
    def _count(st, idx, kept, keys, dense, sparse, probe, per_pair):
        c = st[_COUNTS].get(idx, [0, 0, 0, 0, 0, per_pair])
        st[_COUNTS][idx] = [c[0] + kept, c[1] + keys, c[2] + dense, c[3] + sparse, c[4] + probe, per_pair]

    @staticmethod
    def _accumulate(st, idx, layer, received, nnz):
        """Add this chunk's probe scores to the layer's totals, indexed by sequence index."""
        pos = layer.pos[0].long().to(received.device)
        a0, n0 = st[_SCORES].get(idx, (None, None))
        a = torch.zeros(layer.seen, dtype=torch.float32, device=received.device)
        n = torch.zeros_like(a)
        if a0 is not None:
            a[: a0.numel()] = a0
            n[: n0.numel()] = n0
        st[_SCORES][idx] = (a.index_add_(0, pos, received), n.index_add_(0, pos, nnz))

    def end(self, cache, press_ctx) -> None:
        st = press_ctx.state
        self._write_stats(press_ctx)
        if press_ctx.compress and self.kv != "none":
            kept, total = [], []
            for idx, layer in enumerate(cache.layers):
                n_keep, n = self._compress_layer(idx, layer, st)
                kept.append(n_keep)
                total.append(n)
            press_ctx.stats["zipvl_kv_important_per_layer"] = kept
            press_ctx.stats["zipvl_kv_ratio_per_layer"] = [round(k / max(n, 1), 4) for k, n in zip(kept, total)]
            st[_DECODE_Q] = {}
            st[_DECODE] = {}
        self._pctx = None

    def _write_stats(self, press_ctx) -> None:
        c = press_ctx.state.get(_COUNTS, {})
        if not c:
            return
        layers = sorted(c)
        ratios = [c[i][0] / max(c[i][1], 1) for i in layers]
        sparse = [r for i, r in zip(layers, ratios) if i >= self.dense_layers] or ratios
        dense = sum(c[i][2] * 4 * c[i][5] for i in layers)
        used = sum((c[i][3] + c[i][4]) * 4 * c[i][5] for i in layers)
        s = press_ctx.stats
        s["zipvl_ratio_per_layer"] = [round(r, 4) for r in ratios]
        s["zipvl_kept_per_layer"] = [c[i][0] for i in layers]
        s["zipvl_ratio_mean"] = sum(sparse) / len(sparse)
        s["zipvl_attn_flops_dense"] = dense
        s["zipvl_attn_flops"] = used
        s["zipvl_attn_flops_saved"] = 1 - used / dense if dense else 0.0

    # ------------------------------------------------------------------ KV
    def _compress_layer(self, idx, layer, st) -> tuple[int, int]:
        """Classify the layer's entries not classified yet (all of them at the first compression)."""
        if not layer.is_initialized:
            return 0, 0
        done = st[_DONE].get(idx)  # sequence indices below this were classified by an earlier call
        if layer.segments and done is None:
            raise RuntimeError("zipvl: the cache is already compressed by another stage; ZipVL's KV compression "
                               "needs the full cache (use zipvl:kv=none to combine it with other KV presses)")
        pos = layer.pos
        if not bool((pos == pos[:1]).all()):
            raise RuntimeError("zipvl: the layer's heads hold different tokens; ZipVL selects per layer")
        st[_DONE][idx] = layer.seen
        rpos = pos[0].long()
        entries = (rpos >= (done or 0)).nonzero().squeeze(1)
        if entries.numel() == 0:
            return 0, 0
        scores = st[_SCORES].get(idx)
        if scores is None or scores[0].numel() < layer.seen:
            if done is None:
                raise RuntimeError(f"zipvl: no probe scores were recorded for layer {idx}")
            return 0, 0  # tokens prefilled over an already compressed cache stay in full precision
        a, nnz = scores
        sel = rpos[entries].to(a.device)
        p = adaptive_budget(a[sel], self.tau, self.ratio)
        keep = entries[select_important(a[sel], nnz[sel], p).to(entries.device)]
        with layer.quantizing():
            self._store(layer, keep, entries)
        return p, int(entries.numel())

    def _store(self, layer, keep: torch.Tensor, entries: torch.Tensor) -> None:
        """Of the residual entries `entries` (indices, sorted), quantize (mixed) or keep (evict) the
        important ones `keep` (a subset); other residual entries stay as they are."""
        dev = layer.keys.device
        keep, entries = keep.to(dev), entries.to(dev)
        is_kept = torch.zeros(layer.residual_len, dtype=torch.bool, device=dev)
        is_kept[keep] = True
        in_set = torch.zeros_like(is_kept)
        in_set[entries] = True
        if self.kv == "evict":
            layer.select((~in_set | is_kept).nonzero().squeeze(1))
            return
        segs = []
        for mask, bits in ((is_kept, self.bits_high), (in_set & ~is_kept, self.bits_low)):
            sel = mask.nonzero().squeeze(1)
            if sel.numel():
                segs.append(self._segment(layer.keys[:, :, sel], layer.values[:, :, sel], layer.pos[:, sel], bits))
        rest = (~in_set).nonzero().squeeze(1)
        layer.segments = layer.segments + segs
        layer.set_residual(layer.keys[:, :, rest], layer.values[:, :, rest], layer.pos[:, rest])

    def _segment(self, k, v, pos, bits):
        kq = quantize(k, bits, k.shape[2], "channel")  # one min-max per channel over the class's tokens
        if self.values == "channel_separable":
            return ZipSegment(kq, quantize_channel_separable(v, bits), pos, label=f"int{bits}")
        return QuantSegment(kq, quantize(v, bits, v.shape[-1], "token"), pos, label=f"int{bits}")

    # ------------------------------------------------------------------ decode
    def on_decode(self, cache, press_ctx, step: int) -> None:
        if not self.decode_queries:
            return
        if not press_ctx.queries:
            raise RuntimeError("zipvl: decode-time re-selection needs each step's queries (press_ctx.queries); "
                               "the pipeline records them for stages with decode_queries=True")
        st = press_ctx.state
        buf = dict(st.get(_DECODE_Q, {}))
        for idx, q in press_ctx.queries.items():
            buf[idx] = q if idx not in buf else torch.cat([buf[idx], q], 2)
        st[_DECODE_Q] = buf
        if not buf or next(iter(buf.values())).shape[2] < self.every:
            return
        counts = dict(st.get(_DECODE, {}))
        for idx, layer in enumerate(cache.layers):
            kept, n = self._reselect(layer, buf[idx], press_ctx.scaling)
            c = counts.get(idx, (0, 0))
            counts[idx] = (c[0] + kept, c[1] + n)
        st[_DECODE], st[_DECODE_Q] = counts, {}
        press_ctx.stats["zipvl_decode_reselections"] = press_ctx.stats.get("zipvl_decode_reselections", 0) + 1
        press_ctx.stats["zipvl_decode_ratio_per_layer"] = [round(counts[i][0] / max(counts[i][1], 1), 4)
                                                           for i in sorted(counts)]

    def _reselect(self, layer, q: torch.Tensor, scaling: float) -> tuple[int, int]:
        """Steps 3-4 on the m newest tokens, scored by their own m queries over every entry."""
        m = q.shape[2]
        first = layer.seen - m                                              # sequence index of the first new token
        qpos = torch.arange(first, layer.seen, device=q.device)
        lse, res_logits = _lse_over_layer(layer, q, qpos, scaling)
        rpos = layer.pos[0].to(q.device)
        new = (rpos >= first).nonzero().squeeze(1)                           # residual entries of the new tokens
        received = torch.exp(res_logits[..., new] - lse.unsqueeze(-1)).sum((0, 1, 2))  # [len(new)]
        nnz = (layer.seen - rpos[new]).float()                               # queries at or after each new token
        p = adaptive_budget(received, self.tau, self.ratio)
        keep = new[select_important(received, nnz, p)]
        self._store(layer, keep, new)
        return p, int(new.numel())


# --------------------------------------------------------------------------- standalone attention
_SESSION: contextvars.ContextVar = contextvars.ContextVar("zipvl_session", default=None)
_DEFAULT: list = []


@contextmanager
def zipvl_session(policy: ZipVL | None = None):
    """Use `policy` (default ZipVL(kv="none")) for the "zipvl" attention implementation inside the
    block. Yields a dict that holds the stats (zipvl_ratio_per_layer, ...) once the block exits.

        model.set_attn_implementation({"text_config": "zipvl"})   # or "zipvl" for a plain LLM
        with zipvl_session(ZipVL(tau=0.96)) as stats:
            model.generate(**inputs, max_new_tokens=32)
        print(stats["zipvl_ratio_per_layer"])

    Only the sparse prefill runs here (kv is ignored: the KV cache is transformers' own)."""
    policy = policy or ZipVL(kv="none")
    pctx = PressContext(token_type=torch.zeros(0, dtype=torch.int8))
    policy.begin(pctx)
    token = _SESSION.set((policy, pctx))
    try:
        yield pctx.stats
    finally:
        _SESSION.reset(token)
        policy._write_stats(pctx)
        policy._pctx = None


def zipvl_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface function "zipvl": ZipVL's sparse prefill on a plain HF model
    (batch without padding). Decode steps and dense layers use SDPA."""
    from ..attention import dense_attention

    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    session = _SESSION.get()
    if session is None:
        if not _DEFAULT:
            _DEFAULT.append(ZipVL(kv="none"))
        policy = _DEFAULT[0]
        policy.begin(PressContext(token_type=torch.zeros(0, dtype=torch.int8)))
    else:
        policy, pctx = session
        policy._pctx = pctx
    out = policy.attend(module, query, key, value, scaling, None)
    if out is not None:
        return out, None
    return dense_attention(module, query, key, value, scaling, "sdpa", dropout, **kwargs)


def zipvl_mask(*args, attention_mask=None, **kwargs):
    """Mask function for "zipvl": causal masks are built inside the attention call; padded batches
    are refused (the subset selection is shared by the batch)."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.bool().all()):
        raise ValueError("the zipvl attention implementation supports unpadded inputs only")
    return None


AttentionInterface.register(ATTN_NAME, zipvl_attention)
AttentionMaskInterface.register(ATTN_NAME, zipvl_mask)
