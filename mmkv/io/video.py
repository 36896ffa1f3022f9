"""Video and image loading: decord first, PyAV as fallback, frames streamed in chunks.

A `Media` is a lazy handle: opening it reads only the container header; frames are decoded
chunk by chunk by `Media.chunks()`, so an hour-long video never sits decoded in memory.
Sampling picks frame indices up front (uniform by count, or by fps, capped by `max_frames`) and
keeps each sampled frame's timestamp in seconds, which the model adapters turn into temporal
positions (Qwen2.5-VL's M-RoPE uses real seconds).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_FRAMES = 32


# ----------------------------------------------------------------------------- frame sources
class _Source:
    """Random access to the frames of one video. Subclasses: decord, PyAV, in-memory arrays."""

    num_frames: int
    fps: float
    backend: str

    def get(self, indices: np.ndarray) -> np.ndarray:  # -> [n, H, W, 3] uint8
        raise NotImplementedError


class _quiet_stderr:
    """Silence what C libraries (ffmpeg inside decord) print on fd 2 while opening a file."""

    def __enter__(self):
        try:
            self._saved = os.dup(2)
            self._null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self._null, 2)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            os.close(self._null)


class _DecordSource(_Source):
    backend = "decord"

    def __init__(self, path: str):
        import decord

        with _quiet_stderr():
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps() or 0.0)

    def get(self, indices):
        return self._vr.get_batch(list(map(int, indices))).asnumpy()


class _PyAVSource(_Source):
    """Sequential decoding with PyAV; seeks forward to the keyframe before a distant target."""

    backend = "pyav"

    def __init__(self, path: str):
        import av

        self._path = path
        with av.open(path) as c:
            if not c.streams.video:
                raise InputError(f"{path!r} has no video stream")
            s = c.streams.video[0]
            self.fps = float(s.average_rate or s.guessed_rate or 0.0)
            n = s.frames
            if not n and s.duration is not None and s.time_base is not None and self.fps:
                n = int(round(float(s.duration * s.time_base) * self.fps))
            if not n:  # container does not say: count by demuxing (no decoding)
                n = sum(1 for p in c.demux(s) if p.size)
        self.num_frames = int(n)

    def get(self, indices):
        import av

        want = sorted(set(int(i) for i in indices))
        out: dict[int, np.ndarray] = {}
        with av.open(self._path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for i, frame in enumerate(c.decode(s)):
                if i in out or i not in want:
                    if i > want[-1]:
                        break
                    continue
                out[i] = frame.to_ndarray(format="rgb24")
                if len(out) == len(want):
                    break
        if not out:
            raise InputError(f"{self._path!r}: no frame could be decoded")
        last = out[max(out)]  # containers that over-report their frame count: repeat the last frame
        return np.stack([out.get(int(i), last) for i in indices])


class _ArraySource(_Source):
    backend = "memory"

    def __init__(self, frames: np.ndarray, fps: float):
        self._frames = frames
        self.num_frames = len(frames)
        self.fps = fps

    def get(self, indices):
        return self._frames[np.asarray(indices, dtype=np.int64)]


def _open_file(path: str) -> _Source:
    errors = []
    for cls in (_DecordSource, _PyAVSource):
        try:
            src = cls(path)
        except ImportError as e:
            errors.append(f"{cls.backend}: not installed ({e})")
            continue
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - each backend raises its own error types
            errors.append(f"{cls.backend}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            continue
        if src.num_frames <= 0:
            raise InputError(f"{path!r} contains zero video frames")
        return src
    raise InputError(f"{path!r} is not a readable video ({'; '.join(errors)})")


# ----------------------------------------------------------------------------- sampling
def sample_indices(
    num_frames: int,
    video_fps: float,
    *,
    frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Frame indices to decode.

    - `frames=N`: N indices spread uniformly over the whole video, first and last frame included
      (`linspace(0, num_frames - 1, N)`, the lmms-eval convention).
    - `fps=F`: one frame every 1/F seconds starting at t=0.
    - neither: `DEFAULT_FRAMES` (32) uniform frames.
    `max_frames` caps the result; when fps sampling gives more, they are thinned uniformly.
    Never returns more indices than the video has frames.
    """
    if num_frames <= 0:
        raise InputError("the video has zero frames")
    if frames is not None and fps is not None:
        raise InputError("give either frames= or fps=, not both")
    if frames is not None and frames <= 0:
        raise InputError(f"frames must be a positive integer, got {frames}")
    if fps is not None and not fps > 0:
        raise InputError(f"fps must be positive, got {fps}")
    if max_frames is not None and max_frames <= 0:
        raise InputError(f"max_frames must be a positive integer, got {max_frames}")
    if fps is not None:
        if not video_fps > 0:
            raise InputError("fps sampling needs the video's frame rate, which is unknown; use frames= instead")
        duration = num_frames / video_fps
        n = max(1, int(math.floor(duration * fps + 1e-9)))
        idx = np.minimum(np.round(np.arange(n) * video_fps / fps), num_frames - 1).astype(np.int64)
    else:
        n = min(frames or DEFAULT_FRAMES, num_frames)
        idx = np.round(np.linspace(0, num_frames - 1, n)).astype(np.int64)
    if max_frames is not None and len(idx) > max_frames:
        idx = idx[np.round(np.linspace(0, len(idx) - 1, max_frames)).astype(np.int64)]
    return idx


