"""Relevance of every chunk to a question, per layer, from the question's own queries.

The queries q [B, Hq, Lq, D] are the question's (the suffix rows: question text and assistant
header), post-RoPE at their original positions, as layer l computes them; everything a rule
reads is on the device (nothing offloaded is touched to decide what to reload). Each rule
returns one score per chunk; query head h reads KV head h // G (GQA).

- "attn": the softmax attention of the question's queries over the sparse level of
  every chunk (all chunks' sparse entries together), summed per chunk, averaged over query rows
  and heads. Position-correct (both sides carry their RoPE), and it reads what the question
  itself would attend to among the video's device-resident entries; no extra storage.
- "quest" (default): Quest's bound (Tang et al., arXiv 2406.10774): per chunk and KV head the
  element-wise max and min of all the chunk's keys, dense level included (kept on the device in
  the keys' dtype, 2 x D values per chunk and head: 2 / tokens-per-chunk of the chunk's keys);
  U = sum_d max(q_d max_d, q_d min_d) >= q . k for every key of the chunk. Softmax of U * scaling
  over the chunks, averaged over rows and heads (Quest picks pages per head and per query;
  a layer here picks one set of chunks for all heads, hence the average). Measured best of the
  three on the bundled model (docs/bilevel.md): it sees every key of the chunk, where "attn"
  sees only the few the sparse level kept.
- "mean": ReKV (Di et al., arXiv 2503.00540): the mean query of the question against the mean
  key of each chunk, concatenated over heads (a raw dot product, as ReKV's code). ReKV means
  pre-RoPE vectors; the cache holds post-RoPE keys, so here both are post-RoPE (their low
  frequencies survive the mean, the high ones partly cancel).

Alternatives not implemented: InfLLM's representative tokens (Xiao et al., arXiv 2402.04617:
the mean of the r keys that received the most attention while in the local window; close to the
mean of the "attn" sparse level) and Video-XL-2's own choice, an external retriever's scores
(LanguageBind) read from files, which has no training-free counterpart inside the model.
"""
from __future__ import annotations

import torch

RULES = ("attn", "quest", "mean")


def summarize(rule: str, keys: torch.Tensor) -> torch.Tensor | None:
    """What `rule` keeps on the device for one chunk, from its keys [B, H, n, D]:
    quest: [H, 2, D] (max, min); mean: [H, 1, D]; attn: nothing."""
    if rule == "quest":
        return torch.stack([keys.amax((0, 2)), keys.amin((0, 2))], 1)   # exact values: the keys' dtype
    if rule == "mean":
        return keys.float().mean((0, 2)).unsqueeze(1).to(keys.dtype)
    return None


def _grouped(q: torch.Tensor, hk: int) -> torch.Tensor:
    b, hq, lq, d = q.shape
    return q.float().reshape(b, hk, hq // hk, lq, d)                       # [B, Hk, G, Lq, D]


def relevance(rule: str, query: torch.Tensor, scaling: float, n_chunks: int, *, summary: torch.Tensor | None = None,
              keys: torch.Tensor | None = None, chunk: torch.Tensor | None = None) -> torch.Tensor:
    """[C] fp32 relevance of each chunk.

    query: [B, Hq, Lq, D]; summary: [H, C, 2 or 1, D] (quest, mean); keys: [B, H, M, D] the sparse
    entries of every chunk and chunk: [H, M] the chunk of each (attn)."""
    if rule == "attn":
        hk = keys.shape[1]
        qg = _grouped(query, hk)                                           # [B, Hk, G, Lq, D]
        s = torch.einsum("bhgld,bhmd->bhglm", qg, keys.float()) * scaling  # [B, Hk, G, Lq, M]
        p = s.softmax(-1)
        idx = chunk.long().to(p.device)[None, :, None, None, :].expand_as(p)
        mass = p.new_zeros(*p.shape[:-1], n_chunks).scatter_add_(-1, idx, p)  # [B, Hk, G, Lq, C]
        return mass.mean((0, 1, 2, 3))
    if rule == "quest":
        hk = summary.shape[0]
        qg = _grouped(query, hk)
        kmax, kmin = summary[:, :, 0].float(), summary[:, :, 1].float()    # [Hk, C, D]
        pos_q = qg.clamp_min(0)
        u = torch.einsum("bhgld,hcd->bhglc", pos_q, kmax) + torch.einsum("bhgld,hcd->bhglc", qg - pos_q, kmin)
        return (u * scaling).softmax(-1).mean((0, 1, 2, 3))
    if rule == "mean":
        hk = summary.shape[0]
        qbar = _grouped(query, hk).mean(3)                                 # [B, Hk, G, D]
        return torch.einsum("bhgd,hcd->c", qbar, summary[:, :, 0].float()) / qbar.shape[0]
    raise ValueError(f"unknown relevance rule {rule!r}; choose one of {RULES}")


def choose(rel: torch.Tensor, cost: list[float], budget: float, ends: bool = False) -> list[int]:
    """Chunks in decreasing relevance whose costs fit `budget` together (a chunk that does not fit
    is skipped, a cheaper one after it may still fit); with `ends`, the first and the last chunk
    are taken first (Video-XL-2's always-dense set). Returned in temporal order."""
    n = rel.numel()
    order = [int(i) for i in torch.argsort(rel.float(), descending=True, stable=True)]
    if ends and n:
        order = [0, n - 1] + [i for i in order if i not in (0, n - 1)]
    out, used = [], 0.0
    for c in order:
        if c in out:
            continue
        if used + cost[c] <= budget + 1e-9:
            out.append(c)
            used += cost[c]
    return sorted(out)
