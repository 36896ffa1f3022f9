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
