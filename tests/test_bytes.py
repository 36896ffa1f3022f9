"""Byte accounting: `nbytes()` is what the cache really holds, and one baseline everywhere.

For every KV press and composition, after encode and after ask (compress_at "ask" and "encode"),
the storages the cache references (each counted once and whole, `storage.storage_nbytes`) are
exactly `nbytes()` plus the position bookkeeping `index_nbytes()`: no view keeps a bigger buffer
alive, no tensor is held uncounted, no shared tensor is counted twice.
"""
from __future__ import annotations

import pytest
import torch

import mmkv
from mmkv.cache import CompressedCache
from mmkv.cache.kivi import KIVI
from mmkv.cache.storage import distinct_nbytes, own, storage_nbytes
from mmkv.cache.vidkv import VidKV
from mmkv.pipeline import Pipeline
from mmkv.stages import STAGES

from conftest import frames_for

FAM = "qwen2_5_vl"
QUESTION = "What is shown in the video?"

# small groups and windows so that the tiny prompts are quantized, evicted and flushed while decoding
SMALL = {"kivi": "kivi:bits=2,group=8,residual=8", "vidkv": "vidkv:group=8,residual=8",
         "streaming": "streaming:sink=2,recent=24", "elastic": "elastic:0.5", "lookm": "lookm"}
COMPOSED = ["lookm+kivi:bits=2,group=8,residual=8", "lookm+vidkv:group=8,residual=8",
            "elastic:0.5+kivi:bits=4,group=8,residual=8", "streaming:sink=2,recent=40,decode=false+vidkv:group=8,residual=8",
            "vidkv:group=8,residual=8,stp=0", "vidkv:group=8,residual=8,stats=16,channels=head",
            "kivi:bits=2,group=8,residual=8,stats=8",
            "zipvl", "zipvl:kv=evict", "zipvl:kv=none+kivi:bits=2,group=8,residual=8", "zipvl:values=token",
            "pvc:ratio=0.5+kivi:bits=2,group=8,residual=8", "evs:0.5+vidkv:group=8,residual=8",
            "evs:0.5+lookm+vidkv:group=8,residual=8", "pvc+zipvl",
            "observed:0.5,merge=mass+kivi:bits=2,group=8,residual=8", "snapkv:0.5,merge=mass"]


def kv_stage_recipes() -> list[str]:
    """Every registered KV stage alone (small budgets where they have them) and the compositions."""
    names = sorted({cls.name for cls in STAGES.values() if cls.kind == "kv"})
    return [SMALL.get(n, n) for n in names] + COMPOSED


def check_storage(cache: CompressedCache, where: str) -> None:
    held = storage_nbytes(cache.layers)
    assert held == cache.nbytes() + cache.index_nbytes(), (
        f"{where}: the cache's storages hold {held} bytes, nbytes() + index_nbytes() say "
        f"{cache.nbytes()} + {cache.index_nbytes()}")


@pytest.fixture(scope="module")
def video():
    return frames_for(FAM, n=16, seed=21)


@pytest.mark.parametrize("compress_at", ["ask", "encode"])
@pytest.mark.parametrize("recipe", kv_stage_recipes())
def test_storage_equals_nbytes_for_every_press(tiny_dir, video, recipe, compress_at, monkeypatch):
    seen = []
    decode = Pipeline._decode

    def spy(self, cache, *a, **kw):
        check_storage(cache, f"{recipe} ({compress_at}) after the question's prefill")
        out = decode(self, cache, *a, **kw)
        seen.append(cache)
        return out

    monkeypatch.setattr(Pipeline, "_decode", spy)
    pipe = mmkv.load(tiny_dir[FAM], recipe=recipe, compress_at=compress_at)
    enc = pipe.encode(video)
    if enc.cache is not None:
        check_storage(enc.cache, f"{recipe} ({compress_at}) after encode")
    res = pipe.ask(enc, QUESTION, max_new_tokens=12)
    check_storage(seen[-1], f"{recipe} ({compress_at}) after the answer")
    assert res.stats.kv_bytes > 0
    if enc.cache is not None:
        check_storage(enc.cache, f"{recipe} ({compress_at}) encoding after a question")


