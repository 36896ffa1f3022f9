"""Attention statistics for KV presses, gathered block by block during prefill.

Presses that rank cache entries by the attention they receive (LOOK-M, Elastic Cache) call these
from their `observe` hook: for one prefill chunk they compute softmax rows of the chunk's queries
(all of them, or a few "probe" rows) over every key the layer holds, a block of rows at a time,
so no [L, L] matrix is ever formed, and add the result into a per-layer vector indexed by
sequence index. Causality is decided by sequence index (key j is visible to query i iff
seq(j) <= seq(i)), which stays right after earlier evictions or reorderings.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

MAX_SCORE_ELEMENTS = 1 << 24  # fp32 score elements per block: 64 MiB (x4 on CUDA, fewer launches)
BLOCK_ROWS = 128  # query rows per block: smaller blocks skip more of the causal triangle


def key_positions(layer, key: torch.Tensor) -> torch.Tensor:
    """Sequence indices [Hk, Lk] of the keys an observer was handed (the full-precision tail,
    or every entry when the layer returned a dequantized copy)."""
    if layer.pos is not None and layer.pos.shape[1] == key.shape[2]:
        return layer.pos
    pos = layer.positions()
    if pos.shape[1] != key.shape[2]:
        raise RuntimeError(f"cannot map {key.shape[2]} observed keys to the layer's {pos.shape[1]} entries")
    return pos


def attention_received(query: torch.Tensor, key: torch.Tensor, kpos: torch.Tensor, qpos: torch.Tensor,
                       scaling: float, rows: torch.Tensor | None = None,
                       max_elements: int | None = None, block: int = BLOCK_ROWS) -> torch.Tensor:
    """Softmax attention each key receives, summed over query rows, batch and the query heads of
    each KV head's group.

    query: [B, Hq, Lq, D] post-RoPE; key: [B, Hk, Lk, D] (Hq % Hk == 0, head h reads KV head h // G);
    kpos: [Hk, Lk] sequence index of every key; qpos: [Lq] sequence index of every query;
    rows: optional [R] indices into Lq (probe rows; all rows when None).
    Returns [Hk, Lk] fp32. Rows are processed `block` at a time (fewer if a block's scores would
    exceed `max_elements`). When the keys are in sequence order (the usual case: the layer holds
    them as they came), each block of rows is scored only against the keys it can see, and the
    causal mask is applied only to the keys some of its rows cannot see (a chunk's own keys): the
    triangle, not the square, of Q K^T is computed.
    """
    if max_elements is None:
        max_elements = MAX_SCORE_ELEMENTS * (4 if query.is_cuda else 1)
    b, hq, _, d = query.shape
    hk, lk = key.shape[1], key.shape[2]
    g = hq // hk
    if rows is not None:
        rows = rows.to(query.device)
        query, qpos = query[:, :, rows], qpos.to(query.device)[rows]
    qpos = qpos.to(query.device)
    kpos = kpos.to(query.device)
    lq = query.shape[2]
    out = torch.zeros(hk, lk, dtype=torch.float32, device=query.device)
    if lq == 0 or lk == 0:
        return out
    ordered = lk == 1 or bool((kpos[:, 1:] >= kpos[:, :-1]).all())
    if ordered:
        kpos = kpos.contiguous()
    if ordered and lq > 1 and not bool((qpos[1:] >= qpos[:-1]).all()):
        qpos, perm = qpos.sort()
        query = query[:, :, perm]
    kt = key.float().transpose(-1, -2)                                   # [B, Hk, D, Lk]
    step = max(1, min(block, max_elements // max(1, b * hq * lk)))
    for s in range(0, lq, step):
        e = min(lq, s + step)
        r = e - s
        qp = qpos[s:e]
        if ordered:
            lo, hi = qp[:1].expand(hk, 1).contiguous(), qp[-1:].expand(hk, 1).contiguous()
            end = int(torch.searchsorted(kpos, hi, right=True).max())     # keys any row of the block sees
            c0 = int(torch.searchsorted(kpos, lo, right=True).min())      # keys every row sees
        else:
            end, c0 = lk, 0
        if end == 0:
            continue
        q = query[:, :, s:e].float().reshape(b, hk, g * r, d)            # [B, Hk, G*r, D]
        sc = torch.matmul(q, kt[..., :end]).mul_(scaling).view(b, hk, g, r, end)  # [B, Hk, G, r, end]
        if c0 < end:
            hidden = kpos[None, :, None, None, c0:end] > qp[None, None, None, :, None]
            sc[..., c0:end].masked_fill_(hidden, float("-inf"))
        out[:, :end] += sc.softmax(-1).sum((0, 2, 3))                    # [Hk, end]
    return out


def accumulate(prev: torch.Tensor | None, contrib: torch.Tensor, kpos: torch.Tensor, length: int) -> torch.Tensor:
    """prev [Hk, N0] (or None) + contrib [Hk, Lk] scattered to sequence indices kpos -> new [Hk, length].
    Builds a new tensor: `prev` (which may be shared with another question's state) is not modified."""
    hk = contrib.shape[0]
    if prev is None:
        base = torch.zeros(hk, length, dtype=torch.float32, device=contrib.device)
    else:
        prev = prev.to(contrib.device)
        base = torch.cat([prev, prev.new_zeros(hk, max(0, length - prev.shape[1]))], 1)
    return base.scatter_add(1, kpos.to(contrib.device).long(), contrib)


def entry_scores(acc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-entry scores [H, n] from an accumulated [Hk or 1, N] vector and entry indices pos [H, n]."""
    pos = pos.to(acc.device).long()
    if acc.shape[1] <= int(pos.max()):
        acc = torch.cat([acc, acc.new_zeros(acc.shape[0], int(pos.max()) + 1 - acc.shape[1])], 1)
    if acc.shape[0] == 1:
        return acc[0][pos]
    return acc.gather(1, pos)


def gather_entries(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, D], idx [H, k] per-head entry indices -> [B, H, k, D]."""
    b, _, _, d = x.shape
    return x.gather(2, idx.to(x.device).long()[None, :, :, None].expand(b, -1, -1, d))


def sequence_order(pos: torch.Tensor) -> torch.Tensor:
    """[H, n] entry indices of each head in increasing sequence index."""
    return pos.long().argsort(dim=1, stable=True)


def observed_layers(cache, ctx, press: str, key: Callable[[int], str]) -> Iterator[tuple[int, Any, torch.Tensor]]:
    """The layers an eviction press compresses, with the statistics its `observe` gathered:
    (index, layer, ctx.state[key(index)]) for every initialized layer holding full-precision
    entries. Eviction must come before quantization, and needs the pipeline's prefill: both are
    clear errors."""
    for idx, layer in enumerate(cache.layers):
        if not layer.is_initialized or layer.residual_len == 0:
            continue
        if layer.segments:
            raise RuntimeError(f"{press} runs before quantization; put it before the quantizing press")
        acc = ctx.state.get(key(idx))
        if acc is None:
            raise RuntimeError(f"{press}: no attention statistics were gathered for layer {idx}; it needs the "
                               "pipeline's prefill (observe) before compress")
        yield idx, layer, acc
