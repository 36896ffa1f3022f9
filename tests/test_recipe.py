"""Recipes: parsing, presets, ordering rules and clear errors."""
import pytest

from mmkv import Recipe, RecipeError
from mmkv.cache import KIVI, StreamingLLM


def test_parse_main_value_and_keywords():
    r = Recipe.parse("streaming:recent=64,sink=2,decode=no+kivi:4")
    assert [type(s) for s in r.stages] == [StreamingLLM, KIVI]
    assert r.stages[0].recent == 64 and r.stages[0].sink == 2 and r.stages[1].bits == 4
    assert r.stages[0].decode is False
    assert r.spec() == "streaming:64,sink=2,decode=False+kivi:4"
    assert Recipe.parse(r.spec()).stages == r.stages  # round trip


def test_presets_and_empty():
    assert Recipe.parse("none").empty and Recipe.parse(None).empty
    assert str(Recipe.parse("none")) == "none"
    assert Recipe.parse("sink:100").stages == [StreamingLLM(recent=100)]  # alias


def test_unknown_stage_lists_valid_names():
    with pytest.raises(RecipeError) as e:
        Recipe.parse("kivvi:2")
    msg = str(e.value)
    assert "kivvi" in msg and "kivi" in msg and "streaming" in msg and "none" in msg


@pytest.mark.parametrize("spec,needle", [
    ("kivi:3", "bits"), ("kivi:bits=2,group=0", "group"), ("streaming:recent=0", "recent"),
    ("kivi:two", "not a valid int"), ("kivi:color=red", "no parameter 'color'"), ("streaming:sink=-1", "sink"),
    ("", "empty recipe"), ("kivi:2+streaming:recent=8,decode=false", "last KV press"),
    ("kivi:2+kivi:4", "at most one quantizing"), ("streaming:recent=8+kivi:2", "decode=false"),
])
def test_bad_recipes_are_clear(spec, needle):
    with pytest.raises(RecipeError, match=needle):
        Recipe.parse(spec)


def test_streaming_without_decode_eviction_composes_with_kivi():
    r = Recipe.parse("streaming:recent=8,decode=false+kivi:2")
    assert [s.name for s in r.kv] == ["streaming", "kivi"]


def test_recipe_rejects_non_stage_objects():
    with pytest.raises(RecipeError):
        Recipe([object()])
    with pytest.raises(RecipeError):
        Recipe.parse(3.5)