def test_kivi_window_does_not_keep_the_prompt_alive():
    """KIVI's recent window used to be a view of the prompt's keys: the whole uncompressed prompt
    stayed allocated behind a cache that reported a fraction of it."""
    cache = CompressedCache(1)
    k, v = torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    cache.update(k, v, 0)
    KIVI(bits=2, group=8, residual=16).compress(cache, None)
    layer = cache.layers[0]
    assert layer.residual_len < 200
    assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
    check_storage(cache, "kivi")


def test_vidkv_shared_permutation_counts_once_and_no_hidden_cache():
    """STP stores two segments that share the layer's channel permutation (counted once), and
    attention must not leave an expanded permutation behind (held but not counted)."""
    cache = CompressedCache(1)
    b, h, n, d = 1, 2, 96, 16
    cache.update(torch.randn(b, h, n, d), torch.randn(b, h, n, d), 0)
    layer = cache.layers[0]
    sal = (torch.arange(n, dtype=torch.float32), torch.arange(n) >= n - 40)  # (similarity, salient)
    VidKV(group=8, residual=8).quantize_layer(layer, sal)
    assert len(layer.segments) == 2 and layer.segments[0].keys.perm is layer.segments[1].keys.perm
    check_storage(cache, "vidkv with a protected segment")
    layer.attend(torch.randn(b, 4, 1, d), d ** -0.5)
    check_storage(cache, "vidkv after attention")


def test_distinct_nbytes_and_own():
    x = torch.randn(4, 8)
    assert distinct_nbytes([x, x, x[:2]]) == x.nbytes + x[:2].nbytes
    tail = x[2:]
    assert own(tail).untyped_storage().nbytes() == tail.nbytes and torch.equal(own(tail), tail)
    assert own(x) is x
    assert storage_nbytes([tail, x]) == x.nbytes


# ----------------------------------------------------------------------------- one baseline
def model_cache_bytes(pipe, tokens: int) -> int:
    a = pipe.adapter
    return tokens * a.num_layers * 2 * a.num_kv_heads * a.head_dim * a.dtype.itemsize


@pytest.mark.parametrize("dtype,bits", [("fp32", 32), ("bf16", 16)])
def test_baseline_is_the_models_own_cache_of_the_prompt_before_vision_presses(tiny_dir, video, dtype, bits):
    plain = mmkv.load(tiny_dir[FAM], dtype=dtype)
    none = plain.generate(video, QUESTION, max_new_tokens=3).stats
    full = none.prompt_tokens
    assert none.kv_dtype == str(plain.adapter.dtype).replace("torch.", "")
    assert none.kv_bytes == none.kv_bytes_uncompressed == none.kv_bytes_after_vision == model_cache_bytes(plain, full)
    assert (none.kv_ratio, none.kv_ratio_vision, none.kv_ratio_kv, none.bits_per_element) == (1.0, 1.0, 1.0, bits)
    s = plain.with_recipe("evs:0.5+kivi:bits=2,group=8,residual=8").generate(video, QUESTION, max_new_tokens=3).stats
    assert s.prompt_tokens < full
    assert s.kv_bytes_uncompressed == none.kv_bytes_uncompressed         # the prompt before the vision press
    assert s.kv_bytes_after_vision == model_cache_bytes(plain, s.prompt_tokens)
    assert s.kv_ratio_vision == s.prompt_tokens / full
    assert s.kv_ratio == pytest.approx(s.kv_ratio_vision * s.kv_ratio_kv) and s.kv_ratio == s.kv_bytes / s.kv_bytes_uncompressed
    assert s.bits_per_element == pytest.approx(8 * s.kv_bytes / (s.kv_bytes_after_vision / plain.adapter.dtype.itemsize))
    d = s.to_dict()
    assert (d["kv_ratio"], d["kv_ratio_vision"], d["kv_ratio_kv"]) == (s.kv_ratio, s.kv_ratio_vision, s.kv_ratio_kv)
    table = s.table()
    assert f"uncompressed {s.kv_dtype}" in table and "fp16" not in table and "vision x KV presses" in table


