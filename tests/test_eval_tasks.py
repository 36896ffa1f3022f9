"""Video-MME and MVBench through the real runner with a scripted model: scoring against accuracies
worked out by hand, per-group metrics, bad data, resume bookkeeping, merge and compare.

The datasets are written here in the official layouts; the "model" answers each question with a
scripted response, so every expected number below is checked by hand, not by the code."""
from __future__ import annotations

import json
import os

import pytest

import mmkv
from mmkv.errors import InputError
from mmkv.evaluation.runner import read_records, run, shard


# ----------------------------------------------------------------------------- a scripted model
class _Media:
    total_frames, source_fps = 100, 10.0


class _Enc:
    def __init__(self, video):
        self.video, self.media = video, _Media()


class ScriptedPipe:
    """encode/ask like mmkv.Pipeline; ask answers with the response scripted for the question."""

    model_name = "scripted"

    def __init__(self, responses: dict[str, str]):
        self.responses, self.encoded, self.asked = responses, [], []

    def encode(self, video, **kw):
        self.encoded.append(os.path.basename(str(video)))
        return _Enc(video)

    def ask(self, enc, prompt, max_new_tokens=16, reuse=True):
        q = next(k for k in self.responses if f"{k}\n" in prompt or f":{k}\n" in prompt)
        self.asked.append(q)
        stats = mmkv.Stats(frames=8, visual_tokens=[("vision", 100, 40)], prompt_tokens=60, kv_bytes=1000,
                           kv_bytes_uncompressed=4000, encode_s=0.5, prefill_s=0.25, decode_s=0.125,
                           peak_memory_bytes=2**20, peak_memory_kind="test")
        return mmkv.Result(text=self.responses[q], stats=stats)


# ----------------------------------------------------------------------------- Video-MME data
def _row(vid, n, duration, domain, task_type, answer, options=("A. w", "B. x", "C. y", "D. z")):
    return {"video_id": "001", "duration": duration, "domain": domain, "sub_category": "Astronomy", "url": "",
            "videoID": vid, "question_id": f"{vid}-{n}", "task_type": task_type, "question": f"Q{n}?",
            "options": list(options), "answer": answer}


VIDEOMME_RESPONSES = {
    "Q1?": "A", "Q2?": "The answer is (B).", "Q3?": "b) because it is red",      # v1: right, right, wrong
    "Q4?": "D", "Q5?": "no idea", "Q6?": "B",                                   # v2: right, wrong, right
    "Q7?": "(C)", "Q8?": "I think B, no, the answer is D", "Q9?": "Cannot tell",  # v3: right, right*, wrong
    "Q10?": "A", "Q11?": "A",                                                   # v4: video missing
}  # * only under the 0.7.2 convention (legacy extracts B)


