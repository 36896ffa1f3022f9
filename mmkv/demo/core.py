"""The demo's logic, without Gradio: upload checks, loaded models, encodings, streaming answers.

`Demo` holds what the web app needs between requests; every handler of the Gradio app calls one
of its methods, so they can be tested without a browser:

    demo = Demo(DemoConfig())
    info = check_upload("clip.mp4", demo.config)              # InputError on a bad upload
    eid, enc = demo.encode("clip.mp4", "mmkv-tiny", "none", frames=32)   # once per video
    enc, pipe = demo.encoding(eid)                             # ... then for every question:
    for kind, value in demo.ask_stream(enc, pipe, "What happens?"):
        ...                                                    # ("text", delta) ... ("result", Result)

Encoded videos are kept in a bounded store (`max_encodings`, least recently used first out), so
that many open browser tabs cannot hold many video KV caches on the GPU.
"""
from __future__ import annotations

import contextvars
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import InputError, MmkvError

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
        for name in ("session_ttl", "upload_ttl"):
            if not getattr(self, name) > 0:
                raise InputError(f"demo setting {name} must be positive seconds, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------- recipes
def recipe_choices() -> list[str]:
    """Every named preset, found when called (methods register theirs on import): 'none' first."""
    from ..recipe import PRESETS, _ensure_registered

    _ensure_registered()
    return ["none"] + sorted(n for n in PRESETS if n != "none")


def stage_rows() -> list[tuple[str, str, str]]:
    """(kind, name, one-line description) of every registered stage."""
    from ..recipe import available

    return [(kind, name, doc) for kind, items in available().items() for name, doc in items]


def preset_rows() -> list[tuple[str, str, str]]:
    """(name, recipe string, description) of every preset."""
    from ..recipe import PRESET_DOCS, PRESETS

    return [(n, PRESETS[n] or "(no stages)", PRESET_DOCS.get(n, "")) for n in recipe_choices()]


def sample_question() -> str:
    import json

    try:
        with open(SAMPLE_META) as f:
            return json.load(f).get("question", "What happens in this video?")
    except (OSError, ValueError):
        return "What happens in this video?"


# ----------------------------------------------------------------------------- errors
def user_message(err: BaseException, paths: dict[str, str] | None = None) -> str:
    """One clear line for the page; server paths are replaced by the names users know."""
    if isinstance(err, MmkvError):
        msg = str(err)
    elif type(err).__name__ == "OutOfMemoryError":
        msg = "out of GPU memory: sample fewer frames or pick a recipe that compresses more"
        try:  # give the failed request's memory back before the next one
            import torch

            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
    else:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        msg = f"internal error ({type(err).__name__}: {first}); the app is still running, try again"
    for path, name in (paths or {}).items():
        if path:
            msg = msg.replace(repr(path), repr(name)).replace(path, name)
    return msg


# ----------------------------------------------------------------------------- uploads
@dataclass
class UploadInfo:
    path: str
    name: str
    size: int
    frames: int
    fps: float
    duration: float
    backend: str
    codec: str = ""

    @property
    def browser_playable(self) -> bool | None:
        """Whether browsers play this codec (None: unknown). Unplayable videos still work."""
        return None if not self.codec else self.codec in BROWSER_CODECS

    def describe(self) -> str:
        fps = f"{self.fps:g} fps" if self.fps else "unknown fps"
        text = f"{self.name}: {human_seconds(self.duration)} ({self.frames} frames at {fps}), {human_bytes(self.size)}"
        if self.browser_playable is False:
            text += f"; browsers cannot play its {self.codec} codec, but the model reads it"
        return text


BROWSER_CODECS = {"h264", "vp8", "vp9", "av1", "theora", "hevc"}


def video_codec(path: str) -> str:
    """The video codec's name from the container header ("" when it cannot be read)."""
    try:
        import av

        with av.open(path) as c:
            return c.streams.video[0].codec_context.name if c.streams.video else ""
    except Exception:  # noqa: BLE001 - informative only
        return ""


def check_upload(path: str | None, config: DemoConfig, name: str | None = None) -> UploadInfo:
    """Check an uploaded file before any model work: it exists, is within the size limit, is a video
    with at least one frame, and is not longer than `max_duration`. Raises InputError naming the
    problem (with the file's own name, not its server path)."""
    from ..io import probe
    from ..io.video import IMAGE_EXTENSIONS

    if not path:
        raise InputError("no video: upload a video file first")
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise InputError(f"the upload of {name!r} was lost; upload it again")
    size = os.path.getsize(path)
    if size == 0:
        raise InputError(f"{name!r} is empty (0 bytes)")
    limit = config.max_upload_bytes
    if limit is not None and size > limit:
        raise InputError(f"{name!r} is {human_bytes(size)}, over this demo's upload limit of {human_bytes(limit)}")
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        raise InputError(f"{name!r} is an image; this demo takes a video file (mp4, webm, mkv, avi, mov)")
    try:
        info = probe(path)
    except InputError as e:
        raise InputError(user_message(e, {path: name})) from None
    if info["frames"] <= 0:
        raise InputError(f"{name!r} contains zero video frames")
    duration = float(info["duration"]) if info["duration"] else float("nan")
    if config.max_duration is not None and duration == duration and duration > config.max_duration:
        raise InputError(f"{name!r} lasts {human_seconds(duration)}, over this demo's limit of "
                         f"{human_seconds(config.max_duration)}")
    return UploadInfo(path, name, size, int(info["frames"]), float(info["fps"] or 0.0), duration, info["backend"],
                      video_codec(path))


class UploadDir:
    """The one folder uploads are written to, and its clean-up (an age limit, and removal on close)."""

    def __init__(self, path: str | None = None):
        import atexit

        self.owned = path is None
        self.path = os.path.realpath(tempfile.mkdtemp(prefix="mmkv-demo-") if path is None else path)
        os.makedirs(self.path, exist_ok=True)
        atexit.register(self.remove)  # also when the process ends without close() (an exception, SIGTERM)

    def contains(self, path: str) -> bool:
        p = os.path.realpath(path)
        return os.path.commonpath([p, self.path]) == self.path

    def discard(self, path: str) -> None:
        """Delete one upload (and its folder when that becomes empty)."""
        if not self.contains(path):
            raise ValueError(f"{path!r} is not inside the upload folder {self.path!r}")
        try:
            os.remove(path)
            parent = os.path.dirname(os.path.realpath(path))
            if parent != self.path:
                os.rmdir(parent)  # only succeeds when empty
        except OSError:
            pass

    def sweep(self, max_age: float) -> int:
        """Delete files older than `max_age` seconds (and empty folders); returns how many files."""
        now, n = time.time(), 0
        for root, dirs, files in os.walk(self.path, topdown=False):
            for f in files:
                p = os.path.join(root, f)
                try:
                    if now - os.path.getmtime(p) > max_age:
                        os.remove(p)
                        n += 1
                except OSError:
                    pass
            if root != self.path:
                try:
                    os.rmdir(root)  # only succeeds when empty
                except OSError:
                    pass
        return n

    def remove(self) -> None:
        import shutil

        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.sweep(-1.0)


# ----------------------------------------------------------------------------- models and encodings
def _progress_label(stage: str) -> str:
    return {"encode": "decoding + encoding frames", "prefill": "prefilling the LLM (KV cache)",
            "decode": "generating"}.get(stage, stage)


class Demo:
    """Loaded models (one at a time), pipelines per recipe, and the store of encoded videos."""

    def __init__(self, config: DemoConfig | None = None):
        self.config = config or DemoConfig()
        self._lock = threading.RLock()
        self._model: str | None = None
        self._base = None                 # the Pipeline loaded for _model (owns the adapter)
        self._pipes: dict[str, object] = {}
        self._encodings: OrderedDict[str, tuple] = OrderedDict()  # id -> (Encoded, settings key, Pipeline)

    # ---- models
    def check_model(self, model: str | None) -> str:
        model = (model or "").strip() or self.config.models[0]
        if model not in self.config.models and not self.config.allow_custom_model:
            raise InputError(f"model {model!r} is not offered by this demo; choose one of: "
                             f"{', '.join(self.config.models)}")
        return model

    def pipeline(self, model: str | None, recipe: str | None, progress: Callable | None = None):
        """The Pipeline for (model, recipe). Recipes share the loaded model; a different model
        replaces it (one model in memory at a time)."""
        import mmkv
        from ..pipeline import Pipeline
        from ..recipe import Recipe

        model = self.check_model(model)
        r = Recipe.parse((recipe or "").strip() or "none")  # RecipeError before any loading
        spec = r.spec()
        with self._lock:
            if self._model != model:
                self._release_model()
                if progress:
                    progress(0.0, f"loading model {model}")
                c = self.config
                self._base = mmkv.load(model, "none", device=c.device, dtype=c.dtype,
                                       attn_implementation=c.attn_implementation)
                self._model = model
            pipe = self._pipes.get(spec)
            if pipe is None:
                b = self._base
                pipe = Pipeline(b.adapter, r, b.base_attn, chunk_frames=b.chunk_frames, prefill_chunk=b.prefill_chunk,
                                model_name=b.model_name, compress_at=b.compress_at)
                self._pipes[spec] = pipe
            return pipe

    def _release_model(self) -> None:
        self._pipes.clear()
        self._encodings.clear()
        self._base, self._model = None, None
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- encodings
    def settings_key(self, path: str, model: str | None, recipe: str | None, frames: int, fps: float | None) -> tuple:
        from ..recipe import Recipe

        model = self.check_model(model)
        spec = Recipe.parse((recipe or "").strip() or "none").spec()
        # uploads have unique paths (Gradio names them by content hash), so the path names the video
        return (os.path.realpath(path) if path else None, model, spec, int(frames), float(fps or 0))

    def check_frames(self, frames, fps) -> tuple[int, float | None]:
        try:
            frames = int(frames)
        except (TypeError, ValueError):
            raise InputError(f"frames must be a whole number, got {frames!r}") from None
        if not 1 <= frames <= self.config.max_frames:
            raise InputError(f"frames must be between 1 and {self.config.max_frames}, got {frames}")
        fps = float(fps) if fps not in (None, "") else 0.0
        if fps < 0 or fps != fps:
            raise InputError(f"fps must be 0 (uniform sampling) or positive, got {fps}")
        return frames, (fps or None)

    def encode(self, path: str, model: str | None, recipe: str | None, frames: int = 32, fps: float | None = None,
               progress: Callable[[float, str], None] | None = None, name: str | None = None):
        """Encode a checked upload once; returns (encoding id, Encoded). With fps, `frames` caps the
        number of sampled frames; without, `frames` are spread uniformly over the video."""
        frames, fps = self.check_frames(frames, fps)
        check_upload(path, self.config, name)
        key = self.settings_key(path, model, recipe, frames, fps)
        pipe = self.pipeline(model, recipe, progress)

        def report(stage, done, total):
            if progress:
                progress(done / max(total, 1), f"{_progress_label(stage)} ({done}/{total})")

        if progress:
            progress(0.0, "decoding + encoding frames")
        kw = {"fps": fps, "max_frames": frames} if fps else {"frames": frames}
        try:
            enc = pipe.encode(path, progress=report, **kw)
        except InputError as e:
            raise InputError(user_message(e, {path: name or os.path.basename(path)})) from None
        eid = uuid.uuid4().hex
        with self._lock:
            self._encodings[eid] = (enc, key, pipe)
            while len(self._encodings) > self.config.max_encodings:
                self._encodings.popitem(last=False)
        return eid, enc

    def encoding(self, eid: str | None, key: tuple | None = None):
        """(Encoded, Pipeline) of a stored encoding, or None when it was dropped or the settings changed."""
        with self._lock:
            item = self._encodings.get(eid) if eid else None
            if item is None or (key is not None and item[1] != key):
                return None
            self._encodings.move_to_end(eid)
            return item[0], item[2]

    def drop(self, eid: str | None) -> None:
        with self._lock:
            self._encodings.pop(eid, None)

    # ---- answers
    def ask_stream(self, enc, pipe, question: str, *, max_new_tokens: int = 64,
                   progress: Callable[[float, str], None] | None = None) -> Iterator[tuple[str, object]]:
        """Yield ("text", delta) while the answer is generated, then ("result", Result).
        The generation runs in a worker thread; errors are raised here, in the caller.
        `progress(fraction, label)` hears the prefill of the question and the decoding steps."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty; type a question about the video")
        try:
            max_new_tokens = int(max_new_tokens)
        except (TypeError, ValueError):
            raise InputError(f"max new tokens must be a whole number, got {max_new_tokens!r}") from None
        if not 1 <= max_new_tokens <= self.config.max_new_tokens:
            raise InputError(f"max new tokens must be between 1 and {self.config.max_new_tokens}")
        q: queue.Queue = queue.Queue()
        stop = threading.Event()

        def on_text(delta):
            if stop.is_set():  # the page went away: stop generating for it
                raise _Cancelled()
            q.put(("text", delta))

        def report(stage, done, total):
            if progress:
                progress(done / max(total, 1), f"{_progress_label(stage)} ({done}/{total})")

        def work():
            try:
                res = pipe.ask(enc, question.strip(), max_new_tokens=max_new_tokens, on_text=on_text,
                               progress=report)
                q.put(("result", res))
            except _Cancelled:
                q.put(("cancelled", None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                q.put(("error", e))

        ctx = contextvars.copy_context()
        worker = threading.Thread(target=ctx.run, args=(work,), daemon=True, name="mmkv-demo-ask")
        worker.start()
        try:
            while True:
                kind, value = q.get()
                if kind == "error":
                    raise value
                if kind == "cancelled":
                    return
                yield kind, value
                if kind == "result":
                    return
        finally:
            # a closed generator (client gone) must not leave generation running beside the next request
            stop.set()
            worker.join()


class _Cancelled(Exception):
    pass


# ----------------------------------------------------------------------------- pictures
def _slot_frames(enc, slots: list[int]):
    """RGB frames ([H, W, 3] uint8) shown for temporal slots `slots` of an encoded video: the
    sampled frame nearest each slot's timestamp (a slot is one frame, or Qwen's pair of frames)."""
    import numpy as np

    media, vt = enc.media, enc.visual
    if media.kind == "image":
        return [np.asarray(media.image().convert("RGB"))]
    ts_slot = vt.timestamps.double().cpu().numpy() if vt.timestamps is not None and len(vt.timestamps) else None
    picks = []
    for t in slots:
        if ts_slot is not None and len(ts_slot) == vt.grid[0]:
            i = int(np.argmin(np.abs(media.timestamps - ts_slot[t])))
        else:
            i = min(media.num_frames - 1, int(round(t * media.num_frames / max(vt.grid[0], 1))))
        picks.append(i)
    src = getattr(media, "_src", None)  # decode just these frames, not the whole video
    if src is not None:
        return list(src.get(media.indices[picks]))
    frames = media.frames()
    return [frames[i] for i in picks]


def overlay(frame, grid_hw: tuple[int, int], kept_hw, *, width: int = 224, dim: float = 0.28):
    """A thumbnail of `frame` ([H, W, 3] uint8) with the token grid drawn on it: cells of kept
    tokens keep their colours, cells of dropped tokens are darkened to `dim` and tinted.
    `kept_hw`: [K, 2] (row, col) of kept tokens in a grid of `grid_hw` cells."""
    import numpy as np
    from PIL import Image, ImageDraw

    gh, gw = grid_hw
    img = Image.fromarray(np.ascontiguousarray(frame)).convert("RGB")
    height = max(1, round(width * img.height / max(img.width, 1)))
    arr = np.asarray(img.resize((width, height), Image.BILINEAR)).astype(np.float32)
    kept = np.zeros((gh, gw), dtype=bool)
    kh = np.asarray(kept_hw, dtype=np.int64).reshape(-1, 2)
    ok = (kh[:, 0] >= 0) & (kh[:, 0] < gh) & (kh[:, 1] >= 0) & (kh[:, 1] < gw)
    kept[kh[ok, 0], kh[ok, 1]] = True
    ys = np.minimum((np.arange(height) * gh) // height, gh - 1)
    xs = np.minimum((np.arange(width) * gw) // width, gw - 1)
    mask = kept[ys][:, xs]                                            # [height, width] pixel -> kept
    tint = np.array([40.0, 0.0, 0.0], dtype=np.float32)
    arr[~mask] = arr[~mask] * dim + tint
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    if gw <= 64 and gh <= 64:  # faint grid lines where they stay readable
        for c in range(1, gw):
            x = c * width // gw
            draw.line([(x, 0), (x, height - 1)], fill=(255, 255, 255), width=1)
        for r in range(1, gh):
            y = r * height // gh
            draw.line([(0, y), (width - 1, y)], fill=(255, 255, 255), width=1)
    return out


def thumbnails(enc, n: int = 12, width: int = 224) -> list[tuple[object, str]]:
    """[(PIL image, caption)] for up to `n` temporal slots spread over the video, each with the
    kept-token overlay of that slot."""
    import numpy as np

    vt = enc.visual
    T, H, W = vt.grid
    if T <= 0 or H <= 0 or W <= 0:
        return []
    slots = sorted(set(np.round(np.linspace(0, T - 1, min(n, T))).astype(int).tolist()))
    coords = vt.coords[vt.is_patch].cpu().numpy()
    frames = _slot_frames(enc, slots)
    out = []
    ts = vt.timestamps.double().cpu().numpy() if vt.timestamps is not None and len(vt.timestamps) == T else None
    for t, frame in zip(slots, frames):
        kept = coords[coords[:, 0] == t][:, 1:]
        when = f"t={ts[t]:.1f}s · " if ts is not None else ""
        out.append((overlay(frame, (H, W), kept, width=width), f"{when}kept {len(kept)}/{H * W}"))
    return out


def _bar(name: str, frac: float, color: str, label: str) -> str:
    """One labelled horizontal bar, `frac` of the full width."""
    import html

    frac = 0.0 if not frac == frac else max(0.0, min(1.0, frac))
    return (f'<div class="mmkv-row"><span class="mmkv-name">{html.escape(name)}</span><div class="mmkv-track">'
            f'<div class="mmkv-fill" style="width:{100 * frac:.2f}%;background:{color}"></div></div>'
            f'<span class="mmkv-val">{html.escape(label)}</span></div>')


def _section(title: str, body: str, elem: str) -> str:
    import html

    return f'<div class="mmkv-card" id="{elem}"><div class="mmkv-title">{html.escape(title)}</div>{body}</div>'


CSS = """
.mmkv-card{font-family:ui-sans-serif,system-ui,sans-serif;font-size:13px;margin:4px 0 10px 0}
.mmkv-title{font-weight:600;margin-bottom:4px}
.mmkv-row{display:flex;align-items:center;gap:8px;margin:2px 0}
.mmkv-name{width:11em;flex:none;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.mmkv-track{flex:1;height:14px;background:rgba(128,128,128,.18);border-radius:3px;overflow:hidden;min-width:60px}
.mmkv-fill{height:100%}
.mmkv-val{flex:none;min-width:12em;font-variant-numeric:tabular-nums}
.mmkv-cols{display:flex;align-items:flex-end;gap:1px;height:70px;border-bottom:1px solid rgba(128,128,128,.5)}
.mmkv-col{flex:1;background:#3b82f6;min-width:1px}
.mmkv-note{color:#6b7280;font-size:12px}
.mmkv-error{color:#b91c1c;background:#fef2f2;border:1px solid #fca5a5;border-radius:6px;padding:8px 10px;font-size:14px}
.mmkv-ok{color:#065f46;background:#ecfdf5;border:1px solid #6ee7b7;border-radius:6px;padding:8px 10px;font-size:14px}
"""


def tokens_html(stats, enc=None) -> str:
    """Visual tokens before/after each vision stage, and kept tokens per frame (all slots)."""
    rows = []
    for stage, before, after in stats.visual_tokens:
        frac = after / before if before else float("nan")
        rows.append(_bar(stage, frac, "#3b82f6", f"{before} → {after} ({100 * frac:.1f}%)"))
    body = "".join(rows) or '<div class="mmkv-note">no visual tokens</div>'
    if enc is not None and enc.visual.grid[0] > 1:
        vt = enc.visual
        counts = vt.per_slot_counts().cpu().tolist()
        full = max(1, vt.grid[1] * vt.grid[2])
        cols = "".join(f'<div class="mmkv-col" title="slot {t}: {c}/{full}" style="height:{100 * c / full:.1f}%">'
                       "</div>" for t, c in enumerate(counts))
        body += (f'<div class="mmkv-note">kept tokens per frame ({len(counts)} frames, {full} tokens each)</div>'
                 f'<div class="mmkv-cols">{cols}</div>')
    return _section("Visual tokens", body, "mmkv-tokens")


def memory_html(stats) -> str:
    """KV cache bytes: the uncompressed (fp16) size against what is stored, and by class."""
    full, kept = stats.kv_bytes_fp16, stats.kv_bytes
    top = max(full, kept, 1)
    rows = [_bar("full (fp16)", full / top, "#9ca3af", human_bytes(full)),
            _bar("stored", kept / top, "#10b981",
                       f"{human_bytes(kept)} ({100 * kept / full:.1f}%)" if full else human_bytes(kept))]
    colors = ["#f59e0b", "#8b5cf6", "#ef4444", "#0ea5e9", "#84cc16"]
    for i, (k, v) in enumerate(sorted((stats.kv_bytes_by_class or {}).items())):
        if len(stats.kv_bytes_by_class) > 1:
            rows.append(_bar(f"  {k}", v / top, colors[i % len(colors)], human_bytes(v)))
    if stats.kv_index_bytes:
        rows.append(f'<div class="mmkv-note">+ {human_bytes(stats.kv_index_bytes)} of position indices</div>')
    bits = f"{stats.bits_per_element:.2f}" if full else "n/a"
    rows.append(f'<div class="mmkv-note">{bits} bits per element of the uncompressed cache; '
                f'{stats.prompt_tokens} prompt tokens</div>')
    return _section("KV cache memory: full (fp16) vs stored by this recipe", "".join(rows), "mmkv-memory")


def _per_layer_series(stats) -> list[tuple[str, list[float]]]:
    """Per-layer series: KV entries kept / prompt tokens, plus any per-layer list a method put in
    stats.extra (a list of numbers, one per layer)."""
    out = []
    lens = list(stats.kv_len_per_layer or [])
    n = len(lens)
    if n and stats.prompt_tokens:
        out.append(("KV entries kept / prompt tokens", [x / stats.prompt_tokens for x in lens]))
    for k, v in (stats.extra or {}).items():
        if isinstance(v, (list, tuple)) and n and len(v) == n and all(isinstance(x, (int, float)) for x in v):
            out.append((str(k), [float(x) for x in v]))
    return out


def layers_html(stats) -> str:
    """Ratios per layer: one bar per layer for every per-layer series."""
    import html

    series = _per_layer_series(stats)
    if not series:
        return _section("Per-layer ratios", '<div class="mmkv-note">no per-layer figures for this run</div>',
                        "mmkv-layers")
    parts = []
    for name, vals in series:
        top = max([abs(v) for v in vals] + [1e-12])
        scale = 1.0 if top <= 1.0 else top
        if len(set(vals)) == 1:
            parts.append(f'<div class="mmkv-note">{html.escape(name)}: {vals[0]:.3g} in every one of the '
                         f'{len(vals)} layers</div>')
            continue
        parts.append(f'<div class="mmkv-note">{html.escape(name)}</div>')
        parts.extend(_bar(f"layer {i}", v / scale, "#6366f1", f"{v:.3g}") for i, v in enumerate(vals))
    return _section("Per-layer ratios", "".join(parts), "mmkv-layers")


def timing_html(stats, encode_s: float | None = None) -> str:
    """Encode (once per video), prefill and decode time of the last answer."""
    enc_s = stats.encode_s if encode_s is None else encode_s
    vals = [("encode (once)", enc_s), ("prefill", stats.prefill_s), ("decode", stats.decode_s)]
    top = max([v for _, v in vals] + [1e-9])
    colors = {"encode (once)": "#9ca3af", "prefill": "#f59e0b", "decode": "#10b981"}
    rows = [_bar(k, v / top, colors[k], f"{v:.3f} s") for k, v in vals]
    tps = stats.tokens_per_s
    rows.append(f'<div class="mmkv-note">{stats.new_tokens} new tokens'
                + (f", {tps:.1f} tokens/s" if tps == tps else "") + "</div>")
    return _section("Time", "".join(rows), "mmkv-time")


def status_html(text: str, error: bool = False) -> str:
    import html

    cls = "mmkv-error" if error else "mmkv-ok"
    icon = "⚠ Error: " if error else ""
    return f'<div class="{cls}" role="{"alert" if error else "status"}">{icon}{html.escape(text)}</div>'


def stats_rows(stats) -> list[list[str]]:
    """The full stats table as [name, value] rows."""
    rows = []
    for line in stats.table().splitlines():
        parts = line.split("  ", 1)
        rows.append([parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""])
    return rows


__all__ = ["Demo", "DemoConfig", "UploadDir", "UploadInfo", "check_upload", "recipe_choices", "stage_rows",
           "preset_rows", "thumbnails", "overlay", "tokens_html", "memory_html", "layers_html", "timing_html",
           "status_html", "stats_rows", "parse_size", "user_message", "SAMPLE_VIDEO"]
