"""Where the dense levels live while they are not needed: CPU memory or a memory-mapped file.

- "cpu": tensors copied to CPU memory, pinned when CUDA is present (fast, asynchronous copies
  back to the device). On a CPU-only machine the "device" is CPU memory too: the levels are
  separate tensors, so the byte counts still tell the two levels apart.
- "disk": tensors written once, back to back, to one anonymous temporary file (created in `dir`,
  unlinked at once, so nothing is left behind); a fetch maps only the bytes it needs and copies
  them to the device, then unmaps them. The process's resident memory does not grow with the
  dense level: videos beyond RAM fit.

A level is a list of segments (see parts.py); `put` returns it with every tensor replaced by
its offloaded copy (CPU tensors, or `DiskRef`s), `fetch` brings one back to a device.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from .parts import map_tensors, own

ALIGN = 64  # bytes: every tensor in the file starts aligned (any dtype can view it)


@dataclass(frozen=True)
class DiskRef:
    """A tensor stored in the offload file at `offset`."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple


class Offload:
    """The offload target of one encoding's dense levels (see module docstring)."""

    def __init__(self, mode: str = "cpu", directory: str | None = None):
        if mode not in ("cpu", "disk"):
            raise ValueError(f"offload must be 'cpu' or 'disk', got {mode!r}")
        self.mode = mode
        self.pinned = mode == "cpu" and torch.cuda.is_available()
        self.file = tempfile.TemporaryFile(dir=directory or None) if mode == "disk" else None
        self.size = 0            # bytes written to the file (padding included)
        self.stored_bytes = 0    # bytes of every offloaded tensor (K/V data and positions)

    @property
    def kind(self) -> str:
        return "disk (memory-mapped)" if self.mode == "disk" else ("cpu (pinned)" if self.pinned else "cpu")

    # ------------------------------------------------------------------ put
    def put(self, part):
        return map_tensors(part, self._put_tensor)

    def _put_tensor(self, t: torch.Tensor):
        self.stored_bytes += t.nbytes
        if self.mode == "cpu":
            if t.device.type == "cpu":
                return own(t)
            dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned)
            return dst.copy_(t)
        data = own(t.detach().to("cpu"))
        pad = (-self.size) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.size += pad
        ref = DiskRef(self.size, data.nbytes, data.dtype, tuple(data.shape))
        if data.nbytes:
            data.reshape(-1).view(torch.uint8).numpy().tofile(self.file)
        self.size += data.nbytes
        return ref

    # ------------------------------------------------------------------ fetch
    def fetch(self, part, device):
        """The offloaded `part` as tensors on `device` (own storages, never file mappings)."""
        device = torch.device(device)
        if self.mode == "disk":
            self.file.flush()
        return map_tensors(part, lambda t: self._fetch_tensor(t, device), leaf=DiskRef)

    def _fetch_tensor(self, t, device: torch.device) -> torch.Tensor:
        if isinstance(t, DiskRef):
            if t.nbytes == 0:
                return torch.empty(t.shape, dtype=t.dtype, device=device)
            arr = np.memmap(self.file, dtype=np.uint8, mode="c", offset=t.offset, shape=(t.nbytes,))
            mapped = torch.from_numpy(arr).view(t.dtype).view(t.shape)
            out = mapped.to(device) if device.type != "cpu" else mapped.clone()
            del mapped, arr  # unmapped here: fetched bytes never stay resident as file pages
            return out
        if t.device == device:
            return t
        return t.to(device, non_blocking=t.is_pinned())

    def file_size(self) -> int:
        return os.fstat(self.file.fileno()).st_size if self.file is not None else 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __del__(self):  # pragma: no cover - interpreter shutdown order
        try:
            self.close()
        except Exception:
            pass
