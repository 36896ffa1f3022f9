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


@pytest.mark.parametrize("spec,needle", [
    ("++", "empty stage"), ("kivi:2+", "empty stage"), ("+kivi:2", "empty stage"), ("pvc++kivi:2", "empty stage"),
    (" + ", "empty stage"), ("kivi:", "empty parameter"), ("kivi:2,,group=8", "empty parameter"),
    ("kivi:bits=2,bits=4", "bits is given twice"), ("kivi:2,bits=4", "bits is given twice"),
    ("kivi:2,4", "bits is given twice"), ("streaming:recent=8, recent=9,decode=false", "recent is given twice"),
    (":2", "empty stage name"),
    ("pvc+pvc", "'pvc' appears twice"), ("pvc:16+evs+pvc:8", "'pvc' appears twice"),
    ("streaming:recent=8,decode=false+sink:recent=9,decode=false", "'streaming' appears twice"),
    ("lookm+lookm", "'lookm' appears twice"),
])
def test_nonsense_recipes_are_refused(spec, needle):
    with pytest.raises(RecipeError, match=needle):
        Recipe.parse(spec)


def test_repeated_stage_objects_are_refused():
    from mmkv.vision import PVC
    with pytest.raises(RecipeError, match="appears twice"):
        Recipe([PVC(), PVC(budget=8)])
    with pytest.raises(RecipeError, match="empty stage"):
        Recipe.parse(["kivi:2", ""])


def test_stage_info_lists_every_stage_once():
    import json

    from mmkv.recipe import STAGES, stage_info
    info = stage_info()
    assert json.loads(json.dumps(info)) == info
    assert sorted(d["name"] for d in info) == sorted({c.name for c in STAGES.values()})
    for d in info:
        assert set(d) == {"name", "kind", "main", "params", "needs_question", "doc"}
        cls = STAGES[d["name"]]
        assert d["kind"] in ("vision", "prefill", "kv") and d["kind"] == cls.kind
        assert d["main"] is None or d["main"] in d["params"]
        assert isinstance(d["needs_question"], bool) and d["doc"] and "\n" not in d["doc"]
        Recipe.parse(d["name"])  # every listed name parses
    by = {d["name"]: d for d in info}
    assert by["kivi"]["params"]["bits"] == 2 and by["kivi"]["main"] == "bits"
    assert by["vidkv"]["needs_question"] is True and by["kivi"]["needs_question"] is False
    assert by["lookm"]["needs_question"] is False  # before the question: its text prior, else observed attention
    assert by["zipvl"]["needs_question"] is False  # query_aware is a parameter, off by default
    assert "sink" not in by and "look-m" not in by  # aliases are not stages of their own


def test_needs_question_classvar_wins():
    from dataclasses import dataclass
    from typing import ClassVar

    from mmkv.recipe import _needs_question
    from mmkv.stages import Stage

    @dataclass
    class Late(Stage):
        needs_question: ClassVar[bool] = True
        query_aware: ClassVar[bool] = False

    assert _needs_question(Late) is True


def test_presets_compress_before_the_question_and_keep_their_budgets(tiny_dir):
    """The presets are chosen under `encode`: none of them needs the question, one encoding
    serves two questions, and their budgets hold on the stored cache (fast: exact KV; balanced:
    25% of the visual tokens, quantized; extreme: balanced's tokens, fewer entries, fewer bytes)."""
    import mmkv
    from conftest import frames_for
    from mmkv.bench.long import skip_reason

    base = mmkv.load(tiny_dir["qwen2_vl"], compress_at="encode")
    video = frames_for("qwen2_vl", n=128)      # 1,024 visual tokens: enough for KIVI's groups
    stats = {}
    for name in ("fast", "balanced", "extreme"):
        pipe = base.with_recipe(name)
        assert skip_reason(pipe, "encode") is None, name
        enc = pipe.encode(video)
        a = pipe.ask(enc, "What is shown in the video?", max_new_tokens=3)
        pipe.ask(enc, "What colour is it?", max_new_tokens=3)
        again = pipe.ask(enc, "What is shown in the video?", max_new_tokens=3)
        assert again.tokens == a.tokens and again.stats.kv_bytes == a.stats.kv_bytes, name   # encoding unmodified
        stats[name] = a.stats
    fast, bal, ext = stats["fast"], stats["balanced"], stats["extreme"]
    assert fast.visual_tokens_kept == fast.visual_tokens_in and fast.kv_bytes == fast.kv_bytes_uncompressed
    assert bal.visual_tokens_kept <= 0.25 * bal.visual_tokens_in + 1 and bal.bits_per_element < bal.kv_dtype_bits
    assert ext.visual_tokens_kept == bal.visual_tokens_kept and sum(ext.kv_len_per_layer) < sum(bal.kv_len_per_layer)
    assert ext.kv_bytes < bal.kv_bytes < bal.kv_bytes_uncompressed
