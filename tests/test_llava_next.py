"""LLaVA-NeXT (images): equivalence with plain generate, [CLS] scores, GlobalCom² as published."""
import numpy as np
import pytest
import torch
from PIL import Image

import mmkv
from conftest import hf_inputs, strip_eos
from mmkv.errors import InputError, ModelError
from mmkv.models.tiny import build_tiny
from mmkv.models.vit_scores import last_encoder_layer
from test_vision import check_globalcom2

QUESTION = "Describe the image."
# (height, width) -> crop grid of the tiny model (56 px views): 2x2, 1x1 (a single crop), 1x3, 2x1
SHAPES = [(100, 150), (56, 56), (40, 160), (120, 60)]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return build_tiny("llava_next", str(tmp_path_factory.mktemp("tiny") / "llava_next"), seed=7)


@pytest.fixture(scope="module")
def next_hf(next_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return (AutoModelForImageTextToText.from_pretrained(next_dir, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(next_dir))


@pytest.fixture(scope="module")
def next_pipe(next_dir):
    return mmkv.load(next_dir)


def image_of(shape, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


@pytest.mark.parametrize("shape", SHAPES)
def test_empty_recipe_equals_plain_generate(shape, next_hf, next_pipe):
    model, proc = next_hf
    image = image_of(shape, seed=1)
    inputs = hf_inputs("llava_next", proc, QUESTION, image=image)
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    res = next_pipe.generate(image, QUESTION, max_new_tokens=10)
    assert res.tokens == strip_eos(ref, next_pipe.adapter.stop_ids())
    assert res.stats.prompt_tokens == inputs["input_ids"].shape[1]


def test_layout_and_cls_scores_match_eager_attention(next_dir, next_pipe):
    """view_scores = head-mean of the [CLS] row's pre-softmax logits in the last CLIP layer:
    against eager attention probabilities, log p = logit - logsumexp, so after removing each
    view's mean over patches the head-mean of log p must equal the scores."""
    from transformers import AutoModelForImageTextToText
    eager = AutoModelForImageTextToText.from_pretrained(next_dir, attn_implementation="eager").eval()
    image = image_of((100, 150), seed=2)
    vt = next_pipe.encode(image, prefill=False).visual
    assert vt.meta["crop_grid"] == (2, 2) and vt.meta["base_grid"] == (4, 4)
    assert vt.coords[vt.is_patch][:, 0].tolist().count(0) == 16          # thumbnail first
    assert bool((vt.coords[~vt.is_patch, 1] == -1).all())
    pix = next_pipe.adapter.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    with torch.inference_mode():
        att = eager.model.vision_tower(pix, output_attentions=True).attentions[-1]   # [V, heads, 17, 17]
    logp = att[:, :, 0, 1:].clamp_min(1e-30).log().mean(1)                          # [V, 16]
    got = vt.meta["view_scores"]
    torch.testing.assert_close(got - got.mean(1, keepdim=True), logp - logp.mean(1, keepdim=True),
                               atol=1e-4, rtol=1e-4)
    assert last_encoder_layer(eager.model.vision_tower) is eager.model.vision_tower.encoder.layers[-1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("R", [0.25, 0.6])
def test_globalcom2_follows_the_paper(shape, R, next_dir, next_pipe):
    image = image_of(shape, seed=3)
    full = next_pipe.encode(image, prefill=False).visual
    enc = mmkv.load(next_dir, recipe=f"globalcom2:{R}").encode(image, prefill=False)
    ratios = enc.stats.extra["globalcom2_crop_ratios"]
    check_globalcom2(full, enc.visual, R, ratios)
    if full.meta["crop_grid"] == (1, 1):                                # a single crop gets exactly R
        assert ratios == [R]


def test_globalcom2_run_equals_model_on_kept_tokens(next_dir, next_hf):
    """Invariant 2 for 1-D positions: the pruned run equals the plain model on only the kept
    tokens at their original positions."""
    model, proc = next_hf
    image = image_of((100, 150), seed=4)
    pipe = mmkv.load(next_dir, recipe="globalcom2:0.3")
    enc = pipe.encode(image)
    assert enc.visual.num < enc.visual.n_total / 2
    res = pipe.ask(enc, QUESTION, max_new_tokens=5, output_scores=True)
    inputs = hf_inputs("llava_next", proc, QUESTION, image=image)
    ids = inputs["input_ids"]
    with torch.inference_mode():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        emb = model.get_input_embeddings()(ids)[0].clone()
        slots = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
        emb[slots] = feats
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[slots] = False
        keep[slots[enc.visual.index]] = True
        gen = torch.tensor(res.tokens[:-1])
        e = torch.cat([emb[keep], model.get_input_embeddings()(gen)])[None]
        pos = torch.cat([torch.arange(ids.shape[1])[keep], torch.arange(ids.shape[1], ids.shape[1] + len(gen))])
        ref = model(inputs_embeds=e, position_ids=pos[None]).logits[0, int(keep.sum()) - 1:]
    got = torch.stack(res.scores[:len(res.tokens)])
    torch.testing.assert_close(got, ref[:len(res.tokens)], atol=2e-4, rtol=1e-4)


def test_video_and_unsupported_configs_are_clear(next_dir, next_hf, next_pipe, monkeypatch):
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="images only"):
        next_pipe.generate(frames, QUESTION, max_new_tokens=1)
    # mmkv.generate says so before the weights load
    import mmkv
    from mmkv.models import loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_adapter", no_load)
    monkeypatch.setattr(mmkv.api, "load_adapter", no_load, raising=False)
    mmkv.api._PIPELINES.clear()
    with pytest.raises(InputError, match="images only"):
        mmkv.generate(frames, QUESTION, model=next_dir)
    model, proc = next_hf
    from mmkv.models.llava_next import LlavaNextAdapter
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ModelError, match="vision_feature_select_strategy"):
            LlavaNextAdapter(model, proc)
    finally:
        model.config.vision_feature_select_strategy = "default"
