"""High-resolution image QA ("hires"): a small needle in one AnyRes crop, distractors in the others.

Each image is 252 x 252 px. An AnyRes model whose vision tower reads 84 px views (LLaVA-OneVision
built by `mmkv.models.tiny.make_tiny("llava_onevision", image_size=84, max_crops=3)`) sees it as a
84 px thumbnail (the whole image downscaled 3x, 6 x 6 = 36 tokens) plus 3 x 3 crops of 84 px at
full resolution (36 tokens each, 18 x 18 in all, a newline token after each row): 378 visual
tokens. Each 14 px patch cell of the full image is one crop token.

Over a noisy gray background with gray clutter (unsaturated shapes that mean nothing), a few
saturated objects are drawn, one per crop, each a colour AND a shape, 9 to 11 px wide, inside one
14 px cell: one crop token each, about 3 px (a fraction of one token) in the thumbnail, where the
colour may still show but the shape cannot be read. The needle, `c s` (e.g. "red circle"), is in
one crop; each distractor, in another crop, shares either its colour (`c` with another shape) or
its shape (`s` in another colour), at least one of each kind, so neither colour nor shape alone
finds the needle. The background and the clutter carry a faint tint per crop (red raised by
TINT x the crop's column, blue by TINT x its row; at most 32 levels apart, far below the objects'
saturation), the way a photo's content tells where a patch lies: each crop token can then read
which crop it is in from its own pixels. Without it a crop's place is known only from where its
tokens sit in the decoder's 1-D sequence (AnyRes encodes every crop apart, with the same
positions), which the tiny decoders trained for this task did not learn within their budget
(docs/model.md, runs A and B: about 9% held-out). Three questions per image, in a random order, about the needle:

- locate:   "Where is the red circle?"         -> "top left" (the needle's crop: row top / middle /
            bottom, column left / center / right);
- describe: "What is in the top left?"         -> "red circle" (the object in that crop);
- count:    "How many circles are there?"      -> "3 circles" (the needle's shape, every crop).

Answers take two tokens or more, scored exactly, so the answer's later tokens are generated over
the compressed cache. The questions are answerable one at a time or in one conversation.

Everything is a function of the seed: the placement, the colours, the pixels.

    from mmkv.synthetic.hires import make_hires_example, write_hires_dataset
    ex = make_hires_example(seed=3)                        # image [252, 252, 3], 3 questions
    write_hires_dataset("data/hires", n=100, seed=1_000_000)   # PNGs + questions.json
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from . import SHAPES, _draw_shape
from .long import COLORS, PLURAL

SIZE = 252            # image side, px
CROP = 84             # AnyRes crop side (the vision tower's input size)
GRID = SIZE // CROP   # 3 x 3 crops
CELL = 14             # one vision patch = one crop token
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
KINDS = ("locate", "describe", "count")
HALF_SIZES = (4, 5)   # object half-size, px: 9-11 px wide, inside one CELL
MIN_DISTRACTORS, MAX_DISTRACTORS = 3, 6
CLUTTER = (8, 16)     # gray shapes, at least / at most
TINT = 16             # per-crop background tint step: red + TINT * column, blue + TINT * row
VERSION = 2           # of the pixels (2: the per-crop tint); cached datasets are keyed on it


@dataclass
class Item:
    """One saturated object. `role` is "needle" or "distractor"."""

    color: str
    shape: str
    x: int            # centre, px
    y: int
    size: int         # half-size, px
    role: str

    @property
    def crop(self) -> tuple[int, int]:
        """(row, column) of the crop that holds it."""
        return self.y // CROP, self.x // CROP

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of its 14 px cell in the full image (its crop token)."""
        return self.y // CELL, self.x // CELL


@dataclass
class Question:
    kind: str         # "locate", "describe" or "count"
    text: str
    answer: str


@dataclass
class HiresExample:
    seed: int
    items: list[Item]
    questions: list[Question]
    image: np.ndarray | None = field(default=None, repr=False)   # [SIZE, SIZE, 3] uint8

    @property
    def needle(self) -> Item:
        (n,) = [it for it in self.items if it.role == "needle"]
        return n

    def rows(self, image_id: str) -> list[dict]:
        """One row per question, in conversation order (the first row carries the objects)."""
        return [{"imageID": image_id, "question_id": f"{image_id}-{i + 1}", "turn": i, "task_type": q.kind,
                 "question": q.text, "answer": q.answer, "seed": self.seed,
                 "items": [asdict(it) for it in self.items] if i == 0 else None}
                for i, q in enumerate(self.questions)]


def place_name(crop: tuple[int, int]) -> str:
    return f"{ROWS[crop[0]]} {COLS[crop[1]]}"


def question_text(kind: str, needle_color: str, needle_shape: str, crop: tuple[int, int]) -> str:
    if kind == "locate":
        return f"Where is the {needle_color} {needle_shape}?"
    if kind == "describe":
        return f"What is in the {place_name(crop)}?"
    if kind == "count":
        return f"How many {PLURAL[needle_shape]} are there?"
    raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")


