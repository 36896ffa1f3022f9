"""tools/train_hires.py: a few steps run, the checkpoint loads through mmkv and answers, the training
inputs are the ones mmkv feeds at inference, and the tiny builder's defaults are unchanged."""
import json
import os
import sys

import numpy as np
import pytest
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


def test_attention_targets_and_ranks_point_at_the_objects_the_answers_are_read_from():
    """Each supervised row predicts an answer word and targets the crop token of the object it is
    read from, checked against the pixels of that token's 14 px cell (found through the adapter's
    own token layout): locate and describe the needle (its colour is drawn there), count the last
    object of the needle's shape in reading order, whose rank is the count."""
    from mmkv.synthetic.long import COLORS

    model, proc = train_hires.build_model(0)
    b = train_hires.HiresBatcher(model, proc)
    coords = b.adapter._image_coords(10, torch.tensor([[252, 252]]))          # (t, h, w) per visual token

    def cell_pixels(ex, k):
        t, h, w = coords[k - len(b.head)].tolist()
        assert t == 1 and h >= 0                                              # a crop token, not the thumbnail
        return ex.image[h * 14:(h + 1) * 14, w * 14:(w + 1) * 14].reshape(-1, 3)

    def drawn(px, color):
        return int((px == np.array(COLORS[color])).all(1).sum())

    for seed in (5, 77, 1234):
        ex = make_hires_example(seed)
        inputs = b([ex])
        rows, targets = inputs["probe"]
        ids, labels = inputs["input_ids"][0], inputs["labels"][0]
        by_row = {}
        for r, t in zip(rows[0].tolist(), targets[0]):
            if r >= 0:
                (k,) = t.nonzero().flatten().tolist()
                assert int(ids[k]) == b.image_id and labels[r + 1] not in (-100, b.eos)
                by_row[r] = k
        spans = {q.kind: sp for q, sp in zip(ex.questions, inputs["spans"][0])}
        n = ex.needle
        for kind in ("locate", "describe"):
            a, e = spans[kind]
            assert sorted(r for r in by_row if a - 1 <= r < e) == [a - 1, a]   # both words, not end-of-turn
            assert all(drawn(cell_pixels(ex, by_row[r]), n.color) > 10 for r in (a - 1, a))
        a, e = spans["count"]
        assert a - 1 in by_row and a not in by_row                           # the number; the shape word: none
        k = by_row[a - 1]
        (obj,) = [it for it in ex.items if drawn(cell_pixels(ex, k), it.color) > 10 and it.cell == tuple(
            int(x) for x in coords[k - len(b.head), 1:])]
        later = [it for it in ex.items if it.shape == n.shape and int(b.cell_token[it.cell]) > k - len(b.head)]
        assert obj.shape == n.shape and not later                            # the last of the shape
        count = [q for q in ex.questions if q.kind == "count"][0].answer
        assert count.startswith(f"{int(b.ranks(ex)[k - len(b.head)])} ")


def test_stage_one_and_frozen_tower(tmp_path):
    """--vision-steps trains the tower alone first (its accuracies go to the card); with
    --freeze-vision and no stage 1 the tower and projector leave training exactly as built."""
    out = str(tmp_path / "m")
    train_hires.main(["--steps", "2", "--batch", "2", "--eval-n", "0", "--final-n", "0", "--out", out,
                      "--freeze-vision", "--rank-aux", "0.5", "--attn-sup", "1", *THREADS])
    from transformers import AutoModelForImageTextToText
    w = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    ref = train_hires.build_model(0)[0].state_dict()
    tower = [k for k in w if "vision_tower" in k or "multi_modal_projector" in k]
    assert tower and all(torch.equal(w[k], ref[k]) for k in tower)
    assert not all(torch.equal(w[k], ref[k]) for k in w if "language_model" in k)
    out2 = str(tmp_path / "v")
    train_hires.main(["--steps", "1", "--batch", "2", "--eval-n", "0", "--final-n", "0", "--out", out2,
                      "--vision-steps", "2", *THREADS])
    card = json.load(open(os.path.join(out2, "mmkv.json")))
    assert card["vision_stage"]["steps"] == 2 and set(card["vision_stage"]["token_accuracy"]) == {"color", "shape", "none", "crop"}


def test_head_size_and_rope_base_are_config_choices(tmp_path):
    """--heads 2 --kv-heads 2 --rope-theta 1e6: 64-dim heads and another RoPE base, saved in the
    checkpoint's config and loaded back; the defaults stay those of the tiny builder; a head count
    that does not divide the hidden size is refused."""
    from transformers import AutoModelForImageTextToText

    model, _ = train_hires.build_model(0, heads=2, kv_heads=2, rope_theta=1e6)
    d = str(tmp_path / "m")
    model.save_pretrained(d)
    cfg = AutoModelForImageTextToText.from_pretrained(d).config.text_config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_parameters["rope_theta"]) == (2, 2, 1e6)
    default = train_hires.build_model(0)[0].config.text_config
    assert (default.num_attention_heads, default.rope_parameters["rope_theta"]) == (4, 10000.0)
    with pytest.raises(ValueError, match="heads"):
        train_hires.build_model(0, heads=3)


def test_view_position_labels_are_the_crop_each_token_shows():
    """The stage-1 crop labels of every view token (thumbnail included) are the crop of the image
    part the token covers: the crop whose tint its pixels carry."""
    from mmkv.synthetic.hires import CROP, GRID, SIZE, crop_tint

    rows, cols = train_hires.view_positions()
    side = train_hires.SIDE
    for v in range(1 + GRID * GRID):
        for t in range(side * side):
            i, j = divmod(t, side)
            if v == 0:                                # thumbnail: token (i, j) covers SIZE / side px
                y, x = (i + 0.5) * SIZE / side, (j + 0.5) * SIZE / side
            else:
                y = (v - 1) // GRID * CROP + (i + 0.5) * CROP / side
                x = (v - 1) % GRID * CROP + (j + 0.5) * CROP / side
            assert (int(rows[v, t]), int(cols[v, t])) == (int(y // CROP), int(x // CROP)), (v, t)
    assert crop_tint(2, 1) == (train_hires.TINT_STEP, 0, 2 * train_hires.TINT_STEP)
