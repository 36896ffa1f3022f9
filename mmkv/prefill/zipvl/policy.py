"""The ZipVL stage (arXiv 2410.08584): per layer, probes -> budget -> token-sparse prefill
attention; the KV classification at the end of each prefill and during decoding (`kv`). The
algorithm, defaults and deviations are in the package docstring (`mmkv.prefill.zipvl`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...cache.base import PressContext
from ...kernels.sparse_prefill import sparse_attention
from ...stages import check, register
from ..base import PrefillPolicy
from . import kv
from .budget import BREAK_EVEN, adaptive_budget, runs_dense, select_important
from .probes import pick_probes, probe_attention, probes_seeing

_COUNTS = "zipvl_counts"    # state: {layer: [kept keys, keys, dense pairs, pairs computed, probe pairs, flops/pair,
#                                     keys the budget chose, calls run dense past the break-even]}
_SCORES = "zipvl_scores"    # state: {layer: (a [seen] fp32, nnz [seen] fp32)} by sequence index
_DECODE_Q = "zipvl_decode_q"  # state: {layer: [B, Hq, m, D]} queries of tokens not yet re-selected
_DECODE = "zipvl_decode"    # state: {layer: [kept, total]} decode re-selection counts
_DONE = "zipvl_done"        # state: {layer: sequence index up to which entries were classified}


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
    dense_above: float | None = None  # kept ratio above which a layer attends densely (None: BREAK_EVEN[rows])
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
        check(self.dense_above is None or 0 < self.dense_above <= 1,
              f"zipvl: dense_above (kept ratio above which a layer attends densely) must be in (0, 1] or none, "
              f"got {self.dense_above!r}")
        check(self.kv in ("mixed", "evict", "none"), f"zipvl: kv must be 'mixed', 'evict' or 'none', got {self.kv!r}")
        check(self.bits_high in (1, 2, 4, 8) and self.bits_low in (1, 2, 4, 8),
              f"zipvl: bits must be 1, 2, 4 or 8, got bits_high={self.bits_high}, bits_low={self.bits_low}")
        check(self.bits_low <= self.bits_high, f"zipvl: bits_low ({self.bits_low}) > bits_high ({self.bits_high})")
        check(self.values in ("channel_separable", "token"),
              f"zipvl: values must be 'channel_separable' or 'token', got {self.values!r}")
        check(self.every >= 0, f"zipvl: every must be >= 0, got {self.every}")

    @property
    def break_even(self) -> float:
        """The kept ratio above which a layer attends densely (dense_above, or BREAK_EVEN[rows])."""
        return BREAK_EVEN[self.rows] if self.dense_above is None else self.dense_above

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
        if runs_dense(p, lk, self.break_even):  # keep all, or too many to be faster: exactly the dense path
            self._count(st, idx, lk, lk, dense_pairs, dense_pairs, probe_pairs, hq * d, found=p, fallback=int(p < lk))
            return None
        keep = select_important(received, nnz, p)                                  # [p] key indices
        q_idx = keep[keep >= off] - off if self.rows == "zero" else torch.arange(lq, device=query.device)
        sparse_pairs = int(torch.searchsorted(keep, q_idx + off, right=True).sum())
        self._count(st, idx, p, lk, dense_pairs, sparse_pairs, probe_pairs, hq * d)
        return sparse_attention(query, key, value, q_idx, keep, scaling)

    @staticmethod
    def _count(st, idx, kept, keys, dense, sparse, probe, per_pair, found=None, fallback=0):
        c = st[_COUNTS].get(idx, [0, 0, 0, 0, 0, per_pair, 0, 0])
        st[_COUNTS][idx] = [c[0] + kept, c[1] + keys, c[2] + dense, c[3] + sparse, c[4] + probe, per_pair,
                            c[6] + (kept if found is None else found), c[7] + fallback]

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
        s["zipvl_budget_ratio_per_layer"] = [round(c[i][6] / max(c[i][1], 1), 4) for i in layers]
        s["zipvl_dense_fallbacks_per_layer"] = [c[i][7] for i in layers]
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
        a, nnz = st[_SCORES].get(idx, (None, None))
        out = kv.compress_layer(self, layer, a, nnz, done, idx)
        st[_DONE][idx] = layer.seen
        return out

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
            kept, n = kv.reselect(self, layer, buf[idx], press_ctx.scaling)
            c = counts.get(idx, (0, 0))
            counts[idx] = (c[0] + kept, c[1] + n)
        st[_DECODE], st[_DECODE_Q] = counts, {}
        press_ctx.stats["zipvl_decode_reselections"] = press_ctx.stats.get("zipvl_decode_reselections", 0) + 1
        press_ctx.stats["zipvl_decode_ratio_per_layer"] = [round(counts[i][0] / max(counts[i][1], 1), 4)
                                                           for i in sorted(counts)]
