"""Mass-preserving merge (`merge="mass"` of any eviction press): evicted entries keep their
share of the attention through a log-count on the kept entry most like them.

Why. Eviction removes entries from every later softmax, so the mass they drew moves to the kept
ones. On the long benchmark's videos (docs/kv_agnostic.md) observed attention at 75-90% evicted
keeps every object token of every layer and head, yet answers change: the evicted entries are
the background, whose share of each row goes to the objects, and an ordered answer then runs on
("magenta, green, green" for "magenta, green"). What was lost is the normalizer, not a needle.

What. Every evicted entry joins the kept entry of its head whose key is most cosine-similar
(LOOK-M's matching, lookm.py); a kept entry standing for n entries (itself included) gets log n
added to its attention logit by every later query (`KVLayer.logw`, [H, k] fp32, carried into
KIVI's segments). This is Token Merging's proportional attention (Bolya et al., "Token Merging:
Your ViT But Faster", ICLR 2023, arXiv 2210.09461, Eq. 1: softmax(q k^T / sqrt(d) + log s))
applied to a KV cache: for entries whose keys are alike, exp(q.k_i) summed over the group is about
n exp(q.k_kept), so the row's normalizer, and with it the share the rest of the cache gets,
survives the eviction. Keys and values of the kept entries stay exactly as stored (merging them
as ToMe averages tokens changed nothing measurable on 10 videos, and keeps a kept needle
intact); an entry that already stands for several (a second compression) adds its weight.

Costs: 4 bytes per kept entry and KV head (counted in the cache's bytes: with 64-dim fp16 keys
and values, 1.6% of the kept entries' bytes), attention over that layer through mmkv's PyTorch
path (the fused decode kernel does not add the weights; segments with weights are dequantized
block by block), and one similarity search at compression time: every evicted key against
every kept key of its head, a fifth of the attention's work on the bundled model at 8K tokens
(a few percent with a real decoder's GQA and MLP). `reach=R` (a parameter of every eviction
press, default 0 = the whole head) matches each evicted entry only among the kept entries within
R sequence positions (and its nearest kept neighbour on either side), about 2R x (kept share)
candidates: on the long benchmark reach=256 brings the merge's prefill cost from +32% to +7%
(+14% to +8% since the CPU search runs in tiles, lookm.ROW_TILE), at -0.3 [-1.2, +0.5] points
against the whole search's +0.2 [-0.3, +0.7] (BENCHMARKS.md, "Matching only near the evicted
entry").
Per-head budgets (ragged layers) are not supported with it.
"""
from __future__ import annotations

import torch

from .lookm import _best_match
from .scores import gather_entries


def mass_merge(keys: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor,
               logw: torch.Tensor | None = None, pos: torch.Tensor | None = None, reach: int = 0) -> torch.Tensor:
    """Log-weights [H, K] of the kept entries after the evicted ones join them.

    keys [B, H, n, D]; kept [H, K], evicted [H, E]: entry indices, each head's in sequence order;
    logw [H, n]: the entries' current log-weights (None: each stands for itself); pos [H, n] the
    entries' sequence indices and reach > 0: match among the kept entries within `reach` positions
    only (`lookm._best_match`; 0 or no pos: among all). The matching uses batch row 0 (the
    pipeline runs batch 1; positions and weights are per head, not per row)."""
    h = kept.shape[0]
    w = torch.ones(h, keys.shape[2], dtype=torch.float32) if logw is None else logw.float().cpu().exp()
    kept, evicted = kept.cpu().long(), evicted.cpu().long()
    count = w.gather(1, kept)
    if evicted.shape[1]:
        kp = ep = None
        if pos is not None and reach > 0:
            p = pos.cpu().long()
            kp, ep = p.gather(1, kept), p.gather(1, evicted)
        _, piv = _best_match(gather_entries(keys[:1], kept), gather_entries(keys[:1], evicted), kp, ep, reach)  # [1, H, E]
        count = count.scatter_add(1, piv[0].cpu().long(), w.gather(1, evicted))
    return count.log().to(keys.device)
