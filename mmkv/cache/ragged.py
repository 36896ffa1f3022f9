"""Full-precision KV entries whose count differs per head, stored without padding.

Per-head budgets (AdaKV) leave head h of a layer with n_h entries. A [B, H, L, D] tensor would
need L = max n_h (padding that saves nothing), so a `RaggedSegment` stores the heads back to
back, [B, sum n_h, D], with the offsets. It is a segment of a `KVLayer` (like a quantized
segment): attention over it is computed per KV head and merged with the layer's other parts by
log-sum-exp, so the padding is never stored, nor even formed in attention. `nbytes` is the real
storage. `pos` is the [H, max n_h] view the layer API expects, -1 where a head has no entry
(index bookkeeping only, made on demand; `index_nbytes` counts the flat int32 positions stored).

A ragged segment is read through the fused path only (the pipeline's: `cache.set_fused(True)`);
materializing it as one dense tensor (`dequantized()`) is refused, since padding would change
the attention.
"""
from __future__ import annotations

import torch

from .attend import partial_attention


class _NoDense:
    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens

    def dequantize(self, *a, **k):
        raise RuntimeError("a ragged (per-head budget) segment cannot be materialized as one dense tensor; "
                           "use the fused attention path (cache.set_fused(True))")


class RaggedSegment:
    """keys, values: [B, T, D] (heads back to back); pos: [T] sequence indices; lengths: [H]."""

    label = "ragged"

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, lengths: list[int]):
        if keys.shape != values.shape or keys.shape[1] != sum(lengths) or pos.numel() != sum(lengths):
            raise ValueError(f"inconsistent ragged segment: keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
                             f"pos {tuple(pos.shape)}, lengths {lengths}")
        self.flat_keys, self.flat_values = keys, values
        self.flat_pos = pos.to(torch.int32)
        self.lengths = [int(x) for x in lengths]
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)
        self.keys = self.values = _NoDense(self.num_tokens)

    @classmethod
    def from_heads(cls, keys: list[torch.Tensor], values: list[torch.Tensor], pos: list[torch.Tensor]):
        """Per head: keys/values [B, n_h, D], pos [n_h]."""
        return cls(torch.cat(keys, 1), torch.cat(values, 1), torch.cat([p.reshape(-1) for p in pos]),
                   [k.shape[1] for k in keys])

    @property
    def num_tokens(self) -> int:
        """The largest head's count (the layer API's entries per head)."""
        return max(self.lengths) if self.lengths else 0

    @property
    def entries(self) -> int:
        """Entries stored, all heads together."""
        return self.offsets[-1]

    def stored_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored data (storage.data_tensors reads it); flat_pos is index bookkeeping."""
        return self.flat_keys, self.flat_values

    @property
    def nbytes(self) -> int:
        return self.flat_keys.nbytes + self.flat_values.nbytes

    @property
    def pos(self) -> torch.Tensor:
        """[H, max n_h] int32, -1 where a head holds fewer entries."""
        out = torch.full((len(self.lengths), self.num_tokens), -1, dtype=torch.int32, device=self.flat_pos.device)
        for h, n in enumerate(self.lengths):
            out[h, :n] = self.flat_pos[self.offsets[h]:self.offsets[h + 1]]
        return out

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [B, n_h, D], values [B, n_h, D], pos [n_h]) of head h."""
        a, b = self.offsets[h], self.offsets[h + 1]
        return self.flat_keys[:, a:b], self.flat_values[:, a:b], self.flat_pos[a:b]

    def fused_attention(self, query: torch.Tensor, scaling: float):
        """(out [B, Hq, Lq, D] fp32, lse [B, Hq, Lq]) of query over this segment; every entry
        precedes the queries, so nothing is masked. Head h's query group reads only its own n_h."""
        hk = len(self.lengths)
        g = query.shape[1] // hk
        outs, lses = [], []
        for h in range(hk):
            k, v, _ = self.head(h)
            o, l = partial_attention(query[:, h * g:(h + 1) * g], k[:, None], v[:, None], scaling)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs, 1), torch.cat(lses, 1)
