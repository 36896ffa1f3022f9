"""Synthetic long-video QA: "needle" events hidden in videos with distractor motion.

Each video has a noisy gray background, gray distractor squares that wander the whole time, and
one or more needles: a saturated coloured shape (red, green, blue or yellow; circle, square,
triangle or cross) visible for a few frames at a random time and place. Questions can only be
answered by finding the needles: what colour, what shape, which colour came first, how many.
Everything is a function of the seed, so a (seed, length) pair is a reproducible example.

    from mmkv.synthetic import make_example, write_dataset
    ex = make_example(seed=3, num_frames=256)            # frames [256, 112, 112, 3], question, answer
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
SIZE = 112

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
        from .evaluation.prompts import videomme_prompt
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
        w = max(2, r // 3)
        cv2.rectangle(img, (x - r, y - w), (x + r, y + w), c, -1)
        cv2.rectangle(img, (x - w, y - r), (x + w, y + r), c, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place_needles(rng: np.random.Generator, num_frames: int, k: int, colors: list[str]) -> list[Needle]:
    """k needles at non-overlapping times, spread over the whole video."""
    length = int(rng.integers(4, 9))
    starts: list[int] = []
    slots = np.arange(0, max(1, num_frames - length))
    for _ in range(k):
        free = [s for s in slots if all(abs(int(s) - t) > length + 2 for t in starts)]
        starts.append(int(rng.choice(free)))
    needles = []
    for s, c in zip(starts, colors):
        r = int(rng.integers(10, 15))
        needles.append(Needle(start=s, length=min(length, num_frames - s), color=c, shape=str(rng.choice(SHAPES)),
                              x=int(rng.integers(r + 2, SIZE - r - 2)), y=int(rng.integers(r + 2, SIZE - r - 2)),
                              size=r))
    return needles


def render(num_frames: int, needles: list[Needle], rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Frames [T, size, size, 3] uint8: background, distractors, needles."""
    bg = int(rng.integers(50, 100))
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    n_d = int(rng.integers(2, 5))
    pos = rng.uniform(8, size - 8, (n_d, 2))
    vel = rng.normal(0, 2.0, (n_d, 2))
    shade = rng.integers(140, 230, n_d)
    for t in range(num_frames):
        f = np.clip(rng.normal(bg, 4.0, (size, size, 1)), 0, 255).astype(np.uint8).repeat(3, axis=2)
        vel = np.clip(vel + rng.normal(0, 0.6, vel.shape), -3, 3)
        pos = pos + vel
        for j in range(n_d):  # bounce off the borders
            for a in range(2):
                if not 5 <= pos[j, a] <= size - 6:
                    vel[j, a] *= -1
                    pos[j, a] = np.clip(pos[j, a], 5, size - 6)
            x, y = int(pos[j, 0]), int(pos[j, 1])
            f[max(0, y - 4):y + 4, max(0, x - 4):x + 4] = shade[j]
        for n in needles:
            if n.start <= t < n.start + n.length:
                _draw_shape(f, n.shape, n.x, n.y, n.size, COLORS[n.color])
        frames[t] = f
    return frames


def make_example(seed: int, num_frames: int = 256, task: str | None = None, render_frames: bool = True) -> Example:
    """The example of `seed` (deterministic). `task` forces a question type."""
    if num_frames < 16:
        raise ValueError(f"num_frames must be at least 16, got {num_frames}")
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
    order = [str(c) for c in rng.permutation(choices)]
    options = [f"{LETTERS[i]}. {c}" for i, c in enumerate(order)]
    answer = LETTERS[order.index(truth)]
    frames = render(num_frames, needles, rng) if render_frames else None
    return Example(seed, num_frames, task, QUESTIONS[task], options, answer, needles, frames)


def write_video(path: str, frames: np.ndarray, fps: float = FPS) -> None:
    """Write frames [T, H, W, 3] RGB uint8 to an mp4 (OpenCV, mp4v)."""
    import cv2

    h, w = frames.shape[1:3]
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

    p = argparse.ArgumentParser(prog="python -m mmkv.synthetic", description="Write a synthetic needle-video set.")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--tasks", default=",".join(TASKS))
    a = p.parse_args(argv)
    path = write_dataset(a.out_dir, a.n, a.frames, a.seed, tuple(a.tasks.split(",")))
    print(f"wrote {a.n} videos and {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
