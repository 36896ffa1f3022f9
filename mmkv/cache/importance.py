"""Importance of KV cache entries, from the prompt alone: the scorers shared by the eviction presses.

A scorer gathers statistics while the prompt is prefilled (`observe`, called for every layer and
prefill chunk with the chunk's post-RoPE queries and every key the layer holds) and turns them
into per-entry scores (`scores`). Everything works under SDPA / FlashAttention: the few score rows
a scorer needs are computed apart, block by block (`scores.attention_received`), never as an
[n, n] matrix. Statistics are kept per sequence index, so chunked prefill (`prefill_chunk`) gives
the same scores as one pass, and nothing depends on how the frames were streamed (`chunk_frames`).

    imp = ObservedImportance()
    imp.observe(state, idx, layer, query, key, scaling, q_start, ctx)    # every chunk
    scores, mass = imp.scores(state, idx, layer, ctx)                     # [H_kv, n] each

`scores` ranks the entries `layer.pos` holds (higher = keep); `mass` is the raw attention mass
of each entry, which the layer-adaptive budget (budgets.py, ZipVL's Eq. 6) sums. With GQA every
score is the mean over the query heads that read the KV head (one score per stored entry: the
cache is never replicated per query head).

Scorers (each cites its paper; choices where the paper is silent are marked):

- `ObservedImportance` (H2O, Zhang et al., arXiv 2306.14048, normalized as ZipVL's Eq. 7, He et
  al., arXiv 2410.08584): the attention each key receives from the prompt's own rows, divided by
  the number of those rows that can see it (causally). H2O's raw sum favours old tokens only
  because more rows see them; the count removes that. `probes=0` uses every row; `probes=k` the
  last k rows of every chunk plus k drawn uniformly (ZipVL's probe set; seeded), and the count
  is then the number of probe rows at or after the key.
- `WindowImportance` (SnapKV, Li et al., arXiv 2404.14469): the mean attention of the last
  `window` rows of the prompt, pooled along the sequence (`pool`, `kernel`). At encode the
  prompt's tail is the end of the video, not a question.
- `ExpectedImportance` (Expected Attention, Devoto et al., arXiv 2510.00636): keys scored against
  a Gaussian model of the queries still to come. Statistics: mean mu and covariance S of the
  PRE-RoPE queries (the observer sees post-RoPE queries; they are un-rotated with the model's own
  rotary embedding at their own positions, 3-D for M-RoPE). Future queries are text at positions
  p0 .. p0 + future - 1 after the prompt (M-RoPE: t = h = w = p), rotated by the mean rotation R
  over those positions: z_i = s k_i.R mu + s^2 / 2 (R^T k_i)^T S (R^T k_i) (the log of the
  Gaussian moment-generating function, s = 1/sqrt(d)); the expected attention is softmax_i(z_i),
  times ||v_i|| (the expected contribution to the residual stream) with `vnorm`.
- `TextImportance` (LOOK-M's text prior, Wan et al., arXiv 2406.18139): the attention the TEXT
  rows pay to each key, summed. Before the question that is the system prompt and the template
  text after the video.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import TEXT
from .scores import accumulate, attention_received, entry_scores, key_positions


class StateSlice:
    """A press's keys inside ctx.state, flat ((press, *key) -> value), so no nested container is
    shared between the questions asked of one encoding."""

    def __init__(self, state: dict, prefix):
        self.state, self.prefix = state, prefix

    def _k(self, k):
        return (self.prefix, *(k if isinstance(k, tuple) else (k,)))

    def get(self, k, default=None):
        return self.state.get(self._k(k), default)

    def __getitem__(self, k):
        return self.state[self._k(k)]

    def __setitem__(self, k, v):
        self.state[self._k(k)] = v

    def __contains__(self, k):
        return self._k(k) in self.state


def text_rows(ctx, q_start: int, lq: int) -> torch.Tensor:
    """Indices, within a block of `lq` query rows starting at `q_start`, of the text rows: those
    typed TEXT in the prompt, plus any rows past the typed prompt (proxy text, appended later)."""
    rows = (ctx.token_type[q_start:q_start + lq] == TEXT).nonzero().squeeze(1)
    extra = max(0, q_start + lq - len(ctx.token_type))
    if extra:
        rows = torch.cat([rows, torch.arange(lq - extra, lq)])
    return rows


def row_counts(qpos: torch.Tensor, length: int) -> torch.Tensor:
    """[length] fp32: for every sequence index j < length, how many rows (sequence indices qpos)
    can see key j, i.e. how many qpos >= j."""
    q = qpos.reshape(-1).sort().values
    j = torch.arange(length, device=q.device, dtype=q.dtype)
    return (q.numel() - torch.searchsorted(q, j, right=False)).float()


def add_counts(prev: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    """prev [N0] (or None) + counts [N] -> [N] (a new tensor)."""
    if prev is None:
        return counts
    prev = prev.to(counts.device)
    return torch.cat([prev, prev.new_zeros(max(0, counts.shape[0] - prev.shape[0]))])[: counts.shape[0]] + counts


def pool1d(x: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """SnapKV's smoothing along the sequence: x [H, N] -> [H, N] (stride 1, padding kernel // 2)."""
    if mode == "none" or kernel <= 1:
        return x
    pad = kernel // 2
    if mode == "max":
        return F.max_pool1d(x[:, None], kernel, stride=1, padding=pad)[:, 0, : x.shape[1]]
    return F.avg_pool1d(x[:, None], kernel, stride=1, padding=pad, count_include_pad=False)[:, 0, : x.shape[1]]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE layout: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _phase_total(ctx) -> int:
    """Length of the prompt being prefilled in this phase (the prefix at encode, prefix + question at ask)."""
    return int(ctx.token_type.shape[0])