def answers(items: list[Item], kind: str) -> str:
    """The exact answer of `kind`, computed from the drawn objects: the task's single source of truth."""
    (n,) = [it for it in items if it.role == "needle"]
    if kind == "locate":
        return place_name(n.crop)
    if kind == "describe":
        (it,) = [it for it in items if it.crop == n.crop]
        return f"{it.color} {it.shape}"
    if kind == "count":
        k = sum(it.shape == n.shape for it in items)
        return f"{k} {n.shape if k == 1 else PLURAL[n.shape]}"
    raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")


def make_hires_example(seed: int, render_image: bool = True) -> HiresExample:
    """The example of `seed`, deterministic."""
    rng = np.random.default_rng([seed, SIZE])
    colors, shapes = list(COLORS), list(SHAPES)
    c, s = str(rng.choice(colors)), str(rng.choice(shapes))
    n_d = int(rng.integers(MIN_DISTRACTORS, MAX_DISTRACTORS + 1))
    n_shape = int(rng.integers(1, n_d))                     # share the shape; the others share the colour
    spec = [(c, s, "needle")]
    spec += [(str(rng.choice([x for x in colors if x != c])), s, "distractor") for _ in range(n_shape)]
    spec += [(c, str(rng.choice([x for x in shapes if x != s])), "distractor") for _ in range(n_d - n_shape)]
    crops = rng.permutation(GRID * GRID)[:len(spec)]        # one object per crop
    per = CROP // CELL
    items = []
    for (col, shp, role), k in zip(spec, crops):
        cy, cx = divmod(int(k), GRID)
        gy, gx = (rng.integers(0, per, 2) + np.array([cy, cx]) * per).tolist()
        jy, jx = rng.integers(-1, 2, 2).tolist()
        items.append(Item(color=col, shape=shp, x=gx * CELL + CELL // 2 + jx, y=gy * CELL + CELL // 2 + jy,
                          size=int(rng.choice(HALF_SIZES)), role=role))
    kinds = [str(k) for k in rng.permutation(KINDS)]
    needle = items[0]
    questions = [Question(k, question_text(k, c, s, needle.crop), answers(items, k)) for k in kinds]
    image = render(items, rng) if render_image else None
    return HiresExample(seed, items, questions, image)


def render(items: list[Item], rng: np.random.Generator) -> np.ndarray:
    """[SIZE, SIZE, 3] uint8: noisy gray background, gray clutter shapes in cells no object uses,
    the per-crop tint over both, the objects."""
    bg = int(rng.integers(50, 100))
    gray = np.clip(rng.normal(bg, 4.0, (SIZE, SIZE)), 0, 255).astype(np.uint8)
    img = np.repeat(gray[..., None], 3, axis=2)
    used = {it.cell for it in items}
    n_cells = SIZE // CELL
    free = [k for k in range(n_cells * n_cells) if divmod(k, n_cells) not in used]
    n_c = int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))
    for k in rng.permutation(free)[:n_c]:
        gy, gx = divmod(int(k), n_cells)
        shade = int(rng.integers(130, 230))
        _draw_shape(img, str(rng.choice(SHAPES)), gx * CELL + CELL // 2, gy * CELL + CELL // 2,
                    int(rng.choice(HALF_SIZES)), (shade, shade, shade))
    img = tint(img)
    for it in items:
        _draw_shape(img, it.shape, it.x, it.y, it.size, COLORS[it.color])
    return img


def crop_tint(row: int, col: int) -> tuple[int, int, int]:
    """The (R, G, B) offset of crop (row, col)'s background and clutter."""
    return TINT * col, 0, TINT * row


def tint(img: np.ndarray) -> np.ndarray:
    """`img` with every crop's tint added (clipped to 255)."""
    off = np.zeros((GRID, GRID, 3), np.int16)
    for r in range(GRID):
        for c in range(GRID):
            off[r, c] = crop_tint(r, c)
    off = np.repeat(np.repeat(off, CROP, 0), CROP, 1)
    return np.clip(img.astype(np.int16) + off, 0, 255).astype(np.uint8)


def write_hires_dataset(out_dir: str, n: int, seed: int = 1_000_000) -> str:
    """Write `n` examples (seeds seed .. seed+n-1) as PNGs plus `questions.json` (three rows per
    image, in conversation order). Existing PNGs of the same examples are kept. Returns the path
    of the question file."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(n):
        iid = f"hires_{seed + i}"
        path = os.path.join(out_dir, f"{iid}.png")
        ex = make_hires_example(seed + i, render_image=not os.path.exists(path))
        if ex.image is not None:
            Image.fromarray(ex.image).save(path)
        rows.extend(ex.rows(iid))
    out = os.path.join(out_dir, "questions.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    return out
