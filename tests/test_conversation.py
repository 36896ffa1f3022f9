"""Pipeline.chat: one conversation over an encoded video. Ask-time KV presses compress once, after
the first question's prefill; later turns are prefilled over that cache, which then only grows by
the tokens fed to it."""
import pytest

from conftest import frames_for


@pytest.mark.parametrize("recipe", ["lookm", "kivi:2", "streaming:recent=8,decode=false"])
def test_compressed_once_then_grows_by_the_turns(tiny_dir, recipe):
    import mmkv

    pipe = mmkv.load(tiny_dir["qwen2_vl"], recipe=recipe)
    enc = pipe.encode(frames_for("qwen2_vl", n=8, seed=3))
    conv = pipe.chat(enc)
    r1 = conv.ask("What is shown?", max_new_tokens=4)
    cache = conv._session.cache
    assert cache.seen == r1.stats.prompt_tokens + len(r1.tokens) - len(conv._session.pending)
    held1, seen1 = sum(cache.lengths()), cache.seen
    assert held1 < seen1 * len(cache.layers) or recipe == "kivi:2"          # compressed after question 1
    r2 = conv.ask("What next?", max_new_tokens=4)
    cache = conv._session.cache
    assert r2.stats.prompt_tokens > r1.stats.prompt_tokens + len(r1.tokens)  # turn 1 stays in context
    assert cache.seen == r2.stats.prompt_tokens + len(r2.tokens) - len(conv._session.pending)
    # nothing was compressed again: the stored entries grew by exactly the tokens fed since
    # (kivi moves whole groups into its packed part, which keeps the count)
    assert sum(cache.lengths()) - held1 == (cache.seen - seen1) * len(cache.layers)


def test_questions_need_text(pipes):
    from mmkv.errors import InputError

    pipe = pipes["qwen2_vl"]
    conv = pipe.chat(pipe.encode(frames_for("qwen2_vl", n=4, seed=1)))
    conv.ask("Describe it.", max_new_tokens=2)
    with pytest.raises(InputError, match="empty"):
        conv.ask("   ")
    with pytest.raises(TypeError, match="reuse"):
        conv.ask("Again?", reuse=False)
