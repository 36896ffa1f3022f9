"""Result and Stats: what one answer cost, every figure measured on the real run.

Visual tokens before and after each vision stage, KV entries per layer, KV bytes stored (the sum
of the real cache tensors) against one baseline, encode / prefill / decode times, and peak memory
(CUDA max allocated, or the process's resident set sampled during the call).

The KV baseline is the model's own uncompressed cache of the same prompt: its dtype, all its
layers and KV heads, and the whole prompt BEFORE any vision press (video or image tokens as the
encoder gives them, the text around them, the question and the chat template's tail).
`kv_bytes` and both baselines are taken once the prompt is prefilled and compressed, before the
answer: the answer's tokens count in neither (`extra["kv_bytes_final"]` is the stored bytes after
the answer). So

    kv_ratio = kv_bytes / kv_bytes_uncompressed = kv_ratio_vision * kv_ratio_kv

with kv_ratio_vision = kv_bytes_after_vision / kv_bytes_uncompressed (what pruning visual tokens
saves: the uncompressed cache of the prompt the LLM reads) and kv_ratio_kv = kv_bytes /
kv_bytes_after_vision (what the KV presses save on it). The position bookkeeping of the
compressed cache (int32 per entry and KV head) is `kv_index_bytes`, apart from `kv_bytes`.
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
    kv_bytes: int = 0                   # stored K/V bytes (codes, scales, zeros, full-precision windows)
    kv_bytes_uncompressed: int = 0      # the baseline: the model's own cache of the prompt before vision presses
    kv_bytes_after_vision: int = 0      # the model's own cache of the prompt the LLM reads (after vision presses)
    kv_dtype: str = ""                  # the model's KV dtype (the baseline's), e.g. "bfloat16"
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
        """Stored bytes over the model's own uncompressed cache of the same prompt, vision pruning
        included (see the module docstring)."""
        return _ratio(self.kv_bytes, self.kv_bytes_uncompressed)

    @property
    def kv_ratio_vision(self) -> float:
        """The vision presses' share: uncompressed cache of the pruned prompt / the baseline."""
        return _ratio(self.kv_bytes_after_vision, self.kv_bytes_uncompressed)

    @property
    def kv_ratio_kv(self) -> float:
        """The KV presses' share: stored bytes / uncompressed cache of the pruned prompt."""
        return _ratio(self.kv_bytes, self.kv_bytes_after_vision)

    @property
    def kv_dtype_bits(self) -> int:
        return 8 * getattr(torch, self.kv_dtype).itemsize if self.kv_dtype else 0

    @property
    def bits_per_element(self) -> float:
        """Stored KV bits per element of the uncompressed cache of the prompt the LLM reads (after
        the vision presses): the model's dtype bits (16 or 32) uncompressed, ~3 for KIVI-2 on long
        prompts. Evictions lower it; vision pruning does not (it is kv_ratio_vision)."""
        return self.kv_dtype_bits * self.kv_ratio_kv if self.kv_dtype_bits else float("nan")

    @property
    def kv_baseline(self) -> str:
        """The baseline's name, for labels: "uncompressed bfloat16"."""
        return f"uncompressed {self.kv_dtype}" if self.kv_dtype else "uncompressed"

    @property
    def kv_bytes_fp16(self) -> int:
        """Deprecated name of `kv_bytes_uncompressed` (the baseline is the model's own dtype)."""
        return self.kv_bytes_uncompressed

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(visual_tokens_in=self.visual_tokens_in, visual_tokens_kept=self.visual_tokens_kept,
                 kv_ratio=self.kv_ratio, kv_ratio_vision=self.kv_ratio_vision, kv_ratio_kv=self.kv_ratio_kv,
                 bits_per_element=self.bits_per_element, tokens_per_s=self.tokens_per_s)
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
        rows.append((f"KV bytes (stored / {self.kv_baseline})",
                     f"{self.kv_bytes * mib:.3f} MiB / {self.kv_bytes_uncompressed * mib:.3f} MiB "
                     f"({100 * self.kv_ratio:.1f}%)"))
        if self.kv_bytes_after_vision != self.kv_bytes_uncompressed:
            rows.append(("KV share: vision x KV presses", f"{100 * self.kv_ratio_vision:.1f}% x "
                                                           f"{100 * self.kv_ratio_kv:.1f}%"))
        rows.append(("KV bits per element", f"{self.bits_per_element:.2f} (of the prompt the LLM reads; "
                                            f"{self.kv_baseline}: {self.kv_dtype_bits})"))
        if self.kv_index_bytes:
            rows.append(("KV position index", f"{self.kv_index_bytes * mib:.3f} MiB (not in the KV bytes)"))
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


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def uncompressed_kv_bytes(tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes of a model's own KV cache over `tokens` tokens (batch 1): layers x (K, V) x KV heads x
    head dim x the dtype's size."""
    return tokens * num_layers * 2 * num_kv_heads * head_dim * dtype.itemsize


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
