"""tools/train_hires.py: a few steps run, the checkpoint loads through mmkv and answers, the training
inputs are the ones mmkv feeds at inference, and the tiny builder's defaults are unchanged."""
import json
import os
import sys

import numpy as np
import torch

import mmkv
from mmkv.synthetic.hires import make_hires_example

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import train_hires  # noqa: E402

THREADS = ["--threads", str(torch.get_num_threads())]   # keep the suite's thread count


def test_a_few_steps_train_and_the_checkpoint_loads(tmp_path):
    out = str(tmp_path / "m")
    res = train_hires.main(["--steps", "3", "--batch", "2", "--eval-n", "0", "--final-n", "2", "--out", out,
                            *THREADS])
    assert len(res["losses"]) == 3 and all(np.isfinite(res["losses"]))
    card = json.load(open(os.path.join(out, "mmkv.json")))
    assert card["trained"] and card["train"]["steps"] == 3 and set(card["validation"]) >= {"locate", "count"}
    assert sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) < 8e6      # a few MB
    from PIL import Image
    pipe = mmkv.load(out)
    assert pipe.adapter.family == "llava-onevision"
    r = pipe.generate(Image.fromarray(make_hires_example(1_000_000).image), "Where is the red circle?",
                      max_new_tokens=3)
    assert r.stats.visual_tokens_in == 378 and isinstance(r.text, str)


def test_training_inputs_are_what_mmkv_feeds():
    """The batcher's pixels equal the processor's (check_pixels) and its first-turn token ids equal
    the mmkv pipeline's prompt for the same image and question."""
    from PIL import Image

    model, proc = train_hires.build_model(0)
    assert model.config.image_grid_pinpoints[-1] == [252, 252]
    b = train_hires.HiresBatcher(model, proc)
    train_hires.check_pixels(b, proc)
    ex = make_hires_example(123)
    ids, labels, spans = b.conversation(ex)
    a = b.adapter
    vt = a.encode_image(Image.fromarray(ex.image))
    prefix = a.prefix(vt).ids.tolist()
    first = prefix + a.suffix(ex.questions[0].text, "image", len(prefix)).ids.tolist()
    assert ids[:len(first)] == first and spans[0][0] == len(first)
    assert proc.tokenizer.decode(ids[spans[1][0]:spans[1][1] - 1]) == ex.questions[1].answer
    col, shp = b.token_labels(ex)
    n = ex.needle
    (cy, cx), (gy, gx) = n.crop, n.cell
    assert col.shape == (10, 36) and int((shp > 0).sum()) == len(ex.items)
    assert shp[1 + 3 * cy + cx, (gy % 6) * 6 + gx % 6] > 0


def test_tiny_onevision_defaults_unchanged():
    from mmkv.models.tiny import make_tiny

    model, _ = make_tiny("llava_onevision")
    assert model.config.image_grid_pinpoints == [[56, 56], [56, 112], [112, 56], [112, 112]]
    assert model.config.vision_config.hidden_size == 32 and model.config.vision_config.image_size == 56


def test_training_is_deterministic(tmp_path):
    a = train_hires.main(["--steps", "2", "--batch", "2", "--eval-n", "0", "--final-n", "0", "--out",
                          str(tmp_path / "a"), *THREADS])
    b = train_hires.main(["--steps", "2", "--batch", "2", "--eval-n", "0", "--final-n", "0", "--out",
                          str(tmp_path / "b"), *THREADS])
    assert a["losses"] == b["losses"]
    from safetensors.torch import load_file
    wa, wb = (load_file(str(tmp_path / x / "model.safetensors")) for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
