"""Invariant 2: positions survive eviction.

A run with sink + recent eviction must equal the plain HF model run on the whole sequence with
attention restricted to the kept tokens: prompt rows see the full causal prefix (prefill is dense),
and each generated token sees only the sink, the last `recent` entries and itself, all at their
ORIGINAL positions (3-D M-RoPE for Qwen, 1-D for LLaVA). Wrong positions, a wrong mask, or
positions derived from the compressed cache length would all change the logits."""
import pytest
import torch

import mmkv
from mmkv.models.qwen2_vl import use_released_layout
from conftest import frames_for, hf_inputs

QUESTION = "What is happening in this video?"


def reference_logits(family, model, inputs, generated, sink, recent):
    ids = inputs["input_ids"]
    p = ids.shape[1]
    full = torch.cat([ids, torch.tensor([generated[:-1]])], 1)
    n = full.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    for q in range(p, n):
        row = torch.zeros(n, dtype=torch.bool)
        row[:sink] = True
        row[max(0, q - recent):q + 1] = True
        allowed[q] = row & allowed[q]
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.inference_mode():  # the video features through the model's own code, placed in the prompt only
        if family == "llava_onevision":
            feats = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output.flatten(0, 1)
            if feats.shape[0] == int((ids == model.config.video_token_id).sum()) - 1:  # transformers < 5.2x
                feats = torch.cat([feats, model.model.image_newline[None]])
        else:
            feats = torch.cat(model.model.get_video_features(inputs["pixel_values_videos"],
                                                             inputs["video_grid_thw"]).pooler_output)
        embeds = model.get_input_embeddings()(full)
        slots = (ids[0] == model.config.video_token_id).nonzero().squeeze(1)
        embeds[0, slots] = feats
    if family == "llava_onevision":
        pos = torch.arange(n)[None]
    else:
        mm = inputs["mm_token_type_ids"]
        extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
        pos3, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, video_grid_thw=inputs["video_grid_thw"],
                                             **extra)
        nxt = int(pos3.max()) + 1
        gen = torch.arange(nxt, nxt + n - p).view(1, 1, -1).expand(3, 1, -1)
        pos = torch.cat([pos3, gen], 2)
    with torch.inference_mode():
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
    return out.logits[0, p - 1:]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "qwen2_vl"])
def test_streaming_eviction_equals_masked_reference(family, tiny_dir, hf_models):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir[family], attn_implementation="eager").eval()
    use_released_layout(model)   # mmkv's M-RoPE layout (tests/test_rope_layout.py)
    _, proc = hf_models[family]
    video = frames_for(family, n=8, seed=11)
    sink, recent = 3, 13
    pipe = mmkv.load(tiny_dir[family], recipe=f"streaming:sink={sink},recent={recent}")
    res = pipe.generate(video, QUESTION, max_new_tokens=8, output_scores=True)
    assert len(res.tokens) >= 3, "too few tokens to test decoding"
    assert all(n == sink + recent for n in res.stats.kv_len_per_layer)
    ref = reference_logits(family, model, hf_inputs(family, proc, QUESTION, video=video), res.tokens, sink, recent)
    got = torch.stack(res.scores[:len(res.tokens)])
    torch.testing.assert_close(got, ref[:len(res.tokens)], atol=2e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == res.tokens


def test_eviction_changes_the_answer_logits(tiny_dir):
    """Sanity: the reference above is sensitive; without eviction the logits differ."""
    fam = "qwen2_5_vl"
    video = frames_for(fam, n=8, seed=11)
    full = mmkv.load(tiny_dir[fam]).generate(video, QUESTION, max_new_tokens=3, output_scores=True)
    ev = mmkv.load(tiny_dir[fam], recipe="streaming:sink=3,recent=13").generate(video, QUESTION, max_new_tokens=3,
                                                                                 output_scores=True)
    torch.testing.assert_close(full.scores[0], ev.scores[0])  # first token comes from dense prefill
    assert not torch.allclose(full.scores[1], ev.scores[1], atol=1e-3)
