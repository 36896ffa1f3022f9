"""Byte accounting of a cache: the bytes its data tensors declare, and the storages it really holds.

Two counts, which must agree (DESIGN.md invariant 4; tests/test_bytes.py checks every press):

- `distinct_nbytes(tensors)`: the bytes of the stored data, each distinct tensor counted once
  (two segments sharing one tensor, e.g. VidKV's channel permutation, count it once). What
  `CompressedCache.nbytes()` reports.
- `storage_nbytes(obj)`: the bytes of every distinct storage reachable from `obj` (through lists,
  tuples, dicts and the attributes of mmkv's and dataclass objects; callables are not followed),
  each storage counted once and whole. A view that keeps a bigger buffer alive (a slice of the
  prompt's keys, say) counts the whole buffer here and only its own elements in `nbytes`, so
  the two counts differ; so do tensors held but not declared (an attribute cache).

`data_tensors(obj)` lists the tensors a segment declares as its stored data: the tensors in its
dataclass fields, recursively, except the bookkeeping fields in `INDEX_FIELDS` (positions); a
segment that is not a dataclass declares them with a `stored_tensors()` method (RaggedSegment).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import torch

INDEX_FIELDS = ("pos",)  # bookkeeping, counted apart (`KVLayer.index_nbytes`)


def data_tensors(obj) -> Iterator[torch.Tensor]:
    """The tensors in the dataclass fields of `obj` (recursively; lists and tuples too), except
    the fields named in INDEX_FIELDS."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from data_tensors(x)
    elif hasattr(obj, "stored_tensors"):
        yield from obj.stored_tensors()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.name not in INDEX_FIELDS:
                yield from data_tensors(getattr(obj, f.name))


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.device, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def distinct_nbytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Sum of t.nbytes over the distinct tensors (the same view of the same storage counts once).
    Pass a `seen` set to count across several calls (e.g. bytes per precision class)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        k = _view_key(t)
        if k not in seen:
            seen.add(k)
            total += t.nbytes
    return total


def reachable_tensors(obj, _visited: set | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `obj`: lists, tuples, sets, dict values, and the attributes of
    dataclasses and of objects defined in mmkv. Callables (hooks) are not followed."""
    visited = set() if _visited is None else _visited
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if id(obj) in visited or callable(obj):
        return
    visited.add(id(obj))
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif hasattr(obj, "__dict__") and (dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("mmkv")):
        items = vars(obj).values()
    else:
        return
    for x in items:
        yield from reachable_tensors(x, visited)


def storage_nbytes(obj) -> int:
    """Bytes of every distinct storage reachable from `obj` (see `reachable_tensors`), whole."""
    seen: set = set()
    total = 0
    for t in reachable_tensors(obj):
        s = t.untyped_storage()
        k = (s.data_ptr(), t.device)
        if k not in seen:
            seen.add(k)
            total += s.nbytes()
    return total


def own(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if it owns its storage exactly, else a compact copy (so a kept slice does not
    keep the tensor it was sliced from alive)."""
    if t.untyped_storage().nbytes() == t.nbytes and t.is_contiguous():
        return t
    return t.clone(memory_format=torch.contiguous_format)