def videomme_dir(tmp_path, fmt="json"):
    root = tmp_path / "videomme"
    (root / "data").mkdir(parents=True)
    rows = [_row("v1", 1, "short", "Knowledge", "Counting Problem", "A"),
            _row("v1", 2, "short", "Knowledge", "OCR Problems", "B"),
            _row("v1", 3, "short", "Knowledge", "OCR Problems", "C"),
            _row("v2", 4, "medium", "Knowledge", "Counting Problem", "D"),
            _row("v2", 5, "medium", "Knowledge", "OCR Problems", "A"),
            _row("v2", 6, "medium", "Knowledge", "OCR Problems", "B"),
            _row("v3", 7, "long", "Sports Competition", "Counting Problem", "C"),
            _row("v3", 8, "long", "Sports Competition", "OCR Problems", "D"),
            _row("v3", 9, "long", "Sports Competition", "OCR Problems", "A"),
            _row("v4", 10, "long", "Sports Competition", "OCR Problems", "A"),
            _row("v4", 11, "long", "Sports Competition", "OCR Problems", "B"),
            {**_row("v1", 12, "short", "Knowledge", "OCR Problems", "A"), "options": None},
            _row("v2", 13, "medium", "Knowledge", "OCR Problems", "E")]
    for v in ("v1", "v2", "v3"):  # v4.mp4 is missing; the scripted model never decodes
        (root / "data" / f"{v}.mp4").write_bytes(b"not decoded by the scripted model")
    if fmt == "json":
        (root / "videomme.json").write_text(json.dumps(rows))
    else:
        (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def _videomme_run(data, out, convention="0.7.2", pipe=None, **kw):
    from mmkv.evaluation.videomme import VideoMME

    pipe = pipe or ScriptedPipe(VIDEOMME_RESPONSES)
    summary = run(VideoMME(data, convention=convention, **{k: v for k, v in kw.items() if k == "subtitles"}),
                  str(out), pipe=pipe, progress=False, **{k: v for k, v in kw.items() if k != "subtitles"})
    return summary, pipe


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_videomme_scoring_by_hand(tmp_path, fmt):
    s, pipe = _videomme_run(videomme_dir(tmp_path, fmt), tmp_path / "out")
    assert sorted(pipe.encoded) == ["v1.mp4", "v2.mp4", "v3.mp4"]          # each video encoded once
    assert len(pipe.asked) == 9
    assert (s["n"], s["answered"], s["correct"]) == (13, 9, 6)
    assert s["accuracy"] == pytest.approx(100 * 6 / 9)
    assert s["accuracy_errors_as_wrong"] == pytest.approx(100 * 6 / 13)
    assert s["errors"]["by_reason"] == {"missing video": 2, "malformed row": 1, "answer outside the options": 1}
    assert s["errors"]["by_kind"] == {"data": 4}
    g = s["groups"]
    assert list(g["duration"]) == ["short", "medium", "long"]
    assert {k: v["accuracy"] for k, v in g["duration"].items()} == pytest.approx(
        {"short": 100 * 2 / 3, "medium": 100 * 2 / 3, "long": 100 * 2 / 3})
    assert g["duration"]["long"]["errors"] == 2
    assert g["domain"]["Knowledge"]["accuracy"] == pytest.approx(100 * 4 / 6)
    assert g["task_type"]["Counting Problem"]["accuracy"] == pytest.approx(100.0)
    assert g["task_type"]["OCR Problems"]["accuracy"] == pytest.approx(50.0)
    # three videos scoring [1, 1, 0] each: clustered standard error 1/18 (worked out by hand)
    assert s["stderr_clustered"] == pytest.approx(100 / 18)
    e = s["efficiency"]
    assert (e["visual_tokens_in_mean"], e["visual_tokens_kept_mean"], e["kv_ratio"]) == (100, 40, 0.25)
    recs = read_records(str(tmp_path / "out" / "samples.jsonl"))
    assert [r["index"] for r in recs] == list(range(13))                     # dataset order
    by_key = {r["key"]: r for r in recs}
    assert by_key["v1-3"]["pred"] == "" and by_key["v3-9"]["pred"] == "C"
    assert [r["shared_encode"] for r in recs[:3]] == [False, True, True]
    assert "missing video v4.mp4" in by_key["v4-10"]["error"]
    assert "answer 'E'" in by_key["v2-13"]["error"]


def test_videomme_legacy_convention(tmp_path):
    s, _ = _videomme_run(videomme_dir(tmp_path), tmp_path / "out", convention="legacy")
    assert s["correct"] == 5 and s["groups"]["duration"]["long"]["accuracy"] == pytest.approx(100 / 3)
    assert "v0.7.1" in s["convention_note"]


def test_resume_skips_finished_and_refuses_other_settings(tmp_path):
    data = videomme_dir(tmp_path)
    _videomme_run(data, tmp_path / "out")
    s, pipe = _videomme_run(data, tmp_path / "out")
    assert pipe.asked == [] and pipe.encoded == [] and s["correct"] == 6
    assert len(read_records(str(tmp_path / "out" / "samples.rank0.jsonl"))) == 13  # nothing appended twice
    with pytest.raises(InputError, match="other settings.*convention"):
        _videomme_run(data, tmp_path / "out", convention="legacy")
    s, pipe = _videomme_run(data, tmp_path / "out", convention="legacy", overwrite=True)
    assert len(pipe.asked) == 9 and s["correct"] == 5


def test_limit_and_duration_filter(tmp_path):
    from mmkv.evaluation.videomme import VideoMME

    data = videomme_dir(tmp_path)
    s, pipe = _videomme_run(data, tmp_path / "a", limit=4)
    assert s["n"] == 4 and pipe.encoded == ["v1.mp4", "v2.mp4"]
    assert [x.key for x in VideoMME(data, durations=["long"]).samples()] == ["v3-7", "v3-8", "v3-9", "v4-10", "v4-11"]


def test_shards_merge_to_the_single_run(tmp_path):
    """In-process: rank 1 then rank 0 of 2 write their shards; the merge equals the single run."""
    from mmkv.evaluation.videomme import VideoMME

    data = videomme_dir(tmp_path)
    single, _ = _videomme_run(data, tmp_path / "single")
    samples = VideoMME(data).samples()
    r0, r1 = shard(samples, 0, 2), shard(samples, 1, 2)
    k0, k1 = {s.key for s in r0}, {s.key for s in r1}
    assert k0 | k1 == {s.key for s in samples} and not k0 & k1 and k0 and k1
    assert {s.cluster for s in r0}.isdisjoint({s.cluster for s in r1})      # a video stays on one rank
    p1 = ScriptedPipe(VIDEOMME_RESPONSES)
    assert run(VideoMME(data), str(tmp_path / "dp"), pipe=p1, rank=1, world_size=2, progress=False) is None
    merged, p0 = _videomme_run(data, tmp_path / "dp", rank=0, world_size=2, merge_timeout=5)
    assert sorted(p0.encoded + p1.encoded) == ["v1.mp4", "v2.mp4", "v3.mp4"]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "rank"} for r in rs]  # noqa: E731
    assert strip(read_records(str(tmp_path / "dp" / "samples.jsonl"))) == \
        strip(read_records(str(tmp_path / "single" / "samples.jsonl")))
    assert merged["accuracy"] == single["accuracy"] and merged["complete"]


