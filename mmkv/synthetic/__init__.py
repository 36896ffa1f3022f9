"""Synthetic long-video QA: "needle" events hidden in videos with distractor motion.

Each video has a noisy gray background, gray distractor squares that wander the whole time, and
one or more needles: a saturated coloured shape (red, green, blue or yellow; circle, square,
triangle or cross) visible for 6 frames at a random time and in one of the four 28 px cells of
the frame (aligned with the vision tokens, see _place_needles). Questions can only be
answered by finding the needles: what colour, what shape, which colour came first, how many.
Everything is a function of the seed, so a (seed, length) pair is a reproducible example.

    from mmkv.synthetic import make_example, write_dataset
    ex = make_example(seed=3, num_frames=256)            # frames [256, 56, 56, 3], question, answer
    write_dataset("data/needle256", n=100, num_frames=256, seed=10_000)   # mp4s + Video-MME rows

`write_dataset` writes `<id>.mp4` files and `videomme.json`: rows in the Video-MME layout
(videoID, question_id, duration, domain, sub_category, task_type, question, options
["A. ...", ...], answer), so the batch evaluator runs on it unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

COLORS = {"red": (225, 35, 35), "green": (35, 200, 60), "blue": (45, 80, 235), "yellow": (235, 215, 35)}
SHAPES = ("circle", "square", "triangle", "cross")
TASKS = ("color", "shape", "order", "count")
LETTERS = "ABCD"
FPS = 2.0
SIZE = 56  # frames are SIZE x SIZE: 4x4 patches of 14 px, 2x2 = 4 Qwen tokens per 2 frames
CELL = 28           # a Qwen vision token covers 28 x 28 px (2 x 2 patches of 14) and 2 frames
NEEDLE_FRAMES = 6   # a needle is visible for 6 frames (3 s at 2 fps): 3 tokens of one cell
GAP = 2             # frames between two needles, at least

QUESTIONS = {
    "color": "What color is the shape that appears in the video?",
    "shape": "What shape appears in the video?",
    "order": "Which color appears first in the video?",
    "count": "How many colored shapes appear in the video?",
}


@dataclass
class Needle:
    start: int      # first frame
    length: int     # frames visible
    color: str
    shape: str
    x: int          # centre
    y: int
    size: int       # half-size in pixels


@dataclass
class Example:
    """One synthetic video with its question. `answer` is the correct letter."""

    seed: int
    num_frames: int
    task: str
    question: str
    options: list[str]          # ["A. red", ...]
    answer: str                 # "A".."D"
    needles: list[Needle] = field(default_factory=list)
    frames: np.ndarray | None = field(default=None, repr=False)  # [T, H, W, 3] uint8

    @property
    def prompt(self) -> str:
        """The Video-MME prompt (lmms-eval's format) of this example's question and options."""
        from ..evaluation.prompts import videomme_prompt
        return videomme_prompt(self.question, self.options)

    def row(self, video_id: str) -> dict:
        return {"videoID": video_id, "question_id": f"{video_id}-1", "duration": "short", "domain": "Synthetic",
                "sub_category": "Needle", "task_type": self.task, "question": self.question,
                "options": list(self.options), "answer": self.answer, "num_frames": self.num_frames,
                "seed": self.seed, "needles": [asdict(n) for n in self.needles]}


def _draw_shape(img: np.ndarray, shape: str, x: int, y: int, r: int, color) -> None:
    import cv2

    c = tuple(int(v) for v in color)
    if shape == "circle":
        cv2.circle(img, (x, y), r, c, -1, lineType=cv2.LINE_8)
    elif shape == "square":
        cv2.rectangle(img, (x - r, y - r), (x + r, y + r), c, -1)
    elif shape == "triangle":
        pts = np.array([[x, y - r], [x - r, y + r], [x + r, y + r]], np.int32)
        cv2.fillPoly(img, [pts], c)
    elif shape == "cross":
        w = max(1, r // 3)
        cv2.rectangle(img, (x - r, y - w), (x + r, y + w), c, -1)
        cv2.rectangle(img, (x - w, y - r), (x + w, y + r), c, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place_needles(rng: np.random.Generator, num_frames: int, k: int, colors: list[str]) -> list[Needle]:
    """k needles of NEEDLE_FRAMES frames each, at least GAP frames apart, placed uniformly over
    the whole video. Needles are aligned to the vision tokens of Qwen-style models (2 frames x
    28 x 28 px): each starts on an even frame and sits inside one 28 px cell, so every needle
    covers exactly 3 tokens and "how many" has a consistent visual signature."""
    length, gap = NEEDLE_FRAMES, GAP
    free = (num_frames // 2) * 2 - k * length - (k - 1) * gap  # even frames not taken by needles or gaps
    if free < 0:
        raise ValueError(f"{k} needles do not fit in {num_frames} frames")
    offsets = np.sort(rng.integers(0, free // 2 + 1, k)) * 2
    cells = SIZE // CELL
    needles = []
    for i, (off, c) in enumerate(zip(offsets, colors)):
        r = int(rng.integers(7, 11))
        cx, cy = (rng.integers(0, cells, 2) * CELL + CELL // 2 + rng.integers(-2, 3, 2)).tolist()
        needles.append(Needle(start=int(off) + i * (length + gap), length=length, color=c,
                              shape=str(rng.choice(SHAPES)), x=int(cx), y=int(cy), size=r))
    return needles


def render(num_frames: int, needles: list[Needle], rng: np.random.Generator, size: int = SIZE,
           palette: dict | None = None) -> np.ndarray:
    """Frames [T, size, size, 3] uint8: noisy gray background, wandering gray distractor squares,
    and the needles (saturated shapes, visible for their frames only; colours from `palette`,
    default COLORS)."""
    palette = COLORS if palette is None else palette
    bg = int(rng.integers(50, 100))
    bank = np.clip(rng.normal(bg, 4.0, (16, size, size)), 0, 255).astype(np.uint8)  # noise frames
    gray = bank[rng.integers(0, len(bank), num_frames)]                             # [T, H, W]
    n_d = int(rng.integers(2, 5))
    half = max(2, size // 28)                    # distractor squares of 2 * half px
    pos = rng.uniform(half + 1, size - half - 1, (n_d, 2))
    vel = rng.normal(0, size / 56, (n_d, 2))
    shade = rng.integers(140, 230, n_d).astype(np.uint8)
    kicks = rng.normal(0, 0.3 * size / 56, (num_frames, n_d, 2))
    vmax = 1.5 * size / 56
    for t in range(num_frames):
        vel = np.clip(vel + kicks[t], -vmax, vmax)
        pos = pos + vel
        out = (pos < half + 1) | (pos > size - half - 2)  # bounce off the borders
        vel[out] *= -1
        pos = np.clip(pos, half + 1, size - half - 2)
        for j in range(n_d):
            x, y = int(pos[j, 0]), int(pos[j, 1])
            gray[t, y - half:y + half, x - half:x + half] = shade[j]
    frames = np.repeat(gray[..., None], 3, axis=3)
    for n in needles:
        for t in range(n.start, min(num_frames, n.start + n.length)):
            _draw_shape(frames[t], n.shape, n.x, n.y, n.size, palette[n.color])
    return frames


def make_example(seed: int, num_frames: int = 256, task: str | None = None, render_frames: bool = True,
                 shuffle: bool = False) -> Example:
    """The example of `seed` (deterministic). `task` forces a question type.

    The options are listed in a fixed order (colours as in COLORS, shapes as in SHAPES, counts
    1-4), so each letter names one content: the benchmark measures whether a model finds the
    needles, not whether it can match option text to a letter (a skill the bundled 1M-parameter
    model does not learn in a CPU-sized training run). `shuffle=True` permutes them."""
    if num_frames < 32:
        raise ValueError(f"num_frames must be at least 32, got {num_frames}")
    rng = np.random.default_rng(seed)
    task = task or TASKS[int(rng.integers(len(TASKS)))]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    names = list(COLORS)
    if task in ("color", "shape"):
        needles = _place_needles(rng, num_frames, 1, [str(rng.choice(names))])
        truth = needles[0].color if task == "color" else needles[0].shape
        choices = names if task == "color" else list(SHAPES)
    elif task == "order":
        cols = [str(c) for c in rng.choice(names, 2, replace=False)]
        needles = _place_needles(rng, num_frames, 2, cols)
        truth = min(needles, key=lambda n: n.start).color
        choices = names
    else:
        k = int(rng.integers(1, 5))
        needles = _place_needles(rng, num_frames, k, [str(c) for c in rng.choice(names, k)])
        truth = str(k)
        choices = ["1", "2", "3", "4"]
    order = [str(c) for c in rng.permutation(choices)] if shuffle else list(choices)
    options = [f"{LETTERS[i]}. {c}" for i, c in enumerate(order)]
    answer = LETTERS[order.index(truth)]
    frames = render(num_frames, needles, rng) if render_frames else None
    return Example(seed, num_frames, task, QUESTIONS[task], options, answer, needles, frames)


def write_video(path: str, frames: np.ndarray, fps: float = FPS, codec: str = "mp4v") -> None:
    """Write frames [T, H, W, 3] RGB uint8 to an mp4: codec "mp4v" (OpenCV, MPEG-4 part 2; the
    held-out sets) or "h264" (PyAV / libx264, yuv420p, crf 12, faststart: plays in browsers)."""
    h, w = frames.shape[1:3]
    if codec == "h264":
        from fractions import Fraction

        import av

        with av.open(path, "w", options={"movflags": "+faststart"}) as out:
            st = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000),
                                options={"crf": "12", "preset": "veryslow"})
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            for f in frames:
                for packet in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    out.mux(packet)
            for packet in st.encode():
                out.mux(packet)
        return
    if codec != "mp4v":
        raise ValueError(f"codec must be 'mp4v' or 'h264', got {codec!r}")
    import cv2

    vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not vw.isOpened():
        raise RuntimeError(f"cannot open a video writer for {path!r}")
    for f in frames:
        vw.write(np.ascontiguousarray(f[:, :, ::-1]))
    vw.release()


def write_dataset(out_dir: str, n: int, num_frames: int = 256, seed: int = 0, tasks: tuple[str, ...] = TASKS,
                  fps: float = FPS) -> str:
    """Write `n` examples (seeds seed..seed+n-1, tasks round-robin) as mp4s plus `videomme.json`.
    Returns the path of the question file."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(n):
        ex = make_example(seed + i, num_frames, task=tasks[i % len(tasks)])
        vid = f"needle_{num_frames}_{seed + i}"
        write_video(os.path.join(out_dir, f"{vid}.mp4"), ex.frames, fps)
        rows.append(ex.row(vid))
    path = os.path.join(out_dir, "videomme.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmkv.synthetic", description="Write a synthetic needle-video set: "
                                "the quick multiple-choice task (needle, 56 px) or the long task (112 px, three "
                                "open questions per video, mmkv.synthetic.long).")
    p.add_argument("out_dir")
    p.add_argument("--task", choices=["needle", "long"], default="needle")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--frames", type=int, default=None, help="frames per video (default 256; long: 1024)")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--tasks", default=",".join(TASKS), help="needle task only: question types, round-robin")
    a = p.parse_args(argv)
    if a.task == "long":
        from .long import write_long_dataset

        path = write_long_dataset(a.out_dir, a.n, a.frames or 1024, a.seed)
    else:
        path = write_dataset(a.out_dir, a.n, a.frames or 256, a.seed, tuple(a.tasks.split(",")))
    print(f"wrote {a.n} videos and {path}")
    return 0
