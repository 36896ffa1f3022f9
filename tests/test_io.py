"""Video I/O: sampling, timestamps, backends, streaming chunks, bad input."""
import os

import numpy as np
import pytest
from PIL import Image

from mmkv.errors import InputError
from mmkv.io import load_media, sample_indices
from mmkv.io.video import _DecordSource, _PyAVSource
from mmkv.synthetic import write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 45-frame, 15 fps clip whose frame i has a bar at row 2*i (so frames are identifiable)."""
    frames = np.zeros((45, 96, 64, 3), np.uint8)
    for i in range(45):
        frames[i, 2 * i:2 * i + 2, :, :] = 255
    path = str(tmp_path_factory.mktemp("v") / "clip.mp4")
    write_video(path, frames, fps=15)
    return path


def frame_id(frame):
    """Which frame this is: the bar's centre row is 2 * i + 0.5."""
    w = frame[:, :, 0].astype(np.float64).mean(1)
    w = np.where(w > 128, w, 0)
    return int(round((np.arange(len(w)) @ w / w.sum() - 0.5) / 2))


def test_uniform_sampling_includes_ends():
    idx = sample_indices(100, 25.0, frames=5)
    assert idx.tolist() == [0, 25, 50, 74, 99]
    assert sample_indices(3, 25.0, frames=8).tolist() == [0, 1, 2]  # never more than the video has


def test_fps_sampling_and_cap():
    idx = sample_indices(300, 30.0, fps=1)       # 10 s video
    assert idx.tolist() == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    capped = sample_indices(300, 30.0, fps=1, max_frames=4)
    assert len(capped) == 4 and capped[0] == 0 and capped[-1] == 270
    assert len(sample_indices(3600 * 30, 30.0, fps=1)) == 3600


@pytest.mark.parametrize("kw", [dict(frames=0), dict(fps=-1), dict(frames=3, fps=1), dict(max_frames=0)])
def test_bad_sampling_arguments(kw):
    with pytest.raises(InputError):
        sample_indices(100, 25.0, **kw)


def test_file_timestamps_and_chunks(clip):
    m = load_media(clip, frames=9)
    assert m.kind == "video" and m.total_frames == 45 and abs(m.source_fps - 15) < 1e-6
    assert np.allclose(m.timestamps, m.indices / 15.0)
    got = []
    for frames, ts in m.chunks(4):
        assert len(frames) <= 4 and len(frames) == len(ts)
        got += [frame_id(f) for f in frames]
    assert got == m.indices.tolist()  # the decoded frames are the sampled ones, in order
    assert abs(m.sampled_fps - 9 / 45 * 15) < 1e-9


def test_decord_and_pyav_agree(clip):
    idx = np.array([0, 7, 22, 44])
    a, b = _DecordSource(clip), _PyAVSource(clip)
    assert a.num_frames == b.num_frames == 45
    fa, fb = a.get(idx), b.get(idx)
    assert fa.shape == fb.shape
    assert [frame_id(f) for f in fa] == [frame_id(f) for f in fb] == idx.tolist()


def test_in_memory_inputs():
    arr = np.zeros((6, 32, 32, 3), np.uint8)
    m = load_media(arr, video_fps=2.0)
    assert m.num_frames == 6 and np.allclose(m.timestamps, np.arange(6) / 2.0)
    m = load_media([Image.new("RGB", (32, 24))] * 3)
    assert m.num_frames == 3 and m.frames().shape == (3, 24, 32, 3)
    m = load_media(np.zeros((16, 16, 3), np.uint8))
    assert m.kind == "image"
    m = load_media(arr.transpose(0, 3, 1, 2), frames=2)  # [T, 3, H, W] accepted
    assert m.frames().shape == (2, 32, 32, 3)


def test_image_file(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (20, 10), (255, 0, 0)).save(p)
    m = load_media(str(p))
    assert m.kind == "image" and m.image().size == (20, 10)


def test_bad_inputs(tmp_path):
    cases = {}
    with pytest.raises(InputError, match="no such file"):
        load_media(str(tmp_path / "missing.mp4"))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_media(str(empty))
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    with pytest.raises(InputError, match="not a readable video"):
        load_media(str(text))
    with pytest.raises(InputError, match="directory"):
        load_media(str(tmp_path))
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InputError, match="not a readable image"):
        load_media(str(corrupt))
    with pytest.raises(InputError, match="zero frames"):
        load_media([])
    with pytest.raises(InputError, match="zero frames"):
        load_media(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="RGB"):
        load_media(np.zeros((4, 8, 8, 2), np.uint8))
    with pytest.raises(InputError, match="cannot read a video"):
        load_media(42)
    assert not cases


def test_truncated_video_is_an_error_not_a_crash(clip, tmp_path):
    data = open(clip, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    try:
        m = load_media(str(cut), frames=4)
        frames = m.frames()  # readable prefix: decoding must give real frames
        assert frames.shape[0] == 4
    except InputError as e:
        assert "cut.mp4" in str(e)