# the README's and the presets' compressing recipes, at their defaults
COMPRESSING = ["kivi:2", "kivi:4", "vidkv", "vidkv:stp=0", "pvc:ratio=0.25+lookm+vidkv", "lookm+kivi:2",
               "elastic+kivi:2", "zipvl", "balanced", "extreme", "streaming:recent=32,decode=false+vidkv", "lookm"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compression_never_stores_more_than_the_uncompressed_cache(tiny_dir, video, dtype):
    base = mmkv.load(tiny_dir[FAM], dtype=dtype)
    for recipe in COMPRESSING:
        s = base.with_recipe(recipe).generate(video, QUESTION, max_new_tokens=3).stats
        assert s.kv_bytes <= s.kv_bytes_after_vision <= s.kv_bytes_uncompressed, recipe
        assert s.kv_ratio <= 1 and s.kv_ratio_kv <= 1 and s.bits_per_element <= s.kv_dtype_bits, recipe


# ----------------------------------------------------------------------------- sized windows
def _layer_cache(n: int, d: int = 16, seed: int = 0) -> CompressedCache:
    g = torch.Generator().manual_seed(seed)
    cache = CompressedCache(1)
    cache.update(torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, n, d, generator=g), 0)
    return cache


@pytest.mark.parametrize("press,name", [(KIVI(), "kivi"), (VidKV(stp=0), "vidkv")])
def test_full_precision_window_is_sized_to_the_prompt(press, name):
    """Defaults residual=128, residual_fraction=1/8, group=32: an eighth of a short prompt stays in
    full precision, the paper's 128 entries from 1,024 on; the window keeps its size while decoding."""
    from mmkv.cache.base import PressContext

    for n, window in ((150, 18), (536, 67), (2048, 128)):
        cache = _layer_cache(n)
        ctx = PressContext(token_type=torch.zeros(n, dtype=torch.int8))
        press.compress(cache, ctx)
        layer = cache.layers[0]
        quantized = (n - window) // 32 * 32
        assert (ctx.stats[f"{name}_window"], ctx.stats[f"{name}_quantized_entries"]) == (window, quantized)
        assert layer.residual_len == n - quantized and f"{name}_note" not in ctx.stats
        for _ in range(40):
            cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
            assert window <= layer.residual_len < window + 32 + 1
        check_storage(cache, f"{name} after decoding")


@pytest.mark.parametrize("press,name", [(KIVI(), "kivi"), (VidKV(stp=0), "vidkv")])
def test_stats_say_when_nothing_could_be_quantized(press, name):
    from mmkv.cache.base import PressContext

    cache = _layer_cache(24)
    ctx = PressContext(token_type=torch.zeros(24, dtype=torch.int8))
    press.compress(cache, ctx)
    assert cache.layers[0].segments == [] and ctx.stats[f"{name}_quantized_entries"] == 0
    assert "nothing quantized: 24 entries" in ctx.stats[f"{name}_note"]


def test_default_quantizers_compress_short_real_prompts(tiny_dir, video):
    """The tiny video's 150-entry prompt was within KIVI's fixed 128 + 32 entries: nothing was
    quantized. With the sized window most of it is."""
    base = mmkv.load(tiny_dir[FAM])
    for recipe in ("kivi:2", "vidkv"):
        s = base.with_recipe(recipe).generate(video, QUESTION, max_new_tokens=3).stats
        assert s.extra[f"{recipe.split(':')[0]}_quantized_entries"] >= s.prompt_tokens // 2, recipe
        assert s.bits_per_element < 12, recipe  # fp32 model: 32 bits uncompressed
