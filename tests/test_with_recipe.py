"""An encoding asked by another pipeline over the same model (Pipeline.with_recipe): accepted
exactly when that pipeline's own encode would have made the same encoding, refused otherwise."""

import re

import pytest

import mmkv
from conftest import frames_for
from mmkv.errors import InputError
from mmkv.recipe import Recipe

Q = "What is happening in this video?"
KIVI = "kivi:bits=2,group=8,residual=8"


@pytest.fixture(scope="module")
def setup(tiny_dir):
    fam = "qwen2_vl"
    base = mmkv.load(tiny_dir[fam])
    return tiny_dir[fam], base, frames_for(fam, n=8, seed=41)


def test_same_vision_stages_and_no_encode_time_compression_is_valid(setup):
    _, base, video = setup
    enc = base.encode(video)
    kivi = base.with_recipe(KIVI)                    # its KV press runs at ask, on the same prefix
    res = kivi.ask(enc, Q, max_new_tokens=4)
    own = kivi.ask(kivi.encode(video), Q, max_new_tokens=4)
    assert res.tokens == own.tokens and res.stats.kv_bytes == own.stats.kv_bytes
    assert res.stats.recipe == str(kivi.recipe)
    # prefill=False keeps only the visual tokens: any prefill policy may prefill them at ask
    zip_ = base.with_recipe("zipvl:kv=none")
    got = zip_.ask(base.encode(video, prefill=False), Q, max_new_tokens=4)
    assert got.tokens == zip_.generate(video, Q, max_new_tokens=4).tokens
    assert "zipvl_ratio_per_layer" in got.stats.extra


@pytest.mark.parametrize("maker,asker,what", [
    ("none", "pvc", "vision stages"),
    ("pvc", "none", "vision stages"),
    ("pvc:4", "pvc:8", "vision stages"),
    ("none", "zipvl:kv=none", "prefill policy"),
    ("zipvl:kv=none", "zipvl:kv=none,tau=0.9", "prefill policy"),
])
def test_another_recipes_encoding_is_refused(setup, maker, asker, what):
    _, base, video = setup
    enc = base.with_recipe(maker).encode(video)
    with pytest.raises(InputError, match=re.escape(f"recipe {str(Recipe.parse(maker))!r}") + f".*{what}"):
        base.with_recipe(asker).ask(enc, Q, max_new_tokens=2)


def test_encode_time_compression_and_other_models_are_refused(setup):
    path, base, video = setup
    at_encode = mmkv.load(path, compress_at="encode")
    enc = at_encode.encode(video)                    # prefix left uncompressed: recipe none
    with pytest.raises(InputError, match="encode-time KV presses"):
        at_encode.with_recipe(KIVI).ask(enc, Q, max_new_tokens=2)   # it would have compressed it at encode
    with pytest.raises(InputError, match="another loaded model"):
        base.ask(enc, Q, max_new_tokens=2)
    assert at_encode.ask(enc, Q, max_new_tokens=2).tokens                       # its own maker still can
