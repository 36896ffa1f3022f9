"""Video-MME subtitles: parse an .srt and keep the lines shown at the sampled frames, as lmms-eval
does for `videomme_w_subtitle` (re-implemented from its behaviour, lmms-eval v0.7.2).

lmms-eval's steps: split the file on blank lines; a block with at least 3 lines gives a time range
(line 2, "HH:MM:SS,mmm --> HH:MM:SS,mmm") and a text (the remaining lines joined by spaces);
times become frame numbers `int(seconds * fps)` with the fps and frame count OpenCV reports; it
samples `frame_num` frames with `linspace(0, total - 1, frame_num, dtype=int)` (floor; 32 by
default) and keeps every block whose frame span [start, end) contains a sampled frame; the text
of a kept block is the first `<font color="white" size=".72c">...</font>` match in it (blocks
without one are dropped). Kept lines are joined with newlines.

Deviations (none changes the prompt on the official Video-MME files as far as we know):
- kept blocks come in time order; lmms-eval iterates a Python `set` of block indices, whose order
  is ascending for small indices but can scramble for large ones;
- Windows line endings are normalized before splitting, and malformed blocks are skipped
  (lmms-eval would keep one giant block, or raise);
- a file with no `<font ...>` tag at all (a plain .srt, not Video-MME's) keeps the plain text of
  every block instead of dropping all of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')
_TIME = re.compile(r"^\s*(\d+):(\d+):(\d+)[,.](\d+)\s*$")
_TAG = re.compile(r"<[^>]+>")


@dataclass
class Cue:
    start: float  # seconds
    end: float
    text: str     # the block's text lines joined by spaces (raw, tags included)


def _seconds(ts: str) -> float:
    m = _TIME.match(ts)
    if not m:
        raise ValueError(f"bad SRT time {ts!r}")
    h, mi, s, ms = (int(g) for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_srt(text: str) -> list[Cue]:
    """Cues of an .srt file's text, in file order (a repeated time range keeps its first
    position and its last text, as a dict keyed by the range does)."""
    cues: dict[tuple[float, float], Cue] = {}
    for block in text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        if len(lines) < 3 or " --> " not in lines[1]:
            continue
        a, b = lines[1].split(" --> ", 1)
        try:
            start, end = _seconds(a), _seconds(b)
        except ValueError:
            continue
        key = (start, end)
        if key in cues:
            cues[key].text = " ".join(lines[2:])
        else:
            cues[key] = Cue(start, end, " ".join(lines[2:]))
    return list(cues.values())


def select_subtitles(cues: list[Cue], total_frames: int, fps: float, frame_num: int) -> str:
    """The subtitle text lmms-eval puts in the prompt when `frame_num` frames are sampled
    uniformly from a video of `total_frames` frames at `fps`."""
    if not cues:
        return ""
    if frame_num == -1:
        frame_num = total_frames
    sampled = np.linspace(0, total_frames - 1, frame_num, dtype=int)  # floor, as lmms-eval
    tagged = any(FONT.search(c.text) for c in cues)
    lines = []
    for c in cues:
        s, e = int(c.start * fps), int(c.end * fps)
        if not np.any((sampled >= s) & (sampled < e)):
            continue
        if tagged:
            m = FONT.search(c.text)
            if m:
                lines.append(m.group(1))
        else:
            lines.append(_TAG.sub("", c.text).strip())
    return "\n".join(lines)


def video_frame_info(path: str, fallback: tuple[int, float] | None = None) -> tuple[int, float]:
    """(frame count, fps) as OpenCV reports them (what lmms-eval uses), else `fallback`."""
    try:
        import cv2

        cap = cv2.VideoCapture(path)
        try:
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        finally:
            cap.release()
        if total > 0 and fps > 0:
            return total, fps
    except Exception:  # noqa: BLE001 - OpenCV missing or unable to open: use the decoder's figures
        pass
    if fallback is None:
        raise ValueError(f"cannot read the frame count and fps of {path!r}")
    return fallback


def subtitles_for(srt_path: str | None, video_path: str, frame_num: int,
                  fallback: tuple[int, float] | None = None) -> str | None:
    """The subtitle text for the prompt: None when there is no .srt file (the prompt then says
    "No subtitles available"), else the lines at the `frame_num` uniformly sampled frames."""
    if srt_path is None:
        return None
    with open(srt_path, encoding="utf-8", errors="replace") as f:
        cues = parse_srt(f.read())
    total, fps = video_frame_info(video_path, fallback)
    return select_subtitles(cues, total, fps, frame_num)