def test_incomplete_merge_is_marked(tmp_path):
    from mmkv.evaluation.videomme import VideoMME

    data = videomme_dir(tmp_path)
    s, _ = _videomme_run(data, tmp_path / "dp", rank=0, world_size=2, merge_timeout=0.2)
    assert not s["complete"] and s["missing"] == len(shard(VideoMME(data).samples(), 1, 2))


def test_subtitles_in_the_prompt(tmp_path):
    data = videomme_dir(tmp_path)
    os.makedirs(os.path.join(data, "subtitle"))
    with open(os.path.join(data, "subtitle", "v1.srt"), "w") as f:  # 100 frames at 10 fps (the media's)
        f.write('1\n00:00:00,000 --> 00:00:01,000\n<font color="white" size=".72c">hello there</font>\n\n'
                '2\n00:00:03,000 --> 00:00:03,050\n<font color="white" size=".72c">never sampled</font>\n\n')
    _videomme_run(data, tmp_path / "out", subtitles=True, frames=8)
    recs = {r["key"]: r for r in read_records(str(tmp_path / "out" / "samples.jsonl"))}
    assert recs["v1-1"]["prompt"].startswith("This video's subtitles are listed below: \nhello there\nSelect")
    assert recs["v1-1"]["prompt"].endswith("D. z\nThe best answer is:")
    assert "No subtitles available" in recs["v2-4"]["prompt"]


# ----------------------------------------------------------------------------- MVBench data
def mvbench_dir(tmp_path):
    root = tmp_path / "MVBench"
    (root / "json").mkdir(parents=True)
    (root / "video" / "star" / "Charades_segment").mkdir(parents=True)   # HF layout: under video/
    (root / "nturgbd_convert").mkdir(parents=True)                       # unzipped layout
    for p in ("video/star/Charades_segment/a.mp4", "video/star/Charades_segment/b.mp4", "nturgbd_convert/p.avi"):
        (root / p).write_bytes(b"x")
    seq = [{"video": "a.mp4", "question": "M1", "candidates": ["open", "close", "sit"], "answer": "close"},
           {"video": "a.mp4", "question": "M2", "candidates": ["x", "y"], "answer": "x"},
           {"video": "b.mp4", "question": "M3", "candidates": ["open", "close", "sit"], "answer": "sit"},
           {"video": "b.mp4", "question": "M4", "candidates": ["open", "close"], "answer": "nope"}]
    pose = [{"video": "p.avi", "question": "P1", "candidates": ["stand", "sit"], "answer": "stand"},
            {"video": "missing.avi", "question": "P2", "candidates": ["stand", "sit"], "answer": "sit"},
            {"video": "p.avi", "question": "P3", "candidates": ["a", "b", "c", "squat"], "answer": "squat"},
            {"video": "p.avi"},
            {"video": "p.avi", "question": "P5", "candidates": ["jump", "run"], "answer": "run"}]
    (root / "json" / "action_sequence.json").write_text(json.dumps(seq))
    (root / "json" / "fine_grained_pose.json").write_text(json.dumps(pose))
    return str(root)


MVBENCH_RESPONSES = {"M1": "(B) close", "M2": "", "M3": "A", "M4": "A", "P1": "a", "P2": "A", "P3": "D. squat",
                     "P5": "B"}


