"""The batch runner with a real (tiny, random) model: the synthetic needle set evaluated unchanged,
resume after a crash, data parallel with two processes on CPU, and the lmms-eval plugin.

The model has random weights: these tests check the bookkeeping (records, encodings, resume,
merge, errors), never accuracy values."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from mmkv.evaluation.runner import read_records, run
from mmkv.evaluation.videomme import VideoMME

FRAMES, NEW = 4, 4
FAMILY = "qwen2_vl"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A Video-MME folder: videos v1 (2 questions), bad (unreadable, 1), v2 (2), v3 (1)."""
    from mmkv.synthetic import make_example, write_video

    root = tmp_path_factory.mktemp("vmme")
    rows = []
    for vid, seed, nq in (("v1", 1, 2), ("bad", 0, 1), ("v2", 2, 2), ("v3", 3, 1)):
        if vid == "bad":
            (root / "bad.mp4").write_bytes(b"this is not a video file" * 10)
        else:
            ex = make_example(seed, num_frames=32)
            write_video(str(root / f"{vid}.mp4"), ex.frames)
        for q in range(nq):
            ex = make_example(seed * 10 + q, num_frames=32, render_frames=False)
            rows.append({**ex.row(vid), "question_id": f"{vid}-{q}", "duration": ["short", "long"][q % 2]})
    (root / "videomme.json").write_text(json.dumps(rows))
    return str(root)


class Counting:
    """A Pipeline proxy that counts encode/ask calls and can crash on the n-th ask."""

    def __init__(self, pipe, crash_at=None):
        self.pipe, self.crash_at, self.encodes, self.asks = pipe, crash_at, 0, 0
        self.model_name = pipe.model_name

    def encode(self, video, **kw):
        self.encodes += 1
        return self.pipe.encode(video, **kw)

    def ask(self, enc, prompt, **kw):
        self.asks += 1
        if self.crash_at is not None and self.asks == self.crash_at:
            raise KeyboardInterrupt  # the process is killed here
        return self.pipe.ask(enc, prompt, **kw)


def _run(data, out, pipe, **kw):
    return run(VideoMME(data), str(out), pipe=pipe, frames=FRAMES, max_new_tokens=NEW, progress=False, **kw)


def _answers(path):
    return [(r["key"], r["status"], r.get("response"), r.get("pred"), r.get("correct"))
            for r in read_records(path)]


def test_synthetic_dataset_evaluated_unchanged(tmp_path, pipes):
    from mmkv.synthetic import make_example, write_dataset

    write_dataset(str(tmp_path / "needles"), n=3, num_frames=32, seed=7)
    pipe = Counting(pipes[FAMILY])
    s = run(VideoMME(str(tmp_path / "needles")), str(tmp_path / "out"), pipe=pipe, frames=FRAMES,
            max_new_tokens=NEW, progress=False)
    assert (s["n"], s["answered"], s["errors"]["count"], pipe.encodes, pipe.asks) == (3, 3, 0, 3, 3)
    recs = read_records(str(tmp_path / "out" / "samples.jsonl"))
    for i, r in enumerate(recs):
        ex = make_example(7 + i, 32, task=r["group"]["task_type"], render_frames=False)
        assert r["prompt"] == ex.prompt and r["answer"] == ex.answer       # the generator's own prompt
        assert r["pred"] in ("", "A", "B", "C", "D") and r["correct"] == int(r["pred"] == ex.answer)
        st = r["stats"]
        assert st["frames"] == FRAMES and 0 < st["visual_tokens_kept"] <= st["visual_tokens_in"]
        assert st["kv_bytes"] > 0 and st["prefill_s"] > 0 and st["peak_memory_bytes"] > 0
    # the runner's answer is the public API's answer (encode once, ask)
    p = pipes[FAMILY]
    video = os.path.join(str(tmp_path / "needles"), recs[0]["video_id"] + ".mp4")
    assert recs[0]["response"] == p.ask(p.encode(video, frames=FRAMES), recs[0]["prompt"], max_new_tokens=NEW).text
    assert s["groups"]["domain"]["Synthetic"]["n"] == 3


@pytest.fixture(scope="module")
def reference(data, pipes, tmp_path_factory):
    """One uninterrupted single-process run: (output folder, the counting pipe)."""
    out = tmp_path_factory.mktemp("ref")
    ref = Counting(pipes[FAMILY])
    _run(data, out, ref)
    return out, ref


