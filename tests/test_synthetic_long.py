"""Task v2 (mmkv.synthetic.long): every answer is read back from the pixels (not from the metadata),
the needles are hidden among objects that share their colour or their shape, and the videos have
at least 16 visual tokens per frame pair."""
import json
import re

import numpy as np
import pytest

from mmkv.synthetic.long import (CELL, COLORS, KINDS, LENGTHS, PLURAL, SIZE, make_long_example,
                                 num_distractors, write_long_dataset)


def read_objects(frames: np.ndarray) -> list[dict]:
    """Objects found in the pixels: runs of frames with saturated pixels (the background and the
    moving squares are gray), each with its colour, shape, first frame, length and cell."""
    f = frames.astype(np.int16)
    sat = (f.max(-1) - f.min(-1)) > 80                                  # [T, H, W]
    on = sat.sum((1, 2)) > 20
    events, t = [], 0
    while t < len(on):
        if not on[t]:
            t += 1
            continue
        s = t
        while t < len(on) and on[t]:
            t += 1
        m = sat[s]
        ys, xs = np.nonzero(m)
        rgb = frames[s][m].astype(float).mean(0)
        color = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - rgb).sum())
        box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        h, w = box.shape
        if box.mean() > 0.9:
            shape = "square"
        elif box[-1].mean() > 0.8:
            shape = "triangle"
        else:
            c, r = h // 2, h // 2
            i = c - round(0.6 * r)
            shape = "circle" if box[i, i] else "cross"
        events.append({"start": s, "length": t - s, "color": color, "shape": shape,
                       "cell": (int(ys.mean()) // CELL, int(xs.mean()) // CELL)})
    return events


SINGULAR = {v: k for k, v in PLURAL.items()}


def answer_from_pixels(question: str, events: list[dict]) -> str:
    m = re.match(r"In what order do the (\w+) appear\?", question)
    if m:
        return ", ".join(e["color"] for e in events if e["shape"] == SINGULAR[m[1]])
    m = re.match(r"How many (\w+) appear\?", question)
    if m:
        shape = SINGULAR[m[1]]
        n = sum(e["shape"] == shape for e in events)
        return f"{n} {shape if n == 1 else m[1]}"
    m = re.match(r"What is the (\w+) object\?", question)
    (e,) = [e for e in events if e["color"] == m[1]]
    return f"{e['color']} {e['shape']}"


@pytest.mark.parametrize("frames", [96, 257, 1024])
def test_answers_are_what_the_frames_show(frames):
    for seed in range(8):
        ex = make_long_example(2_000 + seed, frames)
        assert ex.frames.shape == (frames, SIZE, SIZE, 3)
        events = read_objects(ex.frames)
        drawn = [(i.start, i.length, i.color, i.shape, i.cell) for i in sorted(ex.items, key=lambda i: i.start)]
        assert [(e["start"], e["length"], e["color"], e["shape"], e["cell"]) for e in events] == drawn
        assert sorted(q.kind for q in ex.questions) == sorted(KINDS)
        for q in ex.questions:
            assert q.answer == answer_from_pixels(q.text, events), (seed, q)


def test_needles_share_colour_or_shape_with_distractors():
    """Across examples: the order/count needles share a colour with some distractor, the identify
    needle shares its shape with a distractor; needles are 1-3 tokens inside one cell, on even frames."""
    shared_colour = shared_shape = 0
    for seed in range(40):
        ex = make_long_example(seed, 512, render_frames=False)
        dis = [i for i in ex.items if i.role == "distractor"]
        assert len(dis) == num_distractors(512) == 8
        for it in ex.items:
            assert it.start % 2 == 0 and it.length in LENGTHS
            assert (it.x - it.size) // CELL == (it.x + it.size) // CELL and \
                (it.y - it.size) // CELL == (it.y + it.size) // CELL
        ident = [i for i in ex.items if i.role == "identify"]
        assert len(ident) == 1 and sum(i.color == ident[0].color for i in ex.items) == 1
        shared_shape += any(d.shape == ident[0].shape for d in dis)
        shared_colour += any(d.color == n.color for d in dis for n in ex.items if n.role in ("order", "count"))
        spans = sorted((i.start, i.start + i.length) for i in ex.items)
        assert all(b[0] >= a[1] + 2 for a, b in zip(spans, spans[1:])) and spans[-1][1] <= 512
    assert shared_colour >= 38 and shared_shape >= 30


def test_deterministic_and_multi_token_answers():
    a, b = make_long_example(5, 256), make_long_example(5, 256)
    assert a.items == b.items and a.questions == b.questions
    np.testing.assert_array_equal(a.frames, b.frames)
    assert make_long_example(5, 256, render_frames=False).questions == a.questions
    assert make_long_example(6, 256, render_frames=False).items != a.items
    kinds = {}
    for s in range(60):
        for q in make_long_example(s, 128, render_frames=False).questions:
            kinds.setdefault(q.kind, set()).add(q.answer)
    assert all(len(" ".join(a.split(", ")).split()) >= 2 for a in kinds["count"] | kinds["identify"])
    assert any(a.count(",") == 2 for a in kinds["order"]) and len(kinds["count"]) > 6
    for s in range(300):                       # the most objects always fit in the shortest video
        make_long_example(s, 96, render_frames=False)
    with pytest.raises(ValueError, match="at least 96"):
        make_long_example(0, 64)


def test_dataset_round_trips_through_mp4(tmp_path):
    from mmkv.io import load_media

    path = write_long_dataset(str(tmp_path), n=2, num_frames=96, seed=7)
    rows = json.load(open(path))
    assert len(rows) == 6 and [r["turn"] for r in rows] == [0, 1, 2, 0, 1, 2]
    media = load_media(str(tmp_path / f"{rows[0]['videoID']}.mp4"), frames=96)
    got = media.frames()
    events = read_objects(got)                       # the answers survive the mp4 (mp4v) round trip
    for r in rows[:3]:
        assert answer_from_pixels(r["question"], events) == r["answer"]
    mtime = (tmp_path / f"{rows[0]['videoID']}.mp4").stat().st_mtime
    write_long_dataset(str(tmp_path), n=2, num_frames=96, seed=7)   # existing videos are kept
    assert (tmp_path / f"{rows[0]['videoID']}.mp4").stat().st_mtime == mtime