def test_mvbench_scoring_by_hand(tmp_path):
    from mmkv.evaluation.mvbench import MVBench

    pipe = ScriptedPipe(MVBENCH_RESPONSES)
    task = MVBench(mvbench_dir(tmp_path))
    assert task.tasks == ["action_sequence", "fine_grained_pose"]   # lmms-eval's group order
    s = run(task, str(tmp_path / "out"), pipe=pipe, progress=False)
    assert pipe.encoded == ["a.mp4", "b.mp4", "p.avi"]
    per = s["groups"]["task"]
    # action_sequence: M1 right, M2 empty (left out of lmms-eval's denominator), M3 wrong, M4 bad answer
    assert (per["action_sequence"]["accuracy"], per["action_sequence"]["accuracy_all"]) == \
        pytest.approx((50.0, 100 / 3))
    # fine_grained_pose: P1 ("a"), P3, P5 right; P2 missing video; row 4 malformed
    assert per["fine_grained_pose"]["accuracy"] == pytest.approx(100.0)
    assert s["accuracy"] == pytest.approx(75.0)            # mean over the tasks
    assert s["accuracy_micro"] == pytest.approx(80.0)      # 4 right of 5 non-empty answers
    assert s["accuracy_all"] == pytest.approx(100 * 4 / 6)
    assert s["errors"]["by_reason"] == {"answer outside the options": 1, "missing video": 1, "malformed row": 1}
    assert "not all 20" in s["accuracy_note"]


def test_mvbench_bad_arguments(tmp_path):
    from mmkv.evaluation.mvbench import MVBench

    with pytest.raises(InputError, match="unknown MVBench task"):
        MVBench(mvbench_dir(tmp_path), tasks=["nope"])
    with pytest.raises(InputError, match="no MVBench task file"):
        MVBench(str(tmp_path))
    with pytest.raises(InputError, match="no task file for"):
        MVBench(mvbench_dir(tmp_path / "x"), tasks=["moving_count"])


# ----------------------------------------------------------------------------- compare, CLI
def test_compare_two_runs(tmp_path, capsys):
    from mmkv.cli import main

    data = videomme_dir(tmp_path)
    _videomme_run(data, tmp_path / "a")
    _videomme_run(data, tmp_path / "b", convention="legacy")
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "WARNING: different lmms-eval conventions" in out
    assert "| accuracy | 66.7 | 55.6 | -11.1 |" in out
    assert "| duration: long | 66.7 | 33.3 | -33.3 |" in out
    assert "both right 5, only A right 1, only B right 0, both wrong 3; same predicted answer 8" in out
    assert main(["eval", "merge", str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == 6
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "nothing")]) == 2


def test_run_records_the_full_recipe_spec(tmp_path, capsys):
    """run.json, the summary and `compare` keep "kivi:2" (not "kivi", which means whatever the
    default bits are when the run is read)."""
    from mmkv.cli import main

    data = videomme_dir(tmp_path)
    sa, _ = _videomme_run(data, tmp_path / "a", recipe="kivi:2")
    sb, _ = _videomme_run(data, tmp_path / "b", recipe="elastic:0.2+kivi:4")
    with open(tmp_path / "a" / "run.json") as f:
        assert json.load(f)["recipe"] == "kivi:2"
    assert (sa["recipe"], sb["recipe"]) == ("kivi:2", "elastic:0.2+kivi:4")
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| | A: kivi:2 | B: elastic:0.2+kivi:4 | B - A |" in capsys.readouterr().out


def test_every_stage_spec_names_its_main_value_and_round_trips():
    from mmkv.recipe import STAGES, Recipe, _ensure_registered

    _ensure_registered()
    for name, cls in sorted(STAGES.items()):
        if name != cls.name:
            continue  # an alias
        stage = cls()
        spec = stage.spec()
        if cls.main:
            assert spec.startswith(f"{cls.name}:{getattr(stage, cls.main)}"), spec
        assert Recipe.parse(spec).stages == [stage], spec
    assert Recipe.parse("streaming:recent=64,sink=2,decode=no+kivi").spec() == "streaming:64,sink=2,decode=False+kivi:2"


