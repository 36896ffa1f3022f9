"""The training script of the bundled model: a short run learns (the loss falls) and writes a
checkpoint that mmkv loads through from_pretrained, with its model card."""
import importlib.util
import json
import os

import numpy as np

import mmkv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    spec = importlib.util.spec_from_file_location("train_tiny", os.path.join(ROOT, "tools", "train_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_training_run_learns_and_saves(tmp_path):
    train = load_script()
    out = str(tmp_path / "m")
    res = train.main(["--steps", "24", "--max-frames", "32", "--threads", "2", "--eval-n", "0",
                      "--tokens-per-batch", "1024", "--out", out])
    losses = res["losses"]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    card = json.load(open(os.path.join(out, "mmkv.json")))
    assert card["trained"] is True and card["train"]["steps"] == 24
    pipe = mmkv.load(out)  # the real loading path: config -> adapter -> from_pretrained
    assert pipe.note == ""
    from mmkv.synthetic import make_example
    ex = make_example(3, 32)
    r = pipe.generate(ex.frames, ex.prompt, max_new_tokens=2)
    assert r.stats.visual_tokens_in == 64 and r.stats.prompt_tokens > 64  # (24 steps may answer with a bare stop token)


def test_patchify_matches_the_processor():
    train = load_script()
    model, proc = train.build_model(0)
    train.check_patchify(train.Batcher(proc), proc)  # raises if the fast path and the processor differ
