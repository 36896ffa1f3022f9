"""Uploads: the checks a file passes before any model work (`check_upload`), the one folder
uploads are written to (`UploadDir`, with its clean-up), and the one-line messages users see."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from ..errors import InputError, MmkvError
from .config import DemoConfig, human_bytes, human_seconds


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
    return _container(path)[1]


def _container(path: str) -> tuple[str, str]:
    """(demuxer name, video codec name) from PyAV's reading of the header; ("", "") if unreadable."""
    try:
        import av

        with av.open(path) as c:
            return c.format.name, (c.streams.video[0].codec_context.name if c.streams.video else "")
    except Exception:  # noqa: BLE001 - informative only
        return "", ""


# leading bytes of still-image formats (decoders read any of them as a 1-frame "video")
_IMAGE_MAGIC = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"qoif", "QOI")]
_IMAGE_BRANDS = {b"avif": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF"}  # ISO-BMFF stills
# PyAV's demuxers of single images (their names end in "_pipe": png_pipe, jpeg_pipe, webp_pipe, ...)
_IMAGE_DEMUXERS = {"image2": "image", "gif": "GIF", "apng": "PNG"}


def image_format(path: str) -> str | None:
    """The image format of `path` judged by its content, not its name ("PNG", "JPEG", ...), or None
    for anything else. Reads the first bytes, then (for formats without a clear signature) asks
    PyAV which demuxer opens the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    for magic, fmt in _IMAGE_MAGIC:
        if head.startswith(magic) and (fmt != "BMP" or len(head) >= 14):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS:
        return _IMAGE_BRANDS[head[8:12]]
    demuxer = _container(path)[0].split(",")[0]
    if demuxer.endswith("_pipe"):
        return demuxer[: -len("_pipe")].upper()
    return _IMAGE_DEMUXERS.get(demuxer)


def check_upload(path: str | None, config: DemoConfig, name: str | None = None) -> UploadInfo:
    """Check an uploaded file before any model work: it exists, is within the size limit, is a video
    by its content (an image renamed .mp4 is refused), has at least one frame, and is not longer
    than `max_duration`. Raises InputError naming the problem (with the file's own name, not its
    server path)."""
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
    fmt = image_format(path)
    if fmt is not None:
        article = "an" if fmt[0] in "AEFHILMNORSX" else "a"
        raise InputError(f"{name!r} is {article} {fmt} image, not a video (whatever its name says); this demo "
                         "takes a video file (mp4, webm, mkv, avi, mov)")
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
    """The one folder uploads are written to, and its clean-up.

    Gradio writes every upload (from the page, or posted straight to its upload endpoint) into a
    folder of its own here, named by the file's hash. A file is *claimed* while a session uses it
    as its video, i.e. after it passed `check_upload`. `sweep` deletes files older than the age
    limit, and unclaimed files (never checked, or given up by every session) sooner; folders the
    demo writes itself (`own`: the sample copy, thumbnails) are swept by age only. `remove` (on
    close and at interpreter exit) deletes the folder."""

    def __init__(self, path: str | None = None):
        import atexit
        import threading

        self.owned = path is None
        self.path = os.path.realpath(tempfile.mkdtemp(prefix="mmkv-demo-") if path is None else path)
        os.makedirs(self.path, exist_ok=True)
        self._claims: dict[str, set[str]] = {}   # real path -> ids of the sessions using it
        self._lock = threading.Lock()
        atexit.register(self.remove)  # also when the process ends without close() (an exception, SIGTERM)

    OWN = ("mmkv-sample", "mmkv-thumbs")  # the demo's own subfolders (Gradio's are 64-hex hashes)

    def own(self, name: str, *parts: str) -> str:
        """A path inside one of the demo's own subfolders, e.g. own("mmkv-thumbs", session_id)."""
        if name not in self.OWN:
            raise ValueError(f"{name!r} is not one of the demo's own folders {self.OWN}")
        return os.path.join(self.path, name, *parts)

    def contains(self, path: str) -> bool:
        p = os.path.realpath(path)
        return os.path.commonpath([p, self.path]) == self.path

    # ---- claims
    def claim(self, path: str, owner: str) -> None:
        """`owner` (a session id) uses `path`: it is swept by age only."""
        with self._lock:
            self._claims.setdefault(os.path.realpath(path), set()).add(owner)

    def release(self, owner: str) -> None:
        """`owner` uses none of its files any more."""
        with self._lock:
            for p in [p for p, owners in self._claims.items() if owners.discard(owner) or not owners]:
                del self._claims[p]

    def claimed(self, path: str) -> bool:
        with self._lock:
            return bool(self._claims.get(os.path.realpath(path)))

    def _is_own(self, path: str) -> bool:
        rel = os.path.relpath(os.path.realpath(path), self.path)
        return rel.split(os.sep, 1)[0] in self.OWN

    # ---- deletion
    def discard(self, path: str) -> None:
        """Delete one upload (and its folder when that becomes empty), unless a session uses it."""
        if not self.contains(path):
            raise ValueError(f"{path!r} is not inside the upload folder {self.path!r}")
        if self.claimed(path):
            return
        try:
            os.remove(path)
            parent = os.path.dirname(os.path.realpath(path))
            if parent != self.path:
                os.rmdir(parent)  # only succeeds when empty
        except OSError:
            pass

    def sweep(self, max_age: float, unclaimed_age: float | None = None) -> int:
        """Delete files older than `max_age` seconds, and files outside the demo's own folders that
        no session claims once older than `unclaimed_age`; then empty folders. Returns how many
        files were deleted."""
        now, n = time.time(), 0
        for root, dirs, files in os.walk(self.path, topdown=False):
            for f in files:
                p = os.path.join(root, f)
                try:
                    age = now - os.path.getmtime(p)
                    if age > max_age or (unclaimed_age is not None and age > unclaimed_age
                                         and not self._is_own(p) and not self.claimed(p)):
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


class Sweeper:
    """A daemon thread sweeping an UploadDir (`UploadDir.sweep(ttl, unclaimed_ttl)`) every quarter
    of the shorter of the two ages (at least every second, at most every 10 minutes)."""

    def __init__(self, uploads: UploadDir, ttl: float, unclaimed_ttl: float | None = None):
        import threading

        self.uploads, self.ttl, self.unclaimed_ttl = uploads, ttl, unclaimed_ttl
        self.every = min(600.0, max(1.0, min(ttl, unclaimed_ttl or ttl) / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mmkv-demo-sweeper")

    def start(self):
        self._thread.start()
        return self

    def sweep(self) -> int:
        n = self.uploads.sweep(self.ttl, self.unclaimed_ttl)
        if n:
            import logging

            logging.getLogger("mmkv.demo").info("deleted %d old or unchecked upload(s)", n)
        return n

    def _run(self):
        while not self._stop.wait(self.every):
            self.sweep()

    def stop(self):
        self._stop.set()