def test_resume_refuses_changed_data_and_accepts_a_moved_copy(tmp_path):
    """A restart against edited rows (here one answer changed) would keep the old record, answered
    to the old question and scored against the old answer: refused, naming the way out."""
    import shutil

    data = videomme_dir(tmp_path)
    s, _ = _videomme_run(data, tmp_path / "out")
    with open(tmp_path / "out" / "run.json") as f:
        cfg = json.load(f)
    assert len(cfg["dataset_fingerprint"]) == 16 and cfg["dataset_samples"] == 13
    moved = str(tmp_path / "moved")
    shutil.copytree(data, moved)                                  # the same data elsewhere: resumed
    s2, pipe = _videomme_run(moved, tmp_path / "out")
    assert pipe.asked == [] and s2["correct"] == s["correct"] == 6
    rows = json.load(open(os.path.join(moved, "videomme.json")))
    rows[0]["answer"] = "B"                                       # v1-1: the response "A" was right, now wrong
    open(os.path.join(moved, "videomme.json"), "w").write(json.dumps(rows))
    with pytest.raises(InputError, match=r"dataset changed.*--overwrite to start again"):
        _videomme_run(moved, tmp_path / "out")
    open(os.path.join(moved, "data", "v3.mp4"), "ab").write(b"more")  # a re-encoded video also counts
    rows[0]["answer"] = "A"
    open(os.path.join(moved, "videomme.json"), "w").write(json.dumps(rows))
    with pytest.raises(InputError, match="dataset changed"):
        _videomme_run(moved, tmp_path / "out")
    rows[0]["answer"] = "B"
    open(os.path.join(moved, "videomme.json"), "w").write(json.dumps(rows))
    s3, pipe = _videomme_run(moved, tmp_path / "out", overwrite=True)
    assert len(pipe.asked) == 9 and s3["correct"] == 5            # v1-1 now scored against "B"


def test_mvbench_main_branch_layout(tmp_path):
    """MVBench's own `main` layout (video/star/Charades_v1_480, ssv2_video, nturgbd,
    tvqa/frames_fps3_hq): found, and where it holds whole videos only [start, end] is sampled."""
    import numpy as np
    from PIL import Image

    from mmkv.evaluation.mvbench import MVBench
    from mmkv.synthetic import make_example, write_video

    root = tmp_path / "MVBench"
    for d in ("json", "video/star/Charades_v1_480", "video/star/Charades_segment", "video/ssv2_video",
              "video/nturgbd", "video/tvqa/frames_fps3_hq/t1"):
        (root / d).mkdir(parents=True)
    write_video(str(root / "video/star/Charades_v1_480/c1.mp4"), make_example(1, num_frames=64).frames, 2.0)  # 32 s
    (root / "video/star/Charades_segment/c2.mp4").write_bytes(b"x")     # lmms-eval's cut segment: taken whole
    (root / "video/star/Charades_v1_480/c2.mp4").write_bytes(b"x")
    (root / "video/ssv2_video/s1.webm").write_bytes(b"x")                # the row says s1.mp4
    (root / "video/nturgbd/n1.avi").write_bytes(b"x")
    for i in range(30):                                                  # 10 s of frames at 3 fps
        Image.fromarray(np.full((8, 8, 3), 8 * i, np.uint8)).save(root / f"video/tvqa/frames_fps3_hq/t1/{i:05d}.png")
    q = {"question": "Q?", "candidates": ["yes", "no"], "answer": "yes"}
    for task, rows in {"action_sequence": [{**q, "video": "c1.mp4", "start": 4, "end": 10},
                                           {**q, "video": "c2.mp4", "start": 1, "end": 2}],
                       "action_antonym": [{**q, "video": "s1.mp4"}],
                       "fine_grained_pose": [{**q, "video": "n1.avi"}],
                       "episodic_reasoning": [{**q, "video": "t1", "start": 2, "end": 6}]}.items():
        (root / "json" / f"{task}.json").write_text(json.dumps(rows))

    class Recording(ScriptedPipe):
        def encode(self, video, **kw):
            self.encoded.append(video)
            return _Enc(video)

    pipe = Recording({"Q?": "A"})
    s = run(MVBench(str(root)), str(tmp_path / "out"), pipe=pipe, frames=4, progress=False)
    assert s["answered"] == 5 and s["errors"]["count"] == 0
    c1, c2, t1, s1, n1 = pipe.encoded                                # lmms-eval's task order
    assert c1.indices.tolist() == [8, 12, 16, 20]                        # seconds 4..10 at 2 fps, 4 frames
    assert c1.timestamps.tolist() == [0, 2, 4, 6] and c1.sampled_fps == pytest.approx(4 / 13 * 2)
    assert c1.frames().shape[0] == 4
    assert c2 == str(root / "video/star/Charades_segment/c2.mp4")
    assert (s1, n1) == (str(root / "video/ssv2_video/s1.webm"), str(root / "video/nturgbd/n1.avi"))
    assert t1.frames()[:, 0, 0, 0].tolist() == [8 * i for i in (6, 10, 14, 18)]   # seconds 2..6 at 3 fps
    assert t1.timestamps.tolist() == pytest.approx([0, 4 / 3, 8 / 3, 4])