@dataclass
class Importance:
    """Base scorer (see module docstring). Subclasses keep their statistics in `state`
    (the press's slice of ctx.state), never modifying a stored tensor in place."""

    name: ClassVar[str] = ""

    def observe(self, state: dict, idx: int, layer, query, key, value, scaling: float, q_start: int, ctx) -> None:
        raise NotImplementedError

    def scores(self, state: dict, idx: int, layer, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def ready(self, state: dict, idx: int) -> bool:
        return (idx, "sum") in state


@dataclass
class ObservedImportance(Importance):
    """H2O attention received, divided by how many rows see each key (ZipVL Eq. 7)."""

    name: ClassVar[str] = "observed"
    probes: int = 0      # 0: every row; k: last k + k random rows of each chunk
    seed: int = 0

    def rows(self, lq: int, q_start: int, device) -> torch.Tensor | None:
        if self.probes <= 0 or lq <= 2 * self.probes:
            return None
        recent = torch.arange(lq - self.probes, lq, device=device)
        gen = torch.Generator(device="cpu").manual_seed(self.seed + q_start)
        rand = torch.randperm(lq - self.probes, generator=gen)[: self.probes].to(device)
        return torch.cat([rand.sort().values, recent])

    def observe(self, state, idx, layer, query, key, value, scaling, q_start, ctx):
        lq = query.shape[2]
        kpos = key_positions(layer, key)
        qpos = torch.arange(q_start, q_start + lq, device=query.device)
        rows = self.rows(lq, q_start, query.device)
        g = query.shape[1] // key.shape[1]
        got = attention_received(query, key, kpos, qpos, scaling, rows) / g            # [Hk, Lk]
        state[(idx, "sum")] = accumulate(state.get((idx, "sum")), got, kpos, layer.seen)
        seen_by = qpos if rows is None else qpos[rows]
        state[(idx, "cnt")] = add_counts(state.get((idx, "cnt")), row_counts(seen_by, layer.seen))

    def scores(self, state, idx, layer, ctx):
        acc, cnt = state[(idx, "sum")], state[(idx, "cnt")]
        pos = layer.pos
        raw = entry_scores(acc, pos)                                                     # [H, n]
        n = entry_scores(cnt[None], pos)
        return raw / n.clamp_min(1), raw


@dataclass
class WindowImportance(Importance):
    """SnapKV: mean attention of the prompt's last `window` rows, pooled along the sequence."""

    name: ClassVar[str] = "window"
    window: int = 32
    kernel: int = 7
    pool: str = "max"
    proxy: bool = False   # the window is the proxy question's rows (after the prompt) only

    def observe(self, state, idx, layer, query, key, value, scaling, q_start, ctx):
        lq = query.shape[2]
        total = _phase_total(ctx)
        first = max(q_start, total if self.proxy and ctx.phase == "encode" else total - self.window)
        if first >= q_start + lq:
            return
        rows = torch.arange(first - q_start, lq, device=query.device)
        kpos = key_positions(layer, key)
        qpos = torch.arange(q_start, q_start + lq, device=query.device)
        g = query.shape[1] // key.shape[1]
        got = attention_received(query, key, kpos, qpos, scaling, rows) / g
        key_ = (ctx.phase, idx)
        prev = state.get(key_)
        s = accumulate(None if prev is None else prev[0], got, kpos, layer.seen)
        state[key_] = (s, (0 if prev is None else prev[1]) + rows.numel())
        state[(idx, "sum")] = True

    def window_sum(self, state, idx) -> tuple[torch.Tensor, int]:
        """(sum [Hk, N], rows) of the window rows: this phase's, plus the encode phase's when the
        question alone has fewer than `window` rows (compression after the question)."""
        ask, enc = state.get(("ask", idx)), state.get(("encode", idx))
        if ask is None:
            return enc
        if enc is None or ask[1] >= self.window:
            return ask
        n = max(ask[0].shape[1], enc[0].shape[1])
        pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1])], 1)  # noqa: E731
        return pad(ask[0]) + pad(enc[0].to(ask[0].device)), ask[1] + enc[1]

    def scores(self, state, idx, layer, ctx):
        s, rows = self.window_sum(state, idx)
        s = s / max(rows, 1)
        pooled = pool1d(s, self.kernel, self.pool)
        return entry_scores(pooled, layer.pos), entry_scores(s, layer.pos)


