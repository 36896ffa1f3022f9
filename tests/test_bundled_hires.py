"""The shipped high-resolution image checkpoint (mmkv/assets/mmkv-hires, docs/model.md run C): a
real LLaVA-OneVision that loads through from_pretrained, is small, says how it was trained, and
reads the needle of held-out hires images (seeds it never saw) through the whole mmkv pipeline
(AnyRes thumbnail plus 3 x 3 crops), in one conversation."""
import os

import pytest

import mmkv
from mmkv.models.loading import ASSETS, model_card, resolve_model
from mmkv.synthetic.hires import VERSION, make_hires_example

SHIPPED = os.path.join(ASSETS, "mmkv-hires")
HELD_OUT = 1_000_000 + 800_000  # training seeds are below 1,000,000; these are used nowhere else

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "config.json")),
                                reason="no trained checkpoint in mmkv/assets/mmkv-hires")


def test_shipped_hires_checkpoint_is_small_and_says_how_it_was_trained():
    assert resolve_model("mmkv-hires") == SHIPPED
    assert sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED)) < 20 * 2**20
    card = model_card(SHIPPED)
    assert card["trained"] is True and card["architecture"] == "LlavaOnevisionForConditionalGeneration"
    assert card["train"]["minutes"] <= 60 and card["task_version"] == VERSION
    assert card["validation"]["accuracy"] > 0.5


def test_reads_the_needle_of_held_out_images_in_one_conversation():
    """Eight held-out images, their three questions as one conversation. `describe` ("what is in
    the top left?") needs the one needle token among 324 crop tokens and distractors sharing its
    colour or shape: the checkpoint answers 99% of them (BENCHMARKS.md); here at least 7 of 8.
    All 24 answers: well above the answer prior (1 in 9 places, 1 in 24 objects)."""
    from PIL import Image

    pipe = mmkv.load("mmkv-hires")
    right, describe = 0, []
    for i in range(8):
        ex = make_hires_example(HELD_OUT + i)
        conv = pipe.chat(pipe.encode(Image.fromarray(ex.image)))
        for q in ex.questions:
            ok = conv.ask(q.text, max_new_tokens=8).text.strip() == q.answer
            right += ok
            if q.kind == "describe":
                describe.append(ok)
    assert sum(describe) >= 7 and right >= 12, (describe, right)
