"""CompressedCache: a transformers `Cache` whose layers can be evicted, merged and quantized.

Each `KVLayer` stores, for batch size B, KV heads H and head dim D:

- `segments`: compressed parts (e.g. `QuantSegment`: packed low-bit keys and values with scales);
- `keys`, `values`: a full-precision tail [B, H, L, D] where new tokens are appended;
- `pos`: for every stored entry, its index in the LLM input sequence ([H, n] int32 per part), so
  presses know which token an entry was after any eviction, merge or reordering;
- `seen`: how many tokens the layer has been given (the logical length);
- `logw`: None, or after a mass-preserving merge (`merge="mass"`, evict.py) the log of how many
  original entries each full-precision entry stands for ([H, n] fp32, 0 for an entry that stands
  for itself), added to its attention logits; a quantized segment carries its own (`logw`).

Layers may hold different numbers of entries; `get_seq_length()` is the logical length and
`get_mask_sizes()` the stored one. Attention is order-free over the cache (every cached entry
precedes the new queries; RoPE is already applied to keys), so a layer may keep its parts in any
order. The byte count is the sum of the real stored tensors, each distinct tensor once; every
kept tensor owns its storage (a kept slice is copied, so no view keeps the buffer it came from
alive): `storage_nbytes()` (the storages really referenced) equals `nbytes() + index_nbytes()`.

Tensors are never modified in place: updates and presses build new tensors, so `clone()` is a
cheap shallow snapshot (used to answer several questions from one encoded video).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attend import causal_mask, merge_partials, partial_attention
from .quant import NonFiniteError, QuantTensor
from .storage import data_tensors, distinct_nbytes, own, storage_nbytes


def cat_logw(a, b) -> torch.Tensor | None:
    """The log-weights of segment `a` followed by segment `b`'s ([H, n_a + n_b]; a segment without
    them stands for itself, zeros), or None when neither has any."""
    if a.logw is None and b.logw is None:
        return None
    return torch.cat([s.logw.to(a.pos.device) if s.logw is not None else
                      torch.zeros(s.pos.shape, dtype=torch.float32, device=a.pos.device) for s in (a, b)], 1)


class SegmentParts:
    """Shared by the segments that hold keys, values, pos, label and logw as fields, in that order
    (QuantSegment, dense.DenseSegment): their size, bytes and concatenation."""

    @property
    def num_tokens(self) -> int:
        return self.keys.num_tokens

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + (0 if self.logw is None else self.logw.nbytes)

    def cat(self, other):
        """A new segment of the same type: self's entries, then other's."""
        return type(self)(self.keys.cat(other.keys), self.values.cat(other.values),
                          torch.cat([self.pos, other.pos.to(self.pos.device)], 1), self.label, cat_logw(self, other))


@dataclass
class QuantSegment(SegmentParts):
    """A compressed part of a layer: quantized keys and values of the same tokens."""

    keys: QuantTensor
    values: QuantTensor
    pos: torch.Tensor  # [H, n] int32 sequence index of each entry
    label: str = "quant"  # precision class shown in stats (e.g. "int2", "int4")
    logw: torch.Tensor | None = None  # [H, n] fp32 log-weights of a mass merge (core module docstring)

    def fused_attention(self, query: torch.Tensor, scaling: float):
        """(out, lse) over the packed codes (mmkv.kernels.quant_decode): the fused Triton kernel
        on CUDA, block-wise table-lookup dequantization elsewhere. None (the caller dequantizes
        block by block) when the segment carries log-weights, which the kernel does not add."""
        if self.logw is not None:
            return None
        from ..kernels.quant_decode import fused_quant_segment
        from .rotate import RotatedQuant, rotate, unrotate

        if isinstance(self.keys, RotatedQuant) or isinstance(self.values, RotatedQuant):
            if not (isinstance(self.keys, RotatedQuant) and isinstance(self.values, RotatedQuant)):
                return None  # one side rotated: the block path dequantizes each in its own basis
            # the codes hold k R and v R: q.k = (q R).(k R), and the output comes back as (P V R) R^T
            inner = QuantSegment(self.keys.inner, self.values.inner, self.pos, self.label)
            out, lse = fused_quant_segment(inner, rotate(query).to(query.dtype), scaling)
            return unrotate(out).to(out.dtype), lse
        return fused_quant_segment(self, query, scaling)

    def blocks(self, dtype: torch.dtype, block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Dequantized (keys, values) [B, H, n, D] in blocks of at most `block` tokens."""
        n = self.num_tokens
        step = max(block // max(self.keys.group, 1), 1) * max(self.keys.group, 1) if self.keys.axis == "channel" else block
        for s in range(0, n, step):
            e = min(n, s + step)
            yield self.keys.dequantize(dtype, s, e), self.values.dequantize(dtype, s, e)


class KVLayer(CacheLayerMixin):
    """One decoder layer of a `CompressedCache` (see module docstring)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    DEQUANT_BLOCK = 4096  # tokens dequantized at a time on the PyTorch attention path

    def __init__(self):
        super().__init__()
        self.segments: list = []
        self.pos: torch.Tensor | None = None
        self.logw: torch.Tensor | None = None  # [H, n] fp32 log-weights of the residual (module docstring)
        self.seen = 0
        self.fused = False  # attention reads the parts directly instead of a dequantized copy
        self.on_update: Callable[["KVLayer"], None] | None = None  # called before each append

    index: int | None = None  # the decoder layer (set by CompressedCache), named in errors

    @contextlib.contextmanager
    def quantizing(self):
        """Name this layer in a NonFiniteError raised by quantizing its entries."""
        try:
            yield
        except NonFiniteError as e:
            if e.layer is not None or self.index is None:
                raise
            raise NonFiniteError(str(e), self.index) from None

    # --- transformers layer API -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)  # not a view: it would keep key_states alive
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.pos = torch.zeros(key_states.shape[1], 0, dtype=torch.int32, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.on_update is not None:
            with self.quantizing():
                self.on_update(self)
        n = key_states.shape[-2]
        new_pos = torch.arange(self.seen, self.seen + n, dtype=torch.int32, device=self.pos.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.pos = torch.cat([self.pos, new_pos.expand(self.pos.shape[0], n)], dim=1)
        if self.logw is not None:  # new entries stand for themselves
            self.logw = torch.cat([self.logw, self.logw.new_zeros(self.logw.shape[0], n)], dim=1)
        self.seen += n
        if self.fused or not self.segments:
            return self.keys, self.values
        return self.dequantized()

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a CompressedCache cannot be cropped; clone() it before use instead")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported on a CompressedCache")

    # --- mmkv API ---------------------------------------------------------------------------
    @property
    def stored(self) -> int:
        """Entries held (per head), all parts together."""
        if not self.is_initialized:
            return 0
        return self.keys.shape[-2] + sum(s.num_tokens for s in self.segments)

    @property
    def residual_len(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored K/V data: segment codes, scales, zeros, anchors and permutations, and
        the full-precision tail; a tensor shared by several segments counts once."""
        if not self.is_initialized:
            return 0
        return distinct_nbytes([self.keys, self.values, self.logw, *data_tensors(self.segments)])

    @property
    def index_nbytes(self) -> int:
        """Bytes of the position bookkeeping (int32 per stored entry and head)."""
        if not self.is_initialized:
            return 0
        # a ragged segment stores its positions flat (its `pos` is a padded table made on demand)
        return distinct_nbytes([self.pos] + [getattr(s, "flat_pos", s.pos) for s in self.segments])

    def bytes_by_class(self) -> dict[str, int]:
        """nbytes split by precision class (a shared tensor counts in the first class holding it)."""
        out: dict[str, int] = {}
        seen: set = set()
        if self.is_initialized:
            window = [self.keys, self.values, self.logw]
            out[f"{str(self.keys.dtype).replace('torch.', '')} window"] = distinct_nbytes(window, seen)
        for s in self.segments:
            out[s.label] = out.get(s.label, 0) + distinct_nbytes(data_tensors(s), seen)
        return out

    def positions(self) -> torch.Tensor:
        """Sequence index of every stored entry, all parts, [H, stored] (segment order, then tail)."""
        return torch.cat([s.pos for s in self.segments] + [self.pos], 1)

    def set_residual(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                     logw: torch.Tensor | None = None) -> None:
        """Replace the full-precision part (used by evicting and merging presses). `logw`: the new
        part's log-weights ([H, n]; None: every entry stands for itself). A layer that holds
        log-weights must be given them: a press that would drop them raises instead."""
        b, h, n, d = keys.shape
        if values.shape[:3] != (b, h, n) or pos.shape != (h, n):
            raise ValueError(f"inconsistent shapes: keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
                             f"pos {tuple(pos.shape)}")
        if logw is None and self.logw is not None:
            raise RuntimeError("this layer holds the log-weights of a mass merge (merge='mass'), which this press "
                               "does not carry over; after a mass merge only kivi may compress the cache further")
        if logw is not None and logw.shape != (h, n):
            raise ValueError(f"logw {tuple(logw.shape)} does not match pos {tuple(pos.shape)}")
        self.keys, self.values, self.pos = own(keys), own(values), own(pos.to(torch.int32))
        self.logw = None if logw is None else own(logw.float())

    def select(self, idx: torch.Tensor) -> None:
        """Keep the full-precision entries `idx` ([H, k] per head or [k] shared), in the given order."""
        if idx.dim() == 1:
            idx = idx.unsqueeze(0).expand(self.keys.shape[1], -1)
        g = idx.to(self.keys.device).long()
        gi = g.view(1, *g.shape, 1).expand(self.keys.shape[0], -1, -1, self.keys.shape[-1])
        self.set_residual(self.keys.gather(2, gi), self.values.gather(2, gi), self.pos.gather(1, g),
                          None if self.logw is None else self.logw.gather(1, g.to(self.logw.device)))

    def dequantized(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All entries as full-precision [B, H, stored, D] tensors (segments first, then the tail).
        Materializes a copy: for tests and presses that need everything at once, never for decoding."""
        dtype = dtype or self.keys.dtype
        ks = [s.keys.dequantize(dtype) for s in self.segments] + [self.keys.to(dtype)]
        vs = [s.values.dequantize(dtype) for s in self.segments] + [self.values.to(dtype)]
        return torch.cat(ks, 2), torch.cat(vs, 2)

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of `query` [B, Hq, Lq, D] (the last Lq appended tokens) over all parts.

        Dispatches to a fused kernel for segments that have one, else dequantizes block by block.
        Returns [B, Lq, Hq, D] in the query dtype (the layout transformers' attention returns)."""
        from ..kernels import segment_attention

        lq = query.shape[2]
        parts = [segment_attention(query, seg, scaling, self.DEQUANT_BLOCK) for seg in self.segments]
        parts.append(partial_attention(query, self.keys, self.values, scaling,
                                       causal_mask(lq, self.keys.shape[2], query.device), self.logw))
        out = merge_partials(parts) if len(parts) > 1 else parts[0][0]
        return out.to(query.dtype).transpose(1, 2).contiguous()


class CompressedCache(Cache):
    """A transformers `Cache` of `KVLayer`s; see the module docstring.

    >>> cache = CompressedCache(num_layers=24)
    >>> model.model.language_model(inputs_embeds=x, position_ids=p, past_key_values=cache, use_cache=True)
    >>> cache.nbytes(), cache.lengths()
    """

    def __init__(self, num_layers: int):
        super().__init__(layers=[KVLayer() for _ in range(num_layers)])
        for i, layer in enumerate(self.layers):
            layer.index = i

    @property
    def seen(self) -> int:
        return self.layers[0].seen if self.layers else 0

    def lengths(self) -> list[int]:
        """Stored entries per layer."""
        return [layer.stored for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of all stored K/V data (codes, scales, zeros, full-precision windows)."""
        return sum(layer.nbytes for layer in self.layers)

    def index_nbytes(self) -> int:
        """Bytes of the position bookkeeping, apart from nbytes()."""
        return sum(layer.index_nbytes for layer in self.layers)

    def storage_nbytes(self) -> int:
        """Bytes of every distinct storage the layers reference, whole (not the sizes of views):
        what the cache really keeps allocated. Equals nbytes() + index_nbytes()."""
        return storage_nbytes(self.layers)

    def bytes_by_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            for k, v in layer.bytes_by_class().items():
                out[k] = out.get(k, 0) + v
        return out

    def set_fused(self, fused: bool) -> None:
        for layer in self.layers:
            layer.fused = fused

    def clone(self) -> "CompressedCache":
        """A snapshot sharing the (immutable) tensors; updating either copy leaves the other intact."""
        new = copy.copy(self)
        new.layers = []
        for layer in self.layers:
            lc = copy.copy(layer)
            lc.segments = list(layer.segments)
            new.layers.append(lc)
        return new