@dataclass
class TextImportance(Importance):
    """LOOK-M's text prior: attention from the TEXT rows, summed (and over each KV head's group)."""

    name: ClassVar[str] = "text"

    def observe(self, state, idx, layer, query, key, value, scaling, q_start, ctx):
        lq = query.shape[2]
        rows = text_rows(ctx, q_start, lq)
        if rows.numel() == 0:
            return
        kpos = key_positions(layer, key)
        qpos = torch.arange(q_start, q_start + lq, device=query.device)
        got = attention_received(query, key, kpos, qpos, scaling, rows.to(query.device))
        state[(idx, "sum")] = accumulate(state.get((idx, "sum")), got, kpos, layer.seen)

    def scores(self, state, idx, layer, ctx):
        s = entry_scores(state[(idx, "sum")], layer.pos)
        return s, s


@dataclass
class ExpectedImportance(Importance):
    """Expected Attention: keys against a Gaussian model of future (text) queries."""

    name: ClassVar[str] = "expected"
    future: int = 512     # future positions averaged in the mean rotation (the paper's default)
    sink: int = 4         # first rows left out of the query statistics (attention sinks)
    rows: str = "all"     # query statistics from "all" prompt rows or only "text" rows
    cov: bool = True      # the second-order (covariance) term
    vnorm: bool = True    # times ||v||: the expected contribution to the residual stream

    def observe(self, state, idx, layer, query, key, value, scaling, q_start, ctx):
        if ctx.rotary is None or ctx.positions is None:
            raise RuntimeError("expected attention needs the model's rotary embedding and positions in the press "
                               "context (the pipeline's prefill provides them)")
        lq = query.shape[2]
        sel = torch.arange(lq)
        seq = sel + q_start
        keep = seq >= self.sink
        if self.rows == "text":
            tt = torch.cat([ctx.token_type, torch.full((max(0, q_start + lq - len(ctx.token_type)),), TEXT,
                                                       dtype=ctx.token_type.dtype)])
            keep &= tt[seq] == TEXT
        sel = sel[keep]
        if sel.numel():
            cos, sin = ctx.rotary(ctx.positions[:, seq[keep]])                          # [r, D]
            q = query[:, :, sel.to(query.device)].float()                                # [B, Hq, r, D]
            cos, sin = cos.to(q.device), sin.to(q.device)
            pre = q * cos - rotate_half(q) * sin                                         # un-rotated queries
            pre = pre.transpose(0, 1).reshape(q.shape[1], -1, q.shape[-1])              # [Hq, B*r, D]
            s1 = pre.sum(1)                                                              # [Hq, D]
            s2 = pre.transpose(1, 2) @ pre                                               # [Hq, D, D]
            p = state.get((idx, "q"))
            state[(idx, "q")] = (s1, s2, pre.shape[1]) if p is None else (p[0] + s1, p[1] + s2, p[2] + pre.shape[1])
        state[(idx, "sum")] = True

    def mean_rotation(self, ctx, device) -> tuple[torch.Tensor, torch.Tensor]:
        total = _phase_total(ctx)
        p0 = int(ctx.positions[:, total - 1].max()) + 1
        fut = torch.arange(p0, p0 + self.future).expand(ctx.positions.shape[0], -1)
        cos, sin = ctx.rotary(fut)                                                        # [F, D]
        return cos.mean(0).to(device), sin.mean(0).to(device)

    def scores(self, state, idx, layer, ctx):
        keys, values = layer.keys, layer.values                                          # [B, Hk, n, D]
        st = state.get((idx, "q"))
        b, hk, n, d = keys.shape
        if st is None or st[2] == 0:
            z = torch.zeros(hk, n, device=keys.device)
            return z, z
        s1, s2, cnt = st
        mu = s1 / cnt                                                                    # [Hq, D]
        hq = mu.shape[0]
        g = hq // hk
        c, s = self.mean_rotation(ctx, keys.device)
        mu_r = mu * c + rotate_half(mu) * s                                              # R mu
        k = keys.float().mean(0)                                                         # [Hk, n, D] (batch 1)
        kg = k.repeat_interleave(g, 0)                                                   # [Hq, n, D]
        scaling = ctx.scaling
        z = scaling * (kg @ mu_r[:, :, None])[..., 0]                                    # [Hq, n]
        if self.cov:
            cov = s2 / cnt - mu[:, :, None] * mu[:, None, :]                             # [Hq, D, D]
            u = kg * c - rotate_half(kg) * s                                             # R^T k
            z = z + 0.5 * scaling ** 2 * ((u @ cov) * u).sum(-1)
        a = z.softmax(-1)                                                                # [Hq, n]
        if self.vnorm:
            a = a * values.float().mean(0).norm(dim=-1).repeat_interleave(g, 0)
        a = a.view(hk, g, n).mean(1)                                                     # [Hk, n]
        return a, a


SCORERS = {c.name: c for c in (ObservedImportance, WindowImportance, TextImportance, ExpectedImportance)}


def make_importance(name: str, **params) -> Importance:
    """A scorer by name ("observed", "window", "text", "expected") with the parameters it has."""
    cls = SCORERS[name]
    fields = {f for f in cls.__dataclass_fields__}
    return cls(**{k: v for k, v in params.items() if k in fields})