def test_resume_after_crash(tmp_path, data, pipes, reference):
    ref_out, ref = reference
    assert (ref.encodes, ref.asks) == (4, 5)     # 4 videos tried (one unreadable), 5 questions asked
    ref_answers = _answers(str(ref_out / "samples.jsonl"))
    bad = [a for a in ref_answers if a[0] == "bad-0"][0]
    assert bad[1] == "error"
    rec = [r for r in read_records(str(ref_out / "samples.jsonl")) if r["key"] == "bad-0"][0]
    assert rec["reason"] == "unreadable video" and rec["error_kind"] == "data"

    out = tmp_path / "crashed"
    crashing = Counting(pipes[FAMILY], crash_at=4)   # dies on v2's second question
    with pytest.raises(KeyboardInterrupt):
        _run(data, out, crashing)
    shard_file = out / "samples.rank0.jsonl"
    assert [r["key"] for r in read_records(str(shard_file))] == ["v1-0", "v1-1", "bad-0", "v2-0"]
    with open(shard_file, "a") as f:                # the kill also tore a half-written line
        f.write('{"key": "v2-1", "status": "o')
    again = Counting(pipes[FAMILY])
    s = _run(data, out, again)
    assert (again.encodes, again.asks) == (2, 2)     # v2 (its remaining question) and v3 only
    assert _answers(str(out / "samples.jsonl")) == ref_answers
    assert len(read_records(str(shard_file))) == 6 and s["complete"]
    with open(shard_file) as f:                      # the torn line was cut, every line is JSON
        assert all(json.loads(line) for line in f)


def test_two_processes_on_cpu_merge_like_one(tmp_path, data, tiny_dir, reference):
    """Data parallel as under `accelerate launch`: RANK/WORLD_SIZE set, one process per shard."""
    single = reference[0]
    out = tmp_path / "dp"
    procs = []
    for rank in (1, 0):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "mmkv.cli", "eval", "videomme", data, "--model", tiny_dir[FAMILY], "--out",
               str(out), "--frames", str(FRAMES), "--max-new-tokens", str(NEW), "--merge-timeout", "300", "--json"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert outs[0][0] == ""                          # rank 1 prints nothing; rank 0 the summary
    summary = json.loads(outs[1][0])
    ranks = {r["key"]: r["rank"] for r in read_records(str(out / "samples.jsonl"))}
    assert ranks == {"v1-0": 0, "v1-1": 0, "bad-0": 1, "v2-0": 0, "v2-1": 0, "v3-0": 1}
    assert _answers(str(out / "samples.jsonl")) == _answers(str(single / "samples.jsonl"))
    assert summary["complete"] and summary["answered"] == 5


# ----------------------------------------------------------------------------- lmms-eval plugin
def test_plugin_module_does_not_import_lmms_eval(monkeypatch):
    import importlib

    import mmkv.evaluation.lmms_plugin as plugin

    monkeypatch.setitem(sys.modules, "lmms_eval", None)   # any `import lmms_eval` now fails
    plugin = importlib.reload(plugin)                      # ... but importing the plugin does not
    monkeypatch.setattr(plugin, "_CLASS", None)
    assert plugin.MODEL_ID == "mmkv" and plugin.MMKVCore.is_simple
    with pytest.raises(ImportError):
        plugin.MMKV                                        # the lmms subclass needs lmms-eval


def test_plugin_entry_point_declared():
    import importlib
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["lmms_eval.models"]
    module, attr = eps["mmkv"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.fixture
def fake_lmms_eval(monkeypatch):
    """Just enough of lmms-eval's API (the `lmms` base class, ModelManifest) to load the plugin."""
    import abc
    from dataclasses import dataclass

    class lmms(abc.ABC):  # noqa: N801 - lmms-eval's name
        is_simple = True

        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    mods = {n: types.ModuleType(n) for n in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model",
                                              "lmms_eval.models", "lmms_eval.models.registry_v2")}
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    import mmkv.evaluation.lmms_plugin as plugin
    monkeypatch.setattr(plugin, "_CLASS", None)
    return lmms


