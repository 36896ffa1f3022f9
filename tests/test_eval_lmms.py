"""The lmms-eval plugin against the real lmms-eval package: its registry finds the model, and
`accelerate launch --num_processes 2 -m lmms_eval --model mmkv` runs on the CPU (gloo) with the
bundled model on the offline needle task (mmkv.evaluation.lmms_task), giving the pipeline's answers.

lmms-eval is not a dependency of mmkv (it pins av<16): these tests are skipped where it is not
installed. To run them, in a separate virtual environment:
    pip install lmms-eval && pip install -e . --no-deps && python -m pytest tests/test_eval_lmms.py
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install lmms-eval, in its own venv)")

FRAMES, NEW = 8, 4


def test_registry_resolves_the_plugin_class():
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    from mmkv.evaluation.lmms_plugin import MMKVCore

    cls = get_model("mmkv")                         # via the lmms_eval.models entry point
    assert issubclass(cls, lmms) and issubclass(cls, MMKVCore)


def test_single_process_model_has_what_the_evaluator_reads(monkeypatch):
    import torch
    from lmms_eval.models import get_model

    import mmkv

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = get_model("mmkv").create_from_arg_string(f"max_num_frames={FRAMES}", {"batch_size": 1})
    assert isinstance(model.device, torch.device) and model.device == torch.device(model.pipe.adapter.device)
    assert (model.rank, model.world_size, model.is_simple) == (0, 1, True)
    assert isinstance(model.pipe, mmkv.Pipeline)


def test_two_processes_with_accelerate_on_cpu(tmp_path):
    from mmkv.evaluation.lmms_task import TASK, doc_to_text, write_task

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate launcher is not on PATH")
    rows = write_task(str(tmp_path / "task"), n=3)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "lmms_eval", "--model", "mmkv", "--model_args",
           f"max_num_frames={FRAMES}", "--include_path", str(tmp_path / "task"), "--tasks", TASK, "--batch_size", "1",
           "--log_samples", "--output_path", str(tmp_path / "logs")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    log = out[-6000:]
    assert p.returncode == 0, log
    assert "Running on rank 1" in out and "Error during evaluation" not in out, log
    (res_file,) = glob.glob(str(tmp_path / "logs" / "**" / "*_results.json"), recursive=True)  # lmms-eval exits 0
    (samples_file,) = glob.glob(str(tmp_path / "logs" / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    with open(samples_file) as f:
        samples = {s["doc_id"]: s for s in map(json.loads, f)}
    assert sorted(samples) == list(range(len(rows)))                  # every doc answered once, over 2 ranks
    import mmkv

    pipe = mmkv.load("mmkv-tiny")
    for i, row in enumerate(rows):                                    # the pipeline's own answers
        want = pipe.ask(pipe.encode(row["video"], frames=FRAMES), doc_to_text(row), max_new_tokens=NEW).text
        assert samples[i]["filtered_resps"] == want.strip() or samples[i]["filtered_resps"] == want, (i, want)
    with open(res_file) as f:
        acc = json.load(f)["results"][TASK]["acc,none"]
    assert acc == pytest.approx(sum(s["acc"] for s in samples.values()) / len(rows))


def _task_yaml(name: str) -> dict:
    """A task config of the installed lmms-eval, its `include` merged in (!function lines read as text)."""
    import importlib

    import yaml

    folder = os.path.dirname(importlib.import_module(f"lmms_eval.tasks.{name.split('/')[0]}.utils").__file__)

    def load(fn):
        with open(os.path.join(folder, fn)) as f:
            cfg = yaml.safe_load(f.read().replace("!function ", ""))
        return {**(load(cfg.pop("include")) if "include" in cfg else {}), **cfg}

    return load(name.split("/")[1])


def test_videomme_long_is_the_subtitle_prompt_at_32_frames(tmp_path, monkeypatch):
    """lmms-eval's `videomme_long` = `--duration long --subtitles` (subtitles at 32 frames)."""
    from lmms_eval.tasks.videomme import utils as vutils

    from mmkv.evaluation.runner import run
    from mmkv.evaluation.videomme import VideoMME
    from mmkv.synthetic import make_example, write_video

    cfg = _task_yaml("videomme/videomme_long.yaml")
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    assert cfg["doc_to_text"] == "utils.videomme_doc_to_text_subtitle" and kwargs["frame_num"] == 32
    assert cfg["process_docs"] == "utils.videomme_process_docs_long"
    root = tmp_path / "hf" / vutils.cache_name                     # lmms-eval's layout: data/, subtitle/
    (root / "data").mkdir(parents=True)
    (root / "subtitle").mkdir()
    rows = []
    for vid, duration in (("L1", "long"), ("S1", "short")):
        write_video(str(root / "data" / f"{vid}.mp4"), make_example(3, num_frames=64).frames, 2.0)  # 32 s
        rows.append({"videoID": vid, "question_id": f"{vid}-1", "duration": duration, "domain": "d",
                     "sub_category": "s", "task_type": "t", "question": "What?",
                     "options": ["A. a", "B. b", "C. c", "D. d"], "answer": "A"})
    cues = [(0, 1, "first"), (5, 5.2, "between two sampled frames"), (10, 14, "middle"), (31, 32, "last")]
    (root / "subtitle" / "L1.srt").write_text("".join(
        f'{i + 1}\n00:00:{a:06.3f} --> 00:00:{b:06.3f}\n<font color="white" size=".72c">{t}</font>\n\n'.replace(".", ",")
        for i, (a, b, t) in enumerate(cues)))
    (root / "videomme.json").write_text(json.dumps(rows))
    monkeypatch.setattr(vutils, "base_cache_dir", str(tmp_path / "hf"))

    class Echo:  # answers every question with its prompt
        model_name = "echo"

        def encode(self, video, **kw):
            return types.SimpleNamespace(media=None)   # the subtitles' frame count comes from OpenCV

        def ask(self, enc, prompt, **kw):
            import mmkv
            return mmkv.Result(text=prompt, stats=mmkv.Stats())

    import datasets

    ds = datasets.Dataset.from_list(rows)
    long_docs = list(vutils.videomme_process_docs_long(ds))
    s = run(VideoMME(str(root), subtitles=True, durations=["long"]), str(tmp_path / "out"), pipe=Echo(),
            progress=False)
    recs = read_all(tmp_path / "out")
    assert [d["videoID"] for d in long_docs] == [r["video_id"] for r in recs] == ["L1"] and s["n"] == 1
    want = vutils.videomme_doc_to_text_subtitle(long_docs[0], kwargs)
    assert "middle" in want and "between two" not in want         # the subtitles of the 32 sampled frames
    assert recs[0]["prompt"] == want


def read_all(out):
    from mmkv.evaluation.runner import read_records

    return read_records(str(out / "samples.jsonl"))


def test_mvbench_folders_match_lmms_eval():
    from lmms_eval.tasks.mvbench import utils as mutils

    from mmkv.evaluation.mvbench import DATA_LIST, TASKS

    assert DATA_LIST == mutils.DATA_LIST
    group = _task_yaml("mvbench/mvbench.yaml")
    assert list(TASKS) == [t.removeprefix("mvbench_") for t in group["task"]]
