"""The shipped checkpoint (mmkv/assets/mmkv-tiny): it loads through from_pretrained, is small, and
answers held-out needle questions (seeds it never saw in training) from the video."""
import json
import os

import pytest

import mmkv
from mmkv.models.loading import ASSETS, model_card, resolve_model
from mmkv.synthetic import LETTERS, TASKS, make_example

SHIPPED = os.path.join(ASSETS, "mmkv-tiny")
HELD_OUT = 1_000_000 + 700_000  # training seeds are below 1,000,000; these are used nowhere else

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "config.json")),
                                reason="no trained checkpoint in mmkv/assets/mmkv-tiny")


@pytest.fixture(scope="module")
def pipe():
    return mmkv.load("mmkv-tiny")


def test_shipped_checkpoint_is_the_default_and_small():
    assert resolve_model("mmkv-tiny") == SHIPPED
    size = sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED))
    assert size < 10 * 2**20
    card = model_card(SHIPPED)
    assert card["trained"] is True and card["architecture"] == "Qwen2VLForConditionalGeneration"
    assert card["validation"]  # the training run's own held-out accuracy is recorded


def test_shipped_checkpoint_is_read_in_the_layout_it_was_trained_in(pipe):
    """mmkv-tiny was trained through transformers 5's forward (its M-RoPE layout); its card says
    so and the adapter follows it (the released layout costs it held-out answers)."""
    assert model_card(SHIPPED)["train"]["rope_layout"] == "transformers" == pipe.adapter.rope_layout


def test_answers_held_out_questions(pipe):
    """16 held-out videos of 96 frames, 4 per task. The model's validation accuracy is recorded in
    its card; here every colour, shape and order question must be right, and at most two of the
    count questions (the hardest task) wrong."""
    wrong = []
    for i in range(16):
        task = TASKS[i % 4]
        ex = make_example(HELD_OUT + i, 96, task=task)
        r = pipe.generate(ex.frames, ex.prompt, max_new_tokens=4)
        assert pipe.note == "" and r.text.strip()[:1] in LETTERS, r.text
        if r.text.strip()[:1] != ex.answer:
            wrong.append((task, ex.seed, r.text, ex.answer))
    assert not [w for w in wrong if w[0] in ("color", "shape", "order")], wrong
    assert len(wrong) <= 2, wrong


def test_answer_needs_the_needle(pipe):
    """Blank out the needle's frames and the answer is no longer read from them: the model looks."""
    for seed in range(HELD_OUT + 100, HELD_OUT + 108):
        ex = make_example(seed, 64, task="color")
        seen = pipe.generate(ex.frames, ex.prompt, max_new_tokens=4, output_scores=True)
        if seen.text.strip()[:1] != ex.answer:
            continue
        n = ex.needles[0]
        frames = ex.frames.copy()
        frames[n.start:n.start + n.length] = frames[n.start - 2 if n.start >= 2 else n.start + n.length]
        blind = pipe.generate(frames, ex.prompt, max_new_tokens=4, output_scores=True)
        # the probability of the right answer drops once the needle is gone
        tok = pipe.adapter.tokenizer(ex.answer, add_special_tokens=False)["input_ids"][0]
        p_seen = seen.scores[0].float().softmax(-1).flatten()[tok].item()
        p_blind = blind.scores[0].float().softmax(-1).flatten()[tok].item()
        assert p_blind < 0.5 * p_seen, (p_seen, p_blind)
        return
    pytest.fail("the model answered none of 8 colour questions right")


def test_cli_demo_job_answers_the_sample(capsys):
    from mmkv.cli import main

    sample = json.load(open(os.path.join(ASSETS, "sample.json")))
    assert main(["generate", "--no-progress"]) == 0
    out = capsys.readouterr().out
    answer_line = next(line for line in out.splitlines() if line.startswith("A:"))
    assert answer_line.split(":", 1)[1].strip()[:1] == sample["answer"], out
