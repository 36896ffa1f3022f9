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
            "evs:0.5+lookm+vidkv:group=8,residual=8", "pvc+zipvl"]


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
