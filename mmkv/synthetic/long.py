"""Task v2 ("long"): dense needle videos of 256 to 2,048+ frames, three open questions per video.

Each video is 112 x 112 px at 2 fps, so Qwen2-VL (14 px patches, 2 x 2 merge, 2 frames per
temporal patch) sees 16 visual tokens per frame pair: 2,048 at 256 frames, 8,192 at 1,024,
16,384 at 2,048. Over a noisy gray background with wandering gray squares (motion that means
nothing), a sequence of coloured shapes appears, one at a time, each for 2, 4 or 6 frames inside
one 28 px cell: 1 to 3 visual tokens each. Every object is a saturated colour AND a shape, and
the objects that answer a question share their colour or their shape with objects that do not:

- order:    the `A`s (1-3 objects of one shape, distinct colours) -> "In what order do the circles
            appear? Answer with their colors." -> "red, cyan, blue";
- count:    the `B`s (1-3 objects of another shape) -> "How many squares appear?" -> "2 squares";
- identify: the only object of colour `g` (a third or fourth shape) -> "What is the green
            object?" -> "green cross";
- distractors: objects of the third and fourth shapes in any colour but `g` (they share colours
  with the A and B needles and shapes with the identify needle). Their number grows with the
  video (one per 64 frames, at least 2, at most 32): the videos stay dense.

So neither colour, nor shape, nor motion alone finds the needles: a compression method must keep
what a question may ask about before it knows the question. The answers take several tokens
("red", ",", " cyan", ...), scored exactly, so in every protocol the answer's later tokens are
generated over the compressed cache. The three questions of a video are about different needles
and come in a random order; they are answerable one at a time or in one conversation (question 1,
its answer, question 2, ...), as Video-MME asks three questions per video.

Everything is a function of (seed, num_frames): the placement, the colours, the pixels.

    from mmkv.synthetic.long import make_long_example, write_long_dataset
    ex = make_long_example(seed=3, num_frames=1024)        # frames [1024, 112, 112, 3], 3 questions
    write_long_dataset("data/long1024", n=200, num_frames=1024, seed=1_000_000)
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from . import SHAPES, Needle, render, write_video

COLORS = {"red": (225, 35, 35), "green": (35, 200, 60), "blue": (45, 80, 235), "yellow": (235, 215, 35),
          "magenta": (220, 40, 210), "cyan": (30, 210, 220)}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
KINDS = ("order", "count", "identify")
SIZE = 112
CELL = 28                 # one Qwen visual token: 28 x 28 px (2 x 2 patches of 14) and 2 frames
FPS = 2.0
LENGTHS = (2, 4, 6)       # frames an object is visible: 1, 2 or 3 tokens of one cell
GAP = 2                   # frames between two objects, at least
MIN_FRAMES = 96   # the most objects (3 + 3 + 1 + 2 distractors, 6 frames each, 2 apart) fit


@dataclass
class Item:
    """One object drawn in the video. `role` is the question it answers ("distractor": none)."""

    start: int        # first frame (even)
    length: int       # frames visible
    color: str
    shape: str
    x: int            # centre, px
    y: int
    size: int         # half-size, px
    role: str

    @property
    def cell(self) -> tuple[int, int]:
        return self.y // CELL, self.x // CELL


@dataclass
class Question:
    kind: str         # "order", "count" or "identify"
    text: str
    answer: str       # the exact expected answer


@dataclass
class LongExample:
    seed: int
    num_frames: int
    items: list[Item]
    questions: list[Question]   # conversation order
    frames: np.ndarray | None = field(default=None, repr=False)  # [T, SIZE, SIZE, 3] uint8

    def rows(self, video_id: str) -> list[dict]:
        """One row per question (Video-MME-like layout plus the exact answer and the turn)."""
        return [{"videoID": video_id, "question_id": f"{video_id}-{i + 1}", "turn": i, "task_type": q.kind,
                 "question": q.text, "answer": q.answer, "num_frames": self.num_frames, "seed": self.seed,
                 "items": [asdict(it) for it in self.items] if i == 0 else None}
                for i, q in enumerate(self.questions)]


def answers(items: list[Item], kind: str, target: str) -> str:
    """The exact answer of a question of `kind` about `target` (a shape for order / count, a colour
    for identify), computed from the drawn objects: the single source of truth for the task."""
    items = sorted(items, key=lambda it: it.start)
    if kind == "order":
        return ", ".join(it.color for it in items if it.shape == target)
    if kind == "count":
        n = sum(it.shape == target for it in items)
        return f"{n} {target if n == 1 else PLURAL[target]}"
    if kind == "identify":
        (it,) = [it for it in items if it.color == target]
        return f"{it.color} {it.shape}"
    raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")


def question_text(kind: str, target: str) -> str:
    if kind == "order":
        return f"In what order do the {PLURAL[target]} appear? Answer with their colors."
    if kind == "count":
        return f"How many {PLURAL[target]} appear?"
    return f"What is the {target} object?"


def num_distractors(num_frames: int) -> int:
    return int(min(32, max(2, num_frames // 64)))


def make_long_example(seed: int, num_frames: int = 1024, render_frames: bool = True) -> LongExample:
    """The example of (`seed`, `num_frames`), deterministic. At least MIN_FRAMES frames."""
    if num_frames < MIN_FRAMES:
        raise ValueError(f"num_frames must be at least {MIN_FRAMES} for the long task, got {num_frames}")
    rng = np.random.default_rng([seed, num_frames])
    colors, shapes = list(COLORS), list(SHAPES)
    a, b, c, d = (str(s) for s in rng.permutation(shapes))
    g = str(rng.choice(colors))
    others = [x for x in colors if x != g]
    n_a, n_b = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    spec = [(str(col), a, "order") for col in rng.choice(others, n_a, replace=False)]
    spec += [(str(col), b, "count") for col in rng.choice(others, n_b)]
    spec.append((g, str(rng.choice([c, d])), "identify"))
    spec += [(str(rng.choice(others)), str(rng.choice([c, d])), "distractor")
             for _ in range(num_distractors(num_frames))]
    order = rng.permutation(len(spec))                         # the objects' order in time
    lengths = rng.choice(LENGTHS, len(spec))
    items = _place(rng, num_frames, [spec[i] for i in order], lengths)
    kinds = [str(k) for k in rng.permutation(KINDS)]
    targets = {"order": a, "count": b, "identify": g}
    questions = [Question(k, question_text(k, targets[k]), answers(items, k, targets[k])) for k in kinds]
    frames = None
    if render_frames:
        needles = [Needle(it.start, it.length, it.color, it.shape, it.x, it.y, it.size) for it in items]
        frames = render(num_frames, needles, rng, SIZE, palette=COLORS)
    return LongExample(seed, num_frames, items, questions, frames)


def _place(rng, num_frames: int, spec: list[tuple[str, str, str]], lengths) -> list[Item]:
    """Objects one after another, at least GAP frames apart, each starting on an even frame (a
    temporal-patch boundary) inside one CELL, spread uniformly over the whole video."""
    total = int(sum(lengths)) + GAP * (len(spec) - 1)
    free = (num_frames // 2) * 2 - total
    if free < 0:
        raise ValueError(f"{len(spec)} objects do not fit in {num_frames} frames")
    offsets = np.sort(rng.integers(0, free // 2 + 1, len(spec))) * 2
    cells = SIZE // CELL
    items, t = [], 0
    for (col, shp, role), off, n in zip(spec, offsets, lengths):
        cy, cx = (rng.integers(0, cells, 2) * CELL + CELL // 2 + rng.integers(-2, 3, 2)).tolist()
        items.append(Item(start=int(off) + t, length=int(n), color=col, shape=shp, x=int(cx), y=int(cy),
                          size=int(rng.integers(7, 11)), role=role))
        t += int(n) + GAP
    return items


def write_long_dataset(out_dir: str, n: int, num_frames: int = 1024, seed: int = 1_000_000,
                       fps: float = FPS) -> str:
    """Write `n` examples (seeds seed .. seed+n-1) as mp4s plus `questions.json` (three rows per
    video, in conversation order). Existing files of the same examples are kept. Returns the path
    of the question file."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(n):
        vid = f"long_{num_frames}_{seed + i}"
        path = os.path.join(out_dir, f"{vid}.mp4")
        ex = make_long_example(seed + i, num_frames, render_frames=not os.path.exists(path))
        if ex.frames is not None:
            write_video(path, ex.frames, fps)
        rows.extend(ex.rows(vid))
    out = os.path.join(out_dir, "questions.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    return out