def test_plugin_answers_like_the_pipeline(fake_lmms_eval, data, pipes):
    import importlib

    from mmkv.evaluation import lmms_plugin

    (manifest,) = lmms_plugin.manifests()
    module, cls_name = manifest.simple_class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)      # what lmms-eval's registry does
    assert issubclass(cls, fake_lmms_eval) and manifest.model_id == "mmkv"
    pipe = pipes[FAMILY]
    model = cls(max_num_frames=FRAMES, pipe=pipe)
    docs = json.load(open(os.path.join(data, "videomme.json")))
    docs = [d for d in docs if d["videoID"] != "bad"]
    model.task_dict = {"videomme": {"test": docs}}
    to_visual = lambda d: [os.path.join(data, d["videoID"] + ".mp4")]  # noqa: E731
    prompts = [f"Question {i}: what happens?" for i in range(len(docs))]

    class Req:
        def __init__(self, i):
            self.args = (prompts[i], {"max_new_tokens": NEW, "temperature": 0, "until": ["\n\n"]}, to_visual, i,
                         "videomme", "test")

    order = [4, 0, 2, 1, 3]  # lmms-eval may hand requests in any order: answers keep it
    out = model.generate_until([Req(i) for i in order])
    assert model.encodes == 3                                      # v1, v2, v3: one encoding per video
    encs = {}
    for i, text in zip(order, out):
        video = to_visual(docs[i])[0]
        if video not in encs:
            encs[video] = pipe.encode(video, frames=FRAMES)
        assert text == pipe.ask(encs[video], prompts[i], max_new_tokens=NEW).text
    with pytest.raises(NotImplementedError):
        model.loglikelihood([])
    with pytest.raises(ValueError, match="unknown model_args"):
        cls(pipe=pipe, bogus=1)


def test_plugin_loads_one_visual_at_a_time(fake_lmms_eval, pipes):
    """A task whose doc_to_visual returns decoded frames (lmms-eval's MVBench frame folders): each
    video is loaded right before its encoding, never all of them first."""
    from PIL import Image

    from mmkv.evaluation.lmms_plugin import MMKV
    from mmkv.synthetic import make_example

    events = []
    frames = make_example(1, num_frames=32).frames[:FRAMES]

    def to_visual(doc):
        events.append("load")
        return [Image.fromarray(f) for f in frames]

    class Logging(Counting):
        def encode(self, video, **kw):
            events.append("encode")
            return super().encode(video, **kw)

    pipe = Logging(pipes[FAMILY])
    model = MMKV(max_num_frames=FRAMES, pipe=pipe)
    docs = [{"video": f"clip{k}", "question": f"Q{i}"} for i, k in enumerate((0, 0, 1, 2, 2, 3))]
    model.task_dict = {"mvbench_x": {"train": docs}}

    class Req:
        def __init__(self, i):
            self.args = (f"Question {i}?", {"max_new_tokens": NEW, "until": ["\n\n"]}, to_visual, i, "mvbench_x", "train")

    out = model.generate_until([Req(i) for i in range(len(docs))])
    assert events == ["load", "encode"] * 4                    # 4 videos: one load per encoding, in turn
    assert (model.loads, model.encodes, pipe.asks) == (4, 4, 6) and len(out) == 6
    assert out[0] == pipe.pipe.ask(pipe.pipe.encode([Image.fromarray(f) for f in frames], frames=FRAMES),
                                   "Question 0?", max_new_tokens=NEW).text


def test_offline_lmms_task_files(tmp_path):
    """The files `python -m mmkv.evaluation.lmms_task` writes (run under lmms-eval in test_eval_lmms.py)."""
    import yaml

    from mmkv.evaluation import lmms_task
    from mmkv.synthetic import make_example

    rows = lmms_task.write_task(str(tmp_path), n=2)
    with open(tmp_path / "mmkv_needle.yaml") as f:
        cfg = yaml.safe_load(f.read().replace("!function ", ""))
    rows_path = cfg["dataset_kwargs"]["data_files"]["test"]
    assert cfg["task"] == "mmkv_needle" and os.path.isabs(rows_path)
    assert [json.loads(line) for line in open(rows_path)] == rows
    assert [r["video"] for r in rows] == [str(tmp_path / f"{r['videoID']}.mp4") for r in rows]
    assert rows[2]["video"] == rows[0]["video"] and rows[2]["question"] != rows[0]["question"]
    ex = make_example(1_000_000, 32, task="shape")   # the same frames as rows[0]'s ("color") example
    assert rows[2]["answer"] == ex.answer and os.path.exists(rows[0]["video"])
    assert (ex.frames == make_example(1_000_000, 32, task="color").frames).all()
    assert "from mmkv.evaluation.lmms_task import" in (tmp_path / "utils.py").read_text()
    assert lmms_task.process_results(rows[0], [f"{rows[0]['answer']}."]) == {"acc": 1.0}
    assert lmms_task.process_results(rows[0], ["no idea"]) == {"acc": 0.0}
