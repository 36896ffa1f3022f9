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
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError, MmkvWarning

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

    def times(self, indices: np.ndarray) -> np.ndarray:
        """Seconds of frames `indices` (by the frame rate; by index when the rate is unknown)."""
        idx = np.asarray(indices, dtype=np.float64)
        return idx / self.fps if self.fps > 0 else idx


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
    """decord (fast random access). It refuses some files only when decoding (tiny H.264 frames
    come back with the wrong shape or fail to copy, truncated payloads fail to read), so opening
    decodes the last frame once; any later failure hands over to PyAV (`_PyAVSource`)."""

    backend = "decord"

    def __init__(self, path: str):
        import decord

        self._path, self._fallback = path, None
        with _quiet_stderr():
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            self.num_frames = self.header_frames = len(self._vr)
            self.fps = float(self._vr.get_avg_fps() or 0.0)
            if self.num_frames > 0:
                self._checked(self._vr.get_batch([self.num_frames - 1]).asnumpy(), 1)

    @staticmethod
    def _checked(frames: np.ndarray, n: int) -> np.ndarray:
        if frames.ndim != 4 or frames.shape[0] != n or frames.shape[-1] != 3:
            raise RuntimeError(f"decoded frames have shape {tuple(frames.shape)}, expected [{n}, H, W, 3]")
        return frames

    def get(self, indices):
        if self._fallback is None:
            try:
                with _quiet_stderr():
                    return self._checked(self._vr.get_batch(list(map(int, indices))).asnumpy(), len(indices))
            except Exception as e:  # noqa: BLE001 - any decord failure: decode with PyAV instead
                reason = _reason(e)
                try:
                    fallback = _PyAVSource(self._path)
                except Exception as e2:  # noqa: BLE001
                    raise InputError(f"{self._path!r} cannot be decoded (decord: {reason}; pyav: {_reason(e2)})") \
                        from None
                if fallback.num_frames != self.num_frames:
                    raise InputError(f"{self._path!r} cannot be decoded (decord: {reason}; pyav: {fallback.num_frames} "
                                     f"of the {self.num_frames} frames decode)")
                self._fallback = fallback
        return self._fallback.get(indices)


def _reason(e: BaseException) -> str:
    """One line naming a backend's failure."""
    if isinstance(e, InputError):
        return str(e)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _PyAVSource(_Source):
    """Sequential decoding with PyAV. Packets that fail to decode are skipped, so a truncated or
    damaged file yields the frames that do decode. Opening checks that the last frame the header
    promises decodes (a seek to the end); when it does not, every frame is decoded once to list
    the ones that exist: `num_frames` counts them, `header_frames` keeps the promise, and
    `times()` gives their real timestamps (with B-frames, a cut loses frames in the middle too).
    Reading consecutive chunks continues one decoder instead of starting over."""

    backend = "pyav"

    def __init__(self, path: str):
        import av

        self._path, self._it, self._pos, self._c, self._times = path, None, 0, None, None
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
        self.num_frames = self.header_frames = int(n)
        if not self._tail_decodes():
            self._times = self._decodable_times()
            self.num_frames = len(self._times)
        if self.num_frames <= 0 < self.header_frames:
            raise InputError(f"no frame decodes (the header promises {self.header_frames})")

    def _tail_decodes(self) -> bool:
        """Whether the frame at index header_frames - 1 decodes (seek to its keyframe, decode on)."""
        import av

        n = self.header_frames
        if n <= 0 or not self.fps > 0:
            return False
        try:
            with av.open(self._path) as c:
                s = c.streams.video[0]
                start = s.start_time or 0
                c.seek(start + int((n - 1) / self.fps / s.time_base), stream=s, backward=True)
                last = -1
                for f in _decode(c, s):
                    if f.pts is not None:
                        last = max(last, int(round(float((f.pts - start) * s.time_base) * self.fps)))
                return last >= n - 1
        except Exception:  # noqa: BLE001 - a failed seek is settled by decoding everything
            return False

    def _decodable_times(self) -> np.ndarray:
        """Seconds of every frame that decodes, in order (frames without a timestamp: by the rate)."""
        import av

        with av.open(self._path) as c:
            s = c.streams.video[0]
            start, tb = s.start_time or 0, s.time_base
            out = []
            for i, f in enumerate(_decode(c, s)):
                out.append(float((f.pts - start) * tb) if f.pts is not None and tb is not None
                           else i / self.fps if self.fps > 0 else float(i))
        return np.asarray(out, dtype=np.float64)

    def times(self, indices: np.ndarray) -> np.ndarray:
        if self._times is not None:
            return self._times[np.asarray(indices, dtype=np.int64)]
        return super().times(indices)

    def _frames(self):
        import av

        self.close()
        self._c = av.open(self._path)
        self._it, self._pos = _decode(self._c, self._c.streams.video[0]), 0

    def close(self) -> None:
        if self._c is not None:
            self._c.close()
            self._c = self._it = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def get(self, indices):
        want = sorted(set(int(i) for i in indices))
        if self._it is None or want[0] < self._pos:
            self._frames()
        out: dict[int, np.ndarray] = {}
        for frame in self._it:
            i = self._pos
            self._pos += 1
            if i in want:
                out[i] = frame.to_ndarray(format="rgb24")
                if len(out) == len(want):
                    break
        missing = [i for i in want if i not in out]
        if missing:
            self.close()
            raise InputError(f"{self._path!r}: frames {missing[:5]}{'...' if len(missing) > 5 else ''} do not decode "
                             f"({self._pos} of {self.num_frames} frames decoded)")
        return np.stack([out[int(i)] for i in indices])


