"""What the tests of the shipped checkpoints (mmkv/assets/<name>) share: the path, the skip when a
checkout has no trained weights there, the size limit, and the held-out seed range they use."""
import os

import pytest

from mmkv.models.loading import ASSETS, model_card, resolve_model

HELD_OUT = 1_000_000 + 800_000  # training seeds are below 1,000,000; these are used nowhere else
MAX_BYTES = 20 * 2**20          # a bundled checkpoint is at most 20 MB


def shipped(name: str) -> tuple[str, pytest.MarkDecorator]:
    """(path, skip mark) of the bundled checkpoint `name`."""
    path = os.path.join(ASSETS, name)
    mark = pytest.mark.skipif(not os.path.isfile(os.path.join(path, "config.json")),
                              reason=f"no trained checkpoint in mmkv/assets/{name}")
    return path, mark


def small_trained_card(name: str, path: str) -> dict:
    """Check that `name` resolves to `path`, is under MAX_BYTES and was trained within 60 minutes;
    return its card."""
    assert resolve_model(name) == path
    assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) < MAX_BYTES
    card = model_card(path)
    assert card["trained"] is True and card["train"]["minutes"] <= 60
    return card


def ask_in_one_conversation(pipe, examples, kind: str, max_new_tokens: int) -> tuple[int, list[bool]]:
    """Each (media, questions) of `examples` encoded once and its questions asked as one
    conversation (question 1, its answer, question 2, ...); (all right answers, the hits of
    questions of `kind`)."""
    right, hits = 0, []
    for media, questions in examples:
        conv = pipe.chat(pipe.encode(media))
        for q in questions:
            ok = conv.ask(q.text, max_new_tokens=max_new_tokens).text.strip() == q.answer
            right += ok
            if q.kind == kind:
                hits.append(ok)
    return right, hits
