"""Video I/O: sampling, timestamps, backends, streaming chunks, bad input."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkv.errors import InputError, MmkvWarning
from mmkv.io import load_media, probe, sample_indices
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


# ----------------------------------------------------------------------------- damaged and odd files
def _bars(n, h=96, w=64, seed=0):
    """Frame i has a bar at row 2*i over low noise (noise makes packets big, so cuts land mid-video)."""
    frames = np.random.default_rng(seed).integers(0, 40, (n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, 2 * i:2 * i + 2, :, :] = 255
    return frames


@pytest.fixture(scope="module")
def h264(tmp_path_factory):
    """A 45-frame 15 fps H.264 clip with its index (moov) before the payload, as browsers want."""
    path = str(tmp_path_factory.mktemp("h") / "bars.mp4")
    write_video(path, _bars(45), fps=15, codec="h264")
    return path


def _mdat(data: bytes) -> int:
    at = data.find(b"mdat")
    assert 0 < at < data.find(b"moov") or data.find(b"moov") < at, "no mdat box"
    return at + 4


def test_truncated_file_samples_only_frames_that_decode(h264, tmp_path):
    data = Path(h264).read_bytes()
    start = _mdat(data)
    assert data.find(b"moov") < start  # the header (which promises 45 frames) survives the cut
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: start + (len(data) - start) // 2])
    with pytest.warns(MmkvWarning, match="promises 45 frames but only"):
        m = load_media(str(cut), frames=32)
    assert m.header_frames == 45 and 0 < m.total_frames < 45
    assert m.extra == {"video_frames_in_header": 45, "video_frames_decodable": m.total_frames}
    got = [frame_id(f) for f in m.frames()]
    # real, distinct frames (none is a copy of the last decodable one), at their real times: with
    # B-frames a cut also loses frames between the last ones that decode
    assert got == np.round(m.timestamps * 15).astype(int).tolist()
    assert len(set(got)) == len(got) == min(32, m.total_frames) and m.indices[-1] == m.total_frames - 1
    with pytest.warns(MmkvWarning):
        info = probe(str(cut))
    assert info["header_frames"] == 45 and info["frames"] == m.total_frames


@pytest.mark.parametrize("payload", ["random", "zeros", "none"])
def test_valid_header_without_decodable_payload_is_one_clear_error(h264, tmp_path, payload):
    data = bytearray(Path(h264).read_bytes())
    start = _mdat(bytes(data))
    rest = len(data) - start
    if payload == "random":
        data[start:] = np.random.default_rng(1).integers(0, 256, rest, dtype=np.uint8).tobytes()
    elif payload == "zeros":
        data[start:] = bytes(rest)
    else:
        del data[start + 8:]
    bad = tmp_path / f"{payload}.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        load_media(str(bad)).frames()
    msg = str(e.value)
    assert f"{payload}.mp4" in msg and "decord:" in msg and "pyav:" in msg and "\n" not in msg


@pytest.mark.parametrize("side", [16, 48])
def test_tiny_h264_falls_back_to_pyav(tmp_path, side):
    """decord mis-decodes tiny H.264 frames (wrong shape or a failed copy); PyAV reads them."""
    frames = np.stack([np.full((side, side, 3), 20 * i, np.uint8) for i in range(10)])
    path = str(tmp_path / f"tiny{side}.mp4")
    write_video(path, frames, fps=10, codec="h264")
    m = load_media(path, frames=5)
    got = m.frames()
    assert got.shape == (5, side, side, 3)
    np.testing.assert_allclose(got.reshape(5, -1).mean(1), 20.0 * m.indices, atol=6)


def test_decord_failure_while_decoding_hands_over_to_pyav(clip):
    src = _DecordSource(clip)

    class Broken:
        def get_batch(self, idx):
            raise RuntimeError("decoder exploded")

    src._vr = Broken()
    assert [frame_id(f) for f in src.get(np.array([3, 30]))] == [3, 30]


def test_fps_above_the_source_rate_invents_no_frame(clip):
    idx = sample_indices(132, 25.0, fps=100)
    assert idx.tolist() == list(range(132))
    m = load_media(clip, fps=100)
    assert m.num_frames == 45 and [frame_id(f) for f in m.frames()] == list(range(45))
    assert sample_indices(132, 25.0, fps=25).tolist() == list(range(132))


@pytest.mark.parametrize("fps", [float("inf"), float("nan"), -1.0, 0, True, "2"])
def test_fps_must_be_finite_and_positive(clip, fps):
    with pytest.raises(InputError, match="fps must be a finite positive number"):
        sample_indices(100, 25.0, fps=fps)
    with pytest.raises(InputError, match="fps"):
        load_media(clip, fps=fps)


def test_in_memory_frames_zero_and_nan_are_refused():
    arr = np.zeros((6, 16, 16, 3), np.uint8)
    with pytest.raises(InputError, match="frames must be a positive integer"):
        load_media(arr, frames=0)
    with pytest.raises(InputError, match="video_fps"):
        load_media(arr, video_fps=float("inf"))
    with pytest.raises(InputError, match="frame 0 holds NaN"):
        load_media(np.full((3, 16, 16, 3), np.nan, np.float32))
    part = np.zeros((3, 16, 16, 3), np.float32)
    part[2, 0, 0, 1] = np.inf
    with pytest.raises(InputError, match="frame 2 holds NaN or inf"):
        load_media(part)
    with pytest.raises(InputError, match="NaN"):
        load_media(np.full((16, 16, 3), np.nan))  # a single float image
    assert load_media(np.full((3, 16, 16, 3), 0.5, np.float32)).frames().max() == 127


def test_image_named_like_a_video_is_refused(tmp_path):
    p = tmp_path / "still.mp4"
    Image.new("RGB", (32, 32), (0, 255, 0)).save(p, format="PNG")
    for fn in (load_media, probe):
        with pytest.raises(InputError, match=r"still.mp4' is a PNG image, not a video.*\(\.png\)"):
            fn(str(p))
    j = tmp_path / "photo.mov"
    Image.new("RGB", (32, 32)).save(j, format="JPEG")
    with pytest.raises(InputError, match=r"JPEG image, not a video.*\.jpg"):
        load_media(str(j))