def _decode(container, stream):
    """Decoded frames of `stream` in presentation order; packets the decoder refuses are skipped.
    Slice threading only: frame threading drops the last frames of a damaged file, so the frames
    would differ from one pass to the next."""
    import av

    stream.thread_type = "SLICE"
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.FFmpegError:
            continue


class _ArraySource(_Source):
    backend = "memory"

    def __init__(self, frames: np.ndarray, fps: float):
        self._frames = frames
        self.num_frames = self.header_frames = len(frames)
        self.fps = fps

    def get(self, indices):
        return self._frames[np.asarray(indices, dtype=np.int64)]


_STILL_FORMATS = ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"]


def _still_image(path: str) -> str | None:
    """The format of a single-frame image file ("PNG", ...), whatever its name; else None."""
    from PIL import Image

    try:
        with Image.open(path, formats=_STILL_FORMATS) as im:
            return im.format if getattr(im, "n_frames", 1) == 1 else None
    except Exception:  # noqa: BLE001 - not an image PIL knows
        return None


def _open_file(path: str) -> _Source:
    """The first backend that opens `path` and decodes its frames; one InputError naming the file
    and every backend's reason when none does. An image file named like a video is refused."""
    fmt = _still_image(path)
    if fmt:
        ext = ".jpg" if fmt == "JPEG" else "." + fmt.lower()
        raise InputError(f"{path!r} is a {fmt} image, not a video; to use it as an image, give it its image "
                         f"extension ({ext})")
    errors = []
    for cls in (_DecordSource, _PyAVSource):
        try:
            src = cls(path)
        except ImportError as e:
            errors.append(f"{cls.backend}: not installed ({e})")
            continue
        except Exception as e:  # noqa: BLE001 - each backend raises its own error types
            errors.append(f"{cls.backend}: {_reason(e)}")
            continue
        if src.num_frames <= 0:
            errors.append(f"{cls.backend}: zero video frames")
            continue
        if src.num_frames < src.header_frames:
            warnings.warn(f"{path}: the header promises {src.header_frames} frames but only {src.num_frames} decode; "
                          f"sampling from those {src.num_frames}", MmkvWarning, stacklevel=3)
        return src
    if errors and all(e.endswith("zero video frames") for e in errors):
        raise InputError(f"{path!r} contains zero video frames")
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
    Never returns more indices than the video has frames: `fps` above the video's rate gives
    every frame once (no frame is repeated).
    """
    if num_frames <= 0:
        raise InputError("the video has zero frames")
    check_sampling(frames=frames, fps=fps, max_frames=max_frames)
    if fps is not None:
        if not video_fps > 0:
            raise InputError("fps sampling needs the video's frame rate, which is unknown; use frames= instead")
        if fps >= video_fps:  # at or above the video's rate: every frame, once (none is invented)
            idx = np.arange(num_frames, dtype=np.int64)
        else:
            n = max(1, int(math.floor(num_frames / video_fps * fps + 1e-9)))
            idx = np.minimum(np.round(np.arange(n) * video_fps / fps), num_frames - 1).astype(np.int64)
    else:
        n = min(frames or DEFAULT_FRAMES, num_frames)
        idx = np.round(np.linspace(0, num_frames - 1, n)).astype(np.int64)
    if max_frames is not None and len(idx) > max_frames:
        idx = idx[np.round(np.linspace(0, len(idx) - 1, max_frames)).astype(np.int64)]
    return idx


def check_sampling(*, frames=None, fps=None, max_frames=None, video_fps=None) -> None:
    """Raise InputError unless the sampling arguments make sense (None means not given)."""
    if frames is not None and fps is not None:
        raise InputError("give either frames= or fps=, not both")
    if frames is not None and not (_is_int(frames) and frames > 0):
        raise InputError(f"frames must be a positive integer, got {frames!r}")
    for name, v in (("fps", fps), ("video_fps", video_fps)):
        if v is not None and not (_is_real(v) and math.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a finite positive number, got {v!r}")
    if max_frames is not None and not (_is_int(max_frames) and max_frames > 0):
        raise InputError(f"max_frames must be a positive integer, got {max_frames!r}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- media
@dataclass
class Media:
    """A video (or a single image) with the frame indices chosen for the model.

    `timestamps[i]` is the time in seconds of `indices[i]`. `kind` is "video" or "image".
    `source_fps` and `total_frames` describe the whole video (`total_frames` counts the frames
    that decode; `header_frames` is what the container promises, more for a truncated file);
    `sampled_fps` is the rate of the sampled frames (what Qwen2.5-VL needs for
    `second_per_grid_ts`).
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
    header_frames: int | None = None

    @property
    def extra(self) -> dict:
        """Facts for `Stats.extra`: a truncated file's promised and decodable frame counts."""
        if self.header_frames is None or self.header_frames == self.total_frames:
            return {}
        return {"video_frames_in_header": self.header_frames, "video_frames_decodable": self.total_frames}

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
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(np.argmax(~np.isfinite(arr).reshape(len(arr), -1).all(1)))
            raise InputError(f"frame {bad} holds NaN or inf values; frames must be finite (uint8 0..255 or "
                             "float 0..1 / 0..255)")
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.max(arr)) <= 1.0:
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

    check_sampling(frames=frames, fps=fps, max_frames=max_frames, video_fps=video_fps)
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
        return Media("video", idx, src.times(idx), src.fps, src.num_frames, path, src.backend, src,
                     header_frames=src.header_frames)
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
    src = _ArraySource(arr, vfps)
    given = frames is not None or fps is not None or max_frames is not None
    idx = sample_indices(len(arr), vfps, frames=frames, fps=fps, max_frames=max_frames) if given \
        else np.arange(len(arr))
    return Media("video", idx, idx / vfps, vfps, len(arr), "<frames>", "memory", src)


def _image_media(img, name: str = "<image>") -> Media:
    img = img.convert("RGB")
    if img.width < 1 or img.height < 1:
        raise InputError(f"{name}: the image is empty")
    return Media("image", np.zeros(1, np.int64), np.zeros(1), 1.0, 1, name, "pil", None, img)


def probe(path: str) -> dict:
    """Facts of a video file: frames that decode, the frames its header promises, fps, duration
    and backend. Decodes only the last frame, unless that fails (then every frame, to count)."""
    src = _open_file(os.fspath(path))
    return {"frames": src.num_frames, "header_frames": src.header_frames, "fps": src.fps,
            "duration": src.num_frames / src.fps if src.fps else None, "backend": src.backend}


__all__: Sequence[str] = ["Media", "load_media", "sample_indices", "check_sampling", "probe", "DEFAULT_FRAMES"]
