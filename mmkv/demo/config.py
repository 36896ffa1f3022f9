"""The demo's settings (`DemoConfig`, every field a `mmkv demo` option) and the small formatters
the page uses for sizes and durations."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import InputError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
SAMPLE_VIDEO = os.path.join(ASSETS, "sample.mp4")
SAMPLE_META = os.path.join(ASSETS, "sample.json")
DEFAULT_MODEL = "mmkv-tiny"

_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int | None) -> int | None:
    """'20gb' -> 20_000_000_000 (decimal units, as Gradio's max_file_size; 'gib' is binary);
    an int is bytes; None / 'none' / '0' means no limit."""
    if text is None:
        return None
    if isinstance(text, int):
        return text if text > 0 else None
    s = str(text).strip().lower().replace(" ", "")
    if s in ("", "none", "0", "inf", "unlimited"):
        return None
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):] or "b"
    if unit not in _UNITS:
        raise InputError(f"cannot read the size {text!r}: use a number with a unit, e.g. 500mb, 20gb")
    try:
        value = float(num)
    except ValueError:
        raise InputError(f"cannot read the size {text!r}: use a number with a unit, e.g. 500mb, 20gb") from None
    if not value > 0:
        raise InputError(f"a size limit must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def human_seconds(s: float) -> str:
    if not s == s:  # NaN
        return "unknown length"
    s = int(round(s))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


@dataclass
class DemoConfig:
    """Settings of the demo (all have command-line options, see `mmkv demo -h`).

    models:            model choices (HF ids, local folders, "mmkv-tiny"); the first is the default.
    allow_custom_model: let users type any model id / folder into the model box (off by default:
                       a public demo should not load arbitrary paths).
    recipe:            the default recipe; the choices are every preset, found at start-up.
    max_upload:        largest upload, e.g. "20gb" (Gradio rejects bigger files before they are stored).
    max_duration:      longest video in seconds (None: no limit).
    max_frames:        most frames a user may sample (the frames slider's maximum).
    frames:            default number of sampled frames (with fps > 0: the cap).
    fps:               default sampling rate (2, as Qwen2-VL samples videos); 0 samples `frames`
                       uniformly over the whole video.
    max_new_tokens:    longest answer a user may ask for.
    concurrency:       model calls running at once (1 for one GPU); others wait in the queue.
    queue_size:        requests waiting at most; more are refused with a "queue full" message.
    max_encodings:     encoded videos kept in memory across all users (least recently used dropped).
    session_ttl:       seconds an idle browser session keeps its chat and encoding.
    upload_dir:        where uploads are stored (None: a fresh temporary folder, removed on exit).
    upload_ttl:        uploads older than this many seconds are deleted (checked every ttl / 4).
    unclaimed_ttl:     uploads no session uses (never checked by the demo, e.g. posted straight to
                       Gradio's upload endpoint, or given up) are deleted once this many seconds old.
    thumbnails:        frames shown with the kept-token overlay.
    device, dtype, attn_implementation: passed to `mmkv.load`.
    """

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    allow_custom_model: bool = False
    recipe: str = "none"
    max_upload: str | int | None = "20gb"
    max_duration: float | None = 4 * 3600.0
    max_frames: int = 512
    frames: int = 256
    fps: float = 2.0
    max_new_tokens: int = 256
    concurrency: int = 1
    queue_size: int = 64
    max_encodings: int = 4
    session_ttl: float = 3 * 3600.0
    upload_dir: str | None = None
    upload_ttl: float = 3 * 3600.0
    unclaimed_ttl: float = 600.0
    thumbnails: int = 12
    device: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if not self.models:
            self.models = [DEFAULT_MODEL]
        self.max_upload_bytes = parse_size(self.max_upload)
        for name in ("max_frames", "frames", "max_new_tokens", "concurrency", "queue_size", "max_encodings",
                     "thumbnails"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"demo setting {name} must be a positive integer, got {v!r}")
        if not (isinstance(self.fps, (int, float)) and self.fps >= 0):
            raise InputError(f"demo setting fps must be 0 (uniform frames) or positive, got {self.fps!r}")
        if self.frames > self.max_frames:
            raise InputError(f"the default frames ({self.frames}) exceed max_frames ({self.max_frames})")
        if self.max_duration is not None and not self.max_duration > 0:
            raise InputError(f"max_duration must be positive seconds (or None), got {self.max_duration!r}")
        for name in ("session_ttl", "upload_ttl", "unclaimed_ttl"):
            if not getattr(self, name) > 0:
                raise InputError(f"demo setting {name} must be positive seconds, got {getattr(self, name)!r}")