# ----------------------------------------------------------------------------- media
@dataclass
class Media:
    """A video (or a single image) with the frame indices chosen for the model.

    `timestamps[i]` is the time in seconds of `indices[i]`. `kind` is "video" or "image".
    `source_fps` and `total_frames` describe the whole video; `sampled_fps` is the rate of the
    sampled frames (what Qwen2.5-VL needs for `second_per_grid_ts`).
    """

    kind: str
    indices: np.ndarray
    timestamps: np.ndarray
    source_fps: float
    total_frames: int
    name: str = "<frames>"
    backend: str = "memory"
    _src: _Source | None = field(default=None, repr=False)
    _image: object = field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    @property
    def duration(self) -> float:
        return self.total_frames / self.source_fps if self.source_fps else float("nan")

    @property
    def sampled_fps(self) -> float:
        # same definition as transformers' VideoMetadata.sampled_fps
        return len(self.indices) / self.total_frames * self.source_fps

    def image(self):
        """The single image (PIL) of an image input."""
        if self.kind != "image":
            raise InputError("this input is a video, not an image")
        return self._image

    def chunks(self, chunk_frames: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (frames [n, H, W, 3] uint8, timestamps [n]) in order, `chunk_frames` at a time."""
        if chunk_frames <= 0:
            raise InputError(f"chunk_frames must be positive, got {chunk_frames}")
        if self.kind == "image":
            yield np.asarray(self._image.convert("RGB"))[None], self.timestamps
            return
        for s in range(0, len(self.indices), chunk_frames):
            idx = self.indices[s:s + chunk_frames]
            frames = self._src.get(idx)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise InputError(f"{self.name}: decoded frames have shape {frames.shape}, expected [n, H, W, 3]")
            yield np.ascontiguousarray(frames), self.timestamps[s:s + chunk_frames]

    def frames(self) -> np.ndarray:
        """All sampled frames at once (small inputs and tests only)."""
        return np.concatenate([f for f, _ in self.chunks(max(1, self.num_frames))])


def _as_frames(video) -> np.ndarray | None:
    """List of PIL images / arrays or a 4-D array -> [T, H, W, 3] uint8, else None."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if isinstance(video, np.ndarray) or type(video).__module__.startswith("torch"):
        arr = np.asarray(video.cpu() if hasattr(video, "cpu") else video)
        if arr.ndim != 4:
            return None
        if arr.shape[-1] != 3 and arr.shape[1] == 3:  # [T, 3, H, W] -> [T, H, W, 3]
            arr = arr.transpose(0, 2, 3, 1)
        return arr
    if isinstance(video, (list, tuple)):
        if len(video) == 0:
            raise InputError("the list of frames is empty (zero frames)")
        out = []
        for i, f in enumerate(video):
            if Image is not None and isinstance(f, Image.Image):
                out.append(np.asarray(f.convert("RGB")))
            elif isinstance(f, np.ndarray) and f.ndim == 3:
                out.append(f)
            else:
                raise InputError(f"frame {i} of the list is a {type(f).__name__}; expected a PIL image or an [H, W, 3] array")
        shapes = {f.shape for f in out}
        if len(shapes) != 1:
            raise InputError(f"all frames must have the same size, got {sorted(shapes)}")
        return np.stack(out)
    return None


def _check_frames(arr: np.ndarray) -> np.ndarray:
    if arr.shape[0] == 0:
        raise InputError("zero frames were given")
    if arr.shape[-1] != 3:
        raise InputError(f"frames must be RGB with shape [T, H, W, 3], got {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def load_media(
    source,
    *,
    frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    video_fps: float | None = None,
) -> Media:
    """Open a video file, an image file, a PIL image, an [H, W, 3] array, a list of frames or a
    [T, H, W, 3] array, and choose the frames to use. Nothing is decoded yet except a single image.

    `video_fps` is the frame rate of in-memory frames (default 1.0: one frame per second, the usual
    rate of pre-sampled frames); files carry their own.
    Raises `InputError` naming the problem for a missing, unreadable or empty input.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise InputError(f"no such file: {path!r}")
        if os.path.isdir(path):
            raise InputError(f"{path!r} is a directory, not a video or image file")
        if os.path.getsize(path) == 0:
            raise InputError(f"{path!r} is empty (0 bytes)")
        if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            try:
                img = Image.open(path)
                img.load()
            except (UnidentifiedImageError, OSError) as e:
                raise InputError(f"{path!r} is not a readable image: {e}") from None
            return _image_media(img, name=path)
        src = _open_file(path)
        idx = sample_indices(src.num_frames, src.fps, frames=frames, fps=fps, max_frames=max_frames)
        ts = idx / src.fps if src.fps > 0 else idx.astype(np.float64)
        return Media("video", idx, ts.astype(np.float64), src.fps, src.num_frames, path, src.backend, src)
    if isinstance(source, Image.Image):
        return _image_media(source)
    if isinstance(source, np.ndarray) and source.ndim == 3:
        return _image_media(Image.fromarray(_check_frames(source[None])[0]))
    arr = _as_frames(source)
    if arr is None:
        raise InputError(
            f"cannot read a video from a {type(source).__name__}: give a file path, a PIL image, "
            "a list of PIL images or [H, W, 3] arrays, or a [T, H, W, 3] array"
        )
    arr = _check_frames(arr)
    vfps = 1.0 if video_fps is None else float(video_fps)
    if not vfps > 0:
        raise InputError(f"video_fps must be positive, got {video_fps}")
    src = _ArraySource(arr, vfps)
    idx = sample_indices(len(arr), vfps, frames=frames, fps=fps, max_frames=max_frames) if (frames or fps or max_frames) \
        else np.arange(len(arr))
    return Media("video", idx, idx / vfps, vfps, len(arr), "<frames>", "memory", src)


def _image_media(img, name: str = "<image>") -> Media:
    img = img.convert("RGB")
    if img.width < 1 or img.height < 1:
        raise InputError(f"{name}: the image is empty")
    return Media("image", np.zeros(1, np.int64), np.zeros(1), 1.0, 1, name, "pil", None, img)


def probe(path: str) -> dict:
    """Container facts of a video file (frames, fps, duration, backend) without decoding frames."""
    src = _open_file(os.fspath(path))
    return {"frames": src.num_frames, "fps": src.fps, "duration": src.num_frames / src.fps if src.fps else None,
            "backend": src.backend}


__all__: Sequence[str] = ["Media", "load_media", "sample_indices", "probe", "DEFAULT_FRAMES"]
