"""The high-resolution image task (mmkv.synthetic.hires): every answer is read back from the pixels
(not from the metadata), the needle shares its colour and its shape with distractors in other
crops, it is one crop token wide, and the generator is deterministic."""
import json
import re

import numpy as np
import pytest

from mmkv.synthetic.hires import (CELL, COLS, CROP, GRID, KINDS, ROWS, SIZE, make_hires_example,
                                  write_hires_dataset)
from mmkv.synthetic.long import COLORS, PLURAL

SINGULAR = {v: k for k, v in PLURAL.items()}


def read_objects(image: np.ndarray) -> list[dict]:
    """The saturated objects in the pixels (background and clutter are gray): colour, shape, crop."""
    import cv2

    f = image.astype(np.int16)
    sat = ((f.max(-1) - f.min(-1)) > 80).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(sat, connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h, _ = stats[k]
        box = labels[y:y + h, x:x + w] == k
        rgb = image[labels == k].astype(float).mean(0)
        color = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - rgb).sum())
        if box.mean() > 0.95:
            shape = "square"
        elif box[-1].mean() > 0.8 and box[0].mean() < 0.5:
            shape = "triangle"
        else:
            shape = "circle" if box[2, 2] else "cross"
        cy, cx = y + h // 2, x + w // 2
        out.append({"color": color, "shape": shape, "crop": (cy // CROP, cx // CROP), "cell": (cy // CELL, cx // CELL),
                    "inside_cell": (y // CELL, x // CELL) == ((y + h - 1) // CELL, (x + w - 1) // CELL)})
    return out


def answer_from_pixels(question: str, objs: list[dict]) -> str:
    m = re.match(r"Where is the (\w+) (\w+)\?", question)
    if m:
        (o,) = [o for o in objs if (o["color"], o["shape"]) == (m[1], m[2])]
        return f"{ROWS[o['crop'][0]]} {COLS[o['crop'][1]]}"
    m = re.match(r"What is in the (\w+) (\w+)\?", question)
    if m:
        (o,) = [o for o in objs if o["crop"] == (ROWS.index(m[1]), COLS.index(m[2]))]
        return f"{o['color']} {o['shape']}"
    m = re.match(r"How many (\w+) are there\?", question)
    k = sum(o["shape"] == SINGULAR[m[1]] for o in objs)
    return f"{k} {SINGULAR[m[1]] if k == 1 else m[1]}"


def test_answers_are_what_the_pixels_show():
    for seed in range(40):
        ex = make_hires_example(5_000 + seed)
        assert ex.image.shape == (SIZE, SIZE, 3) and ex.image.dtype == np.uint8
        objs = read_objects(ex.image)
        drawn = sorted((it.color, it.shape, it.crop, it.cell) for it in ex.items)
        assert sorted((o["color"], o["shape"], o["crop"], o["cell"]) for o in objs) == drawn, seed
        assert all(o["inside_cell"] for o in objs)                      # one crop token each
        assert sorted(q.kind for q in ex.questions) == sorted(KINDS)
        for q in ex.questions:
            assert q.answer == answer_from_pixels(q.text, objs), (seed, q)
            assert len(q.answer.split()) == 2                           # two words, several tokens


def test_needle_shares_colour_and_shape_with_distractors_in_other_crops():
    kinds = {k: set() for k in KINDS}
    for seed in range(200):
        ex = make_hires_example(seed, render_image=False)
        n = ex.needle
        dis = [it for it in ex.items if it.role == "distractor"]
        assert 3 <= len(dis) <= 6
        assert len({it.crop for it in ex.items}) == len(ex.items)       # one object per crop
        assert all((d.color == n.color) != (d.shape == n.shape) for d in dis)   # exactly one shared
        assert any(d.color == n.color for d in dis) and any(d.shape == n.shape for d in dis)
        assert all(0 <= it.x - it.size and it.x + it.size < SIZE and (it.x - it.size) // CELL ==
                   (it.x + it.size) // CELL for it in ex.items)
        for q in ex.questions:
            kinds[q.kind].add(q.answer)
    assert len(kinds["locate"]) == GRID * GRID and len(kinds["describe"]) == 24
    assert {a.split()[0] for a in kinds["count"]} == {"2", "3", "4", "5", "6"}


def test_deterministic():
    a, b = make_hires_example(11), make_hires_example(11)
    assert a.items == b.items and a.questions == b.questions
    np.testing.assert_array_equal(a.image, b.image)
    assert make_hires_example(11, render_image=False).questions == a.questions
    assert make_hires_example(12, render_image=False).items != a.items


def test_dataset_round_trips_through_png(tmp_path):
    from mmkv.io import load_media

    path = write_hires_dataset(str(tmp_path), n=2, seed=7)
    rows = json.load(open(path))
    assert len(rows) == 6 and [r["turn"] for r in rows] == [0, 1, 2, 0, 1, 2]
    png = tmp_path / f"{rows[0]['imageID']}.png"
    media = load_media(str(png))
    assert media.kind == "image"
    img = np.asarray(media.image().convert("RGB"))
    np.testing.assert_array_equal(img, make_hires_example(7).image)     # lossless
    for r in rows[:3]:
        assert answer_from_pixels(r["question"], read_objects(img)) == r["answer"]
    mtime = png.stat().st_mtime
    write_hires_dataset(str(tmp_path), n=2, seed=7)                      # existing images are kept
    assert png.stat().st_mtime == mtime


@pytest.mark.parametrize("seed", [0, 1_000_000])
def test_any_seed_works(seed):
    assert len(make_hires_example(seed).questions) == 3


def test_each_crop_token_can_read_its_crop_from_its_own_pixels():
    """The per-crop tint: in every 14 px cell without an object, the background's red and blue
    excess over green gives the crop's column and row (the objects' colours are untouched)."""
    from mmkv.synthetic.hires import TINT

    for seed in range(6):
        ex = make_hires_example(9_000 + seed)
        f = ex.image.astype(float)
        used = {it.cell for it in ex.items}
        n = SIZE // CELL
        for gy in range(n):
            for gx in range(n):
                if (gy, gx) in used:
                    continue
                cell = f[gy * CELL:(gy + 1) * CELL, gx * CELL:(gx + 1) * CELL]
                r, g, b = cell[..., 0], cell[..., 1], cell[..., 2]
                col = int(round(float(np.median(r - g)) / TINT))
                row = int(round(float(np.median(b - g)) / TINT))
                assert (row, col) == (gy * CELL // CROP, gx * CELL // CROP), (seed, gy, gx)
        for it in ex.items:
            assert tuple(ex.image[it.y, it.x]) == COLORS[it.color]
