"""Invariant 1: with the empty recipe, mmkv produces exactly plain greedy `model.generate`."""
import numpy as np
import pytest
import torch
from PIL import Image

import mmkv
from mmkv.models.qwen2_vl import use_released_layout
from conftest import frames_for, hf_inputs, strip_eos

QUESTION = "What is happening in this video?"


def hf_greedy(model, inputs, n):
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_video_matches_plain_generate(family, hf_models, pipes):
    model, proc = hf_models[family]
    video = frames_for(family, n=8, seed=1)
    ref = hf_greedy(model, hf_inputs(family, proc, QUESTION, video=video), 12)
    res = pipes[family].generate(video, QUESTION, max_new_tokens=12)
    assert res.tokens == strip_eos(ref, pipes[family].adapter.stop_ids())
    assert res.stats.visual_tokens[-1][2] == res.stats.visual_tokens[0][1]


def test_odd_frame_count_matches(family, hf_models, pipes):
    """An odd number of frames (Qwen pads the last temporal pair) still matches."""
    model, proc = hf_models[family]
    video = frames_for(family, n=5, seed=2)
    ref = hf_greedy(model, hf_inputs(family, proc, QUESTION, video=video), 8)
    assert pipes[family].generate(video, QUESTION, max_new_tokens=8).tokens == \
        strip_eos(ref, pipes[family].adapter.stop_ids())


def test_image_matches_plain_generate(family, hf_models, pipes):
    model, proc = hf_models[family]
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))  # non-square: AnyRes crops
    ref = hf_greedy(model, hf_inputs(family, proc, "Describe the image.", image=image), 10)
    res = pipes[family].generate(image, "Describe the image.", max_new_tokens=10)
    assert res.tokens == strip_eos(ref, pipes[family].adapter.stop_ids())


def test_chunked_encoding_equals_whole(family, tiny_dir, pipes):
    """The vision tower run chunk by chunk gives the same answer and the same logits."""
    video = frames_for(family, n=10, seed=4)
    whole = pipes[family].generate(video, QUESTION, max_new_tokens=6, output_scores=True)
    chunked = mmkv.load(tiny_dir[family], chunk_frames=2).generate(video, QUESTION, max_new_tokens=6,
                                                                    output_scores=True)
    assert chunked.tokens == whole.tokens
    torch.testing.assert_close(torch.stack(chunked.scores), torch.stack(whole.scores), atol=1e-4, rtol=1e-4)


def test_eager_base_attention_matches(tiny_dir, hf_models):
    """attn_implementation is passed through: eager in mmkv equals eager in plain HF."""
    fam = "qwen2_5_vl"
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir[fam], attn_implementation="eager").eval()
    use_released_layout(model)   # mmkv's M-RoPE layout (tests/test_rope_layout.py)
    proc = hf_models[fam][1]
    video = frames_for(fam, n=6, seed=5)
    ref = hf_greedy(model, hf_inputs(fam, proc, QUESTION, video=video), 8)
    pipe = mmkv.load(tiny_dir[fam], attn_implementation="eager")
    assert pipe.base_attn == "eager"
    assert pipe.generate(video, QUESTION, max_new_tokens=8).tokens == strip_eos(ref, pipe.adapter.stop_ids())


def test_prompt_split_tokenizes_like_whole(family, pipes, hf_models):
    """Prefix + question tokenized apart equal the processor's tokenization of the whole prompt."""
    pipe = pipes[family]
    _, proc = hf_models[family]
    video = frames_for(family, n=4, seed=6)
    enc = pipe.encode(video)
    suffix = pipe.adapter.suffix(QUESTION, "video", enc.prefix.next_text_position)
    ids = torch.cat([enc.prefix.ids, suffix.ids])
    assert ids.tolist() == hf_inputs(family, proc, QUESTION, video=video)["input_ids"][0].tolist()


def test_positions_are_the_models_own(family, pipes, hf_models):
    """Prompt positions (prefix + question) equal what the model itself computes for the prompt."""
    pipe = pipes[family]
    model, proc = hf_models[family]
    video = frames_for(family, n=6, seed=7)
    enc = pipe.encode(video)
    suffix = pipe.adapter.suffix(QUESTION, "video", enc.prefix.next_text_position)
    got = torch.cat([enc.prefix.positions, suffix.positions], 1)
    inputs = hf_inputs(family, proc, QUESTION, video=video)
    if family == "llava_onevision":
        want = torch.arange(inputs["input_ids"].shape[1])[None]
    else:
        extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
        want = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                          video_grid_thw=inputs["video_grid_thw"], **extra)[0][:, 0]
    assert torch.equal(got, want)


def test_conversation_matches_plain_generate(family, hf_models, pipes):
    """chat(): the second question sees the first question and its answer: its tokens equal plain
    greedy generate over [video, question 1, answer 1, the template's turn text, question 2]; the
    first answer equals ask(); the encoding is left as it was."""
    model, proc = hf_models[family]
    pipe = pipes[family]
    video = frames_for(family, n=6, seed=8)
    enc = pipe.encode(video)
    conv = pipe.chat(enc)
    r1 = conv.ask(QUESTION, max_new_tokens=5)
    assert r1.tokens == pipe.ask(enc, QUESTION, max_new_tokens=5).tokens
    r2 = conv.ask("And then?", max_new_tokens=6)
    inputs = hf_inputs(family, proc, QUESTION, video=video)
    turn = pipe.adapter.next_turn("And then?", "video", 0)
    extra = torch.tensor([r1.tokens + turn.ids.tolist()])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    ref = hf_greedy(model, inputs, 6)
    assert r2.tokens == strip_eos(ref, pipe.adapter.stop_ids())
    assert [q for q, _ in conv.turns] == [QUESTION, "And then?"]
    assert pipe.ask(enc, QUESTION, max_new_tokens=5).tokens == r1.tokens   # the encoding is untouched
