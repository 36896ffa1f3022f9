"""Qwen's M-RoPE layout: mmkv places the text after a video after the video's largest position
(Qwen's released code, vLLM, transformers 4.x), not where transformers 5's get_rope_index puts it
(the video's start + max(h, w) / merge, inside a long video's temporal range)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import frames_for, hf_inputs, strip_eos
from mmkv.models.qwen2_vl import released_layout, rope_index

QWEN = ("qwen2_vl", "qwen2_5_vl")
QUESTION = "What is happening in this video?"


def plain_positions(model, inputs):
    """transformers' own get_rope_index, whatever the instance was patched with."""
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    grids = {k: inputs[k] for k in ("video_grid_thw", "image_grid_thw") if k in inputs}
    return type(model.model).get_rope_index(model.model, inputs["input_ids"], inputs["mm_token_type_ids"],
                                            **grids, **extra)[0]


@pytest.mark.parametrize("family", QWEN)
def test_text_after_a_long_video_continues_after_its_largest_position(family, hf_models):
    model, proc = hf_models[family]
    inputs = hf_inputs(family, proc, QUESTION, video=frames_for(family, n=22, seed=1))   # 11 slots > 4
    raw = plain_positions(model, inputs)
    got = released_layout(raw.clone(), inputs["mm_token_type_ids"])[:, 0]
    vis = (inputs["mm_token_type_ids"][0] == 2).nonzero()[:, 0]
    first, last = int(vis[0]), int(vis[-1])
    assert torch.equal(got[:, :last + 1], raw[:, 0, :last + 1])                  # the video and before: as given
    after = got[:, last + 1:]
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], after[2])   # text: one position, 3 axes
    assert int(after[0, 0]) == int(got[:, first:last + 1].max()) + 1             # right after the video
    assert torch.equal(after[0], torch.arange(int(after[0, 0]), int(after[0, 0]) + after.shape[1]))
    assert int(after[0, 0]) > int(raw[0, 0, last + 1])                           # transformers 5: inside it
    # idempotent, and the same through rope_index
    assert torch.equal(released_layout(got[:, None].clone(), inputs["mm_token_type_ids"])[:, 0], got)
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    assert torch.equal(rope_index(model, inputs["input_ids"], inputs["mm_token_type_ids"],
                                  video_grid_thw=inputs["video_grid_thw"], **extra)[:, 0], got)
    with pytest.raises(ValueError, match="rope layout"):
        rope_index(model, inputs["input_ids"], inputs["mm_token_type_ids"], layout="v4",
                   video_grid_thw=inputs["video_grid_thw"])


@pytest.mark.parametrize("family", QWEN)
def test_images_and_short_videos_are_the_same_in_both_layouts(family, hf_models):
    model, proc = hf_models[family]
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (100, 150, 3), dtype=np.uint8))
    cases = [hf_inputs(family, proc, "Describe the image.", image=image)]
    if family == "qwen2_vl":   # 4 slots at positions 0-3 (Qwen2.5-VL spaces them by seconds: more)
        cases.append(hf_inputs(family, proc, QUESTION, video=frames_for(family, n=8, seed=2)))
    for inputs in cases:
        raw = plain_positions(model, inputs)
        assert torch.equal(released_layout(raw.clone(), inputs["mm_token_type_ids"]), raw)


@pytest.mark.parametrize("family", QWEN)
def test_mmkv_on_a_long_video_matches_generate_in_either_layout(family, tiny_dir, hf_models, pipes):
    """Default: equal to `generate` of a model with the released layout (`use_released_layout`,
    as tests/conftest.py's hf_models); `rope_layout = "transformers"`: equal to transformers 5's
    `generate` unpatched. The two layouts give the question different positions."""
    patched, proc = hf_models[family]
    video = frames_for(family, n=22, seed=3)
    inputs = hf_inputs(family, proc, QUESTION, video=video)
    pipe = pipes[family]
    stop = pipe.adapter.stop_ids()

    def greedy(model):
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        return strip_eos(out[0, inputs["input_ids"].shape[1]:].tolist(), stop)

    res = pipe.generate(video, QUESTION, max_new_tokens=10, output_scores=True)
    assert pipe.adapter.rope_layout == "released" and res.tokens == greedy(patched)
    plain = AutoModelForImageTextToText.from_pretrained(tiny_dir[family], dtype=torch.float32).eval()
    enc = pipe.encode(video)
    try:
        pipe.adapter.rope_layout = "transformers"
        old = pipe.generate(video, QUESTION, max_new_tokens=10, output_scores=True)
        enc_old = pipe.encode(video)
    finally:
        pipe.adapter.rope_layout = "released"
    assert old.tokens == greedy(plain)
    assert enc.prefix.next_text_position > enc_old.prefix.next_text_position
    assert not torch.allclose(torch.stack(res.scores), torch.stack(old.scores))


def test_a_checkpoint_card_names_the_layout_it_was_trained_in(tiny_dir, tmp_path):
    """tools/train_long.py writes `train.rope_layout` into mmkv.json; loading reads it back, so a
    checkpoint trained in transformers 5's layout is answered in that layout."""
    import json
    import shutil

    import mmkv

    d = str(tmp_path / "q")
    shutil.copytree(tiny_dir["qwen2_vl"], d)
    assert mmkv.load(d).adapter.rope_layout == "released"
    with open(f"{d}/mmkv.json", "w") as f:
        json.dump({"trained": True, "train": {"rope_layout": "transformers"}}, f)
    assert mmkv.load(d).adapter.rope_layout == "transformers"
    with open(f"{d}/mmkv.json", "w") as f:
        json.dump({"trained": True, "train": {"rope_layout": "v4"}}, f)
    with pytest.raises(mmkv.ModelError, match="rope_layout"):
        mmkv.load(d)
