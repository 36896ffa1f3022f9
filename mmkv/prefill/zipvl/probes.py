"""ZipVL's probe queries (arXiv 2410.08584, step 1-2): which query rows probe a chunk, and the
attention each key receives from them (materialized, in blocks of probe rows)."""
from __future__ import annotations

import torch


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
