"""Salient entries kept exact by a quantizing press (kivi:salient=F).

ZipCache (He et al., arXiv 2405.14256) keeps the tokens that receive the most normalized
attention at a higher precision than the rest; mmkv's KIVI does the same with the extreme of that
rule: the fraction F of each head's quantized entries that the prompt's own rows attend to most
stay in the model's dtype, the rest take KIVI's codes. The ranking is query-agnostic (it exists
before any question): H2O's attention received, normalized by how many rows see each key
(ZipVL's Eq. 7, `importance.ObservedImportance`), gathered during the prefill from ZipVL's probe
rows (the last 16 rows of each prefill chunk and 16 drawn uniformly).

Why: on the long benchmark's model the 2-bit loss is the keys of the layers whose attention is
sharp (BENCHMARKS.md, issue 14). There the question's attention falls on a few entries, and
those are the ones the prompt's own rows already attend to: keeping the top 5% exact took the
relative attention-output error of a sharp layer from 0.065-0.13 to 0.003 (an oracle ranked by
the question's own attention: 0.0024), where 4-bit keys everywhere give 0.006 (keys' error alone,
the question's real queries against a whole 1,024-frame prefix; an offline analysis whose script
was not kept, so indicative only: the measured figures are the benchmark's, BENCHMARKS.md).

The exact entries are a `dense.DenseSegment` of the layer (label "exact", counted in the bytes
at their real size), read by plain attention.
"""
from __future__ import annotations

import torch

from .quant import _take
from .storage import own


def salient_count(fraction: float, candidates: int) -> int:
    """Entries kept exact per head among `candidates`: round(fraction * candidates)."""
    return min(candidates, int(round(fraction * candidates)))


def split_salient(keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, logw: torch.Tensor | None,
                  scores: torch.Tensor, count: int):
    """The `count` top-scored entries of each head apart from the rest.

    keys, values [B, H, n, D]; pos [H, n]; logw [H, n] or None; scores [H, m] for the first m <= n
    entries (the candidates; the others always stay in the rest). Returns ((keys, values, pos,
    logw) of the salient entries [.., count, ..] in sequence order, (the same) of the rest in their
    original order). Every returned tensor owns its storage."""
    h, m = scores.shape
    top = scores.float().topk(count, dim=1).indices                      # [H, count]
    mask = torch.zeros(h, pos.shape[1], dtype=torch.bool, device=scores.device)
    mask.scatter_(1, top, True)
    n = pos.shape[1]
    ar = torch.arange(n, device=scores.device).expand(h, n)
    sal = ar[mask].view(h, count)                                        # ascending: the original order
    rest = ar[~mask].view(h, n - count)
    # the salient ones in sequence order (the candidates' order is not always the sequence's)
    sal = sal.gather(1, pos.to(sal.device).long().gather(1, sal).argsort(1))

    def part(idx):
        i = idx.to(keys.device)
        return (own(_take(keys, i)), own(_take(values, i)), own(pos.gather(1, idx.to(pos.device))),
                None if logw is None else own(logw.gather(1, idx.to(logw.device))))

    return part(sal), part(rest)
