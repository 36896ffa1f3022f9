"""The parts a bi-level layer holds: full-precision segments, packing a level with the recipe's
quantizer, and joining parts of the same format into few segments.

A level (the sparse entries of a chunk, or the rest of it) is a list of segments: with a
quantizer, the segments its own `flush` writes (KIVI's or VidKV's packed codes, whole groups
only) plus a `DenseSegment` for the entries left over; without one, a single `DenseSegment`.
Every segment keeps the sequence index of each entry (`pos`), so attention stays order-free.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..core import KVLayer
from ..dense import DenseSegment


def map_tensors(obj, fn: Callable, leaf: type | tuple = ()):
    """`obj` with every tensor inside it (dataclass fields, recursively; lists and tuples) replaced
    by fn(tensor); instances of `leaf` types are passed to fn too. Other fields are kept; the
    original is not modified."""
    if isinstance(obj, torch.Tensor) or (leaf and isinstance(obj, leaf)):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(getattr(obj, f.name), fn, leaf) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn, leaf) for x in obj)
    return obj


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside `obj` (as map_tensors visits them)."""
    out: list[torch.Tensor] = []
    map_tensors(obj, lambda t: out.append(t) or t)
    return out


def storage_bytes(objs) -> int:
    """Bytes of the distinct storages the tensors inside `objs` hold (views counted once, and
    a view of a larger storage counted at the storage's size)."""
    seen: dict[tuple, int] = {}
    for t in tensors(list(objs)):
        s = t.untyped_storage()
        seen[(t.device.type, t.device.index, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def pack_level(keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, quantizer, label: str,
               logw: torch.Tensor | None = None) -> list:
    """One level of a chunk, [B, H, n, D] keys and values with sequence indices pos [H, n], as
    segments: the quantizer's own packed format for whole groups (its `flush` on a temporary
    layer, with no full-precision window), the leftover entries as a DenseSegment. Labels get
    " " + label appended, so a quantizer never merges later groups into a level's segment.
    `logw` [H, n]: the entries' log-weights (a mass merge), split along with them."""
    keys, values, pos = keys.contiguous(), values.contiguous(), pos.to(torch.int32).contiguous()
    if keys.shape[2] == 0:
        return []
    parts: list = []
    if quantizer is not None:
        q = dataclasses.replace(quantizer, residual=0) if hasattr(quantizer, "residual") else quantizer
        tmp = KVLayer()
        tmp.lazy_initialization(keys, values)
        tmp.set_residual(keys, values, pos, logw)
        tmp.seen = int(pos.max()) + 1
        q.flush(tmp)
        parts = [map_tensors(dataclasses.replace(s, label=f"{s.label} {label}"), own) for s in tmp.segments]
        keys, values, pos, logw = tmp.keys, tmp.values, tmp.pos, tmp.logw
    if keys.shape[2]:
        parts.append(DenseSegment.of(keys.clone(), values.clone(), pos.clone(), f"{_dtype_name(keys)} {label}",
                                     None if logw is None else logw.clone()))
    return parts


def own(t: torch.Tensor) -> torch.Tensor:
    """`t` if it is the whole of its own storage, else a compact copy (a view never keeps a larger
    storage alive, and byte counts stay the tensors' own)."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).replace("torch.", "")


def join(parts: list) -> list:
    """Parts of the same type and label concatenated into one segment where their format allows
    (`cat` raises ValueError otherwise: e.g. 8-bit statistics with different anchors)."""
    out: list = []
    for p in parts:
        for i, q in enumerate(out):
            if type(q) is type(p) and q.label == p.label:
                try:
                    out[i] = q.cat(p)
                    break
                except ValueError:
                    continue
        else:
            out.append(p)
    return out
