"""Result and Stats: what one answer cost, every figure measured on the real run.

Visual tokens before and after each vision stage, KV entries per layer, KV bytes stored (the sum
of the real cache tensors) against the fp16 equivalent, encode / prefill / decode times, and
peak memory (CUDA max allocated, or the process's resident set sampled during the call).
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Stats:
    recipe: str = "none"
    model: str = ""
    frames: int = 0
    visual_tokens: list = field(default_factory=list)  # [(stage, before, after)]
    prompt_tokens: int = 0                              # LLM input tokens after vision compression
    kv_len_per_layer: list = field(default_factory=list)
    kv_bytes: int = 0
    kv_bytes_fp16: int = 0
    kv_bytes_by_class: dict = field(default_factory=dict)
    kv_index_bytes: int = 0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    device: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def visual_tokens_in(self) -> int:
        return self.visual_tokens[0][1] if self.visual_tokens else 0

    @property
    def visual_tokens_kept(self) -> int:
        return self.visual_tokens[-1][2] if self.visual_tokens else 0

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_fp16 if self.kv_bytes_fp16 else float("nan")

    @property
    def bits_per_element(self) -> float:
        """Stored KV bits per element of the uncompressed cache (16 for fp16, ~3 for KIVI-2)."""
        return 16.0 * self.kv_ratio

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(visual_tokens_in=self.visual_tokens_in, visual_tokens_kept=self.visual_tokens_kept,
                 kv_ratio=self.kv_ratio, bits_per_element=self.bits_per_element, tokens_per_s=self.tokens_per_s)
        return d

    def table(self) -> str:
        """A human-readable summary."""
        mib = 1 / 2**20
        rows = [("recipe", self.recipe), ("model", self.model), ("device", self.device), ("frames", self.frames)]
        for stage, before, after in self.visual_tokens:
            pct = f" ({100 * after / before:.1f}%)" if before else ""
            rows.append((f"visual tokens [{stage}]", f"{before} -> {after}{pct}"))
        rows.append(("prompt tokens (LLM)", self.prompt_tokens))
        if self.kv_len_per_layer:
            lens = self.kv_len_per_layer
            same = len(set(lens)) == 1
            rows.append(("KV entries per layer", lens[0] if same else f"{min(lens)}..{max(lens)} {lens}"))
        rows.append(("KV bytes (stored / fp16)",
                     f"{self.kv_bytes * mib:.3f} MiB / {self.kv_bytes_fp16 * mib:.3f} MiB "
                     f"({100 * self.kv_ratio:.1f}%, {self.bits_per_element:.2f} bits/elem)"))
        if len(self.kv_bytes_by_class) > 1:
            rows.append(("KV bytes by class", ", ".join(f"{k}: {v * mib:.3f} MiB"
                                                         for k, v in self.kv_bytes_by_class.items())))
        rows.append(("encode / prefill / decode", f"{self.encode_s:.3f} s / {self.prefill_s:.3f} s / "
                                                  f"{self.decode_s:.3f} s"))
        rows.append(("new tokens", f"{self.new_tokens} ({self.tokens_per_s:.1f} tok/s)"))
        rows.append((f"peak memory ({self.peak_memory_kind})", f"{self.peak_memory_bytes * mib:.1f} MiB"))
        for k, v in self.extra.items():
            rows.append((k, _short(v)))
        w = max(len(str(k)) for k, _ in rows)
        return "\n".join(f"{str(k):<{w}}  {v}" for k, v in rows)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], float):
        return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
    return str(v)


@dataclass
class Result:
    """An answer: `text` plus `stats`. `str(result)` is the text."""

    text: str
    stats: Stats
    tokens: list = field(default_factory=list)
    note: str = ""  # e.g. "the model is untrained"
    scores: list | None = field(default=None, repr=False)  # per-step logits when asked for

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "note": self.note, "stats": self.stats.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


# ----------------------------------------------------------------------------- measurement
def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a block, synchronizing CUDA before and after."""

    def __init__(self, device=None):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        _sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def peak_memory(device):
    """Yields a dict filled on exit with {"bytes", "kind"}: CUDA max allocated during the block,
    or the peak resident set size sampled every 20 ms on CPU."""
    out = {"bytes": 0, "kind": ""}
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            yield out
        finally:
            torch.cuda.synchronize(dev)
            out.update(bytes=torch.cuda.max_memory_allocated(dev), kind="cuda max allocated")
        return
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_bytes())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        peak[0] = max(peak[0], _rss_bytes())
        out.update(bytes=peak[0], kind="process RSS")
