"""The synthetic needle-video generator: deterministic per seed, and every answer is checked
against what was actually drawn in the frames (read back from the pixels, not from the metadata)."""
import json

import numpy as np
import pytest

from mmkv.synthetic import COLORS, LETTERS, SHAPES, TASKS, make_example, write_dataset, write_video


def read_needles(frames: np.ndarray) -> list[dict]:
    """Needle events found in the pixels: runs of frames with saturated pixels (the background and
    the distractors are gray), each with its colour, shape, first frame and length."""
    f = frames.astype(np.int16)
    sat = (f.max(-1) - f.min(-1)) > 80                                  # [T, H, W]
    on = sat.any((1, 2))
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
        if box.mean() > 0.95:
            shape = "square"
        elif box[-1].mean() > 0.8:
            shape = "triangle"                                           # a full bottom row
        else:  # circle or cross: a point off both axes, 0.6 r from the centre diagonally, is in a circle only
            c, r = h // 2, h // 2
            i = c - round(0.6 * r)
            shape = "circle" if box[i, i] else "cross"
        events.append({"start": s, "length": t - s, "color": color, "shape": shape})
    return events


def truth_from_pixels(ex) -> str:
    ev = read_needles(ex.frames)
    if ex.task == "color":
        assert len(ev) == 1
        return ev[0]["color"]
    if ex.task == "shape":
        assert len(ev) == 1
        return ev[0]["shape"]
    if ex.task == "order":
        assert len(ev) == 2 and ev[0]["color"] != ev[1]["color"]
        return ev[0]["color"]
    return str(len(ev))


@pytest.mark.parametrize("frames", [32, 77, 256])
def test_answers_are_what_the_frames_show(frames):
    for seed in range(24):
        ex = make_example(1_000 + seed, frames, task=TASKS[seed % 4])
        chosen = ex.options[LETTERS.index(ex.answer)].split(". ", 1)[1]
        assert chosen == truth_from_pixels(ex), (seed, ex.task, ex.needles)
        drawn = read_needles(ex.frames)
        assert [(e["start"], e["length"], e["color"], e["shape"]) for e in drawn] == \
            [(n.start, n.length, n.color, n.shape) for n in sorted(ex.needles, key=lambda n: n.start)]


def test_deterministic_per_seed_and_different_across_seeds():
    a, b = make_example(5, 64), make_example(5, 64)
    assert a.options == b.options and a.answer == b.answer and a.needles == b.needles
    np.testing.assert_array_equal(a.frames, b.frames)
    c = make_example(6, 64)
    assert not np.array_equal(a.frames, c.frames)
    meta = make_example(5, 64, render_frames=False)               # the metadata does not need the pixels
    assert meta.frames is None and meta.needles == a.needles and meta.answer == a.answer


def test_options_and_answers_are_balanced():
    exs = [make_example(s, 32, render_frames=False) for s in range(400)]
    assert {e.task for e in exs} == set(TASKS)
    letters = [e.answer for e in exs]
    assert all(letters.count(x) > 60 for x in LETTERS)              # no letter is a free win
    shuffled = make_example(11, 64, task="color", shuffle=True)
    assert sorted(o.split(". ")[1] for o in shuffled.options) == sorted(COLORS)
    assert [o.split(". ")[1] for o in make_example(11, 64, task="shape").options] == list(SHAPES)


def test_needles_fit_and_errors():
    for seed in range(50):  # four needles of a count question fit in the shortest video
        ex = make_example(seed, 32, task="count", render_frames=False)
        spans = sorted((n.start, n.start + n.length) for n in ex.needles)
        assert all(e <= 32 for _, e in spans) and all(b[0] >= a[1] + 2 for a, b in zip(spans, spans[1:]))
        for n in ex.needles:  # aligned with the vision tokens: even start, 3 slots, inside one 28 px cell
            assert n.start % 2 == 0 and n.length == 6
            assert (n.x - n.size) // 28 == (n.x + n.size) // 28 and (n.y - n.size) // 28 == (n.y + n.size) // 28
    with pytest.raises(ValueError, match="at least 32"):
        make_example(0, 16)
    with pytest.raises(ValueError, match="unknown task"):
        make_example(0, 64, task="weather")


def test_write_dataset_is_videomme_layout(tmp_path):
    path = write_dataset(str(tmp_path), n=2, num_frames=32, seed=3)
    rows = json.load(open(path))
    assert [r["task_type"] for r in rows] == ["color", "shape"]
    for r in rows:
        assert set(r) >= {"videoID", "question_id", "duration", "domain", "sub_category", "task_type", "question",
                          "options", "answer"}
        assert (tmp_path / f"{r['videoID']}.mp4").stat().st_size > 0
        assert r["options"][0].startswith("A. ") and r["answer"] in LETTERS


@pytest.mark.parametrize("codec,tol", [("h264", 2.0), ("mp4v", 8.0)])
def test_write_video_codecs_round_trip(tmp_path, codec, tol):
    """Both writers give back the frames through mmkv's own loader; h264 is what browsers play
    (the bundled sample), mp4v what the held-out sets use."""
    import av

    from mmkv.io import load_media

    if codec == "h264" and "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264 encoder")
    ex = make_example(seed=5, num_frames=32, task="color")
    path = str(tmp_path / f"v_{codec}.mp4")
    write_video(path, ex.frames, codec=codec)
    with av.open(path) as c:
        assert c.streams.video[0].codec_context.name == ("h264" if codec == "h264" else "mpeg4")
    media = load_media(path, frames=32)
    got = media.frames()
    assert got.shape == ex.frames.shape
    assert np.abs(got.astype(int) - ex.frames).mean() < tol
    with pytest.raises(ValueError, match="codec"):
        write_video(path, ex.frames, codec="vp8")
