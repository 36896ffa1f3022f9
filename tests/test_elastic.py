"""Elastic Cache (arXiv 2407.18121): attention-received scores, rank-based selection (and the
official index-versus-rank bug), positional anchor merging, protected tokens, the fixed-point
decode policy, composition with KIVI, and generation end to end."""
import math
from fractions import Fraction

import pytest
import torch

import mmkv
from conftest import frames_for
from kvref import capture, eager_attentions, eager_model, hf_step_logits, prompt
from mmkv.cache import KIVI, CompressedCache, ElasticCache, PressContext, StreamingLLM
from mmkv.cache.elastic import elastic_merge, elastic_select
from mmkv.errors import RecipeError
from mmkv.recipe import Recipe

QUESTION = "What is happening in this video?"


# ----------------------------------------------------------------------------- references
def ref_plan(scores, start, f):
    """Loop reference for one head, entries in sequence order: (kept, evicted -> anchor)."""
    n = len(scores)
    protected = set(range(min(start, n))) | {n - 1}
    cands = sorted((j for j in range(n) if j not in protected), key=lambda j: (scores[j], j))
    evicted = cands[:f]
    anchors = sorted(cands[f:])
    to = {e: min(anchors, key=lambda a: (abs(a - e), a)) for e in evicted}
    return sorted(set(range(n)) - set(evicted)), to


def ref_compress(keys, values, scores, start, f):
    """keys/values [H, n, D] -> kept indices and the merged kept keys/values."""
    kept, to = ref_plan(scores, start, f)
    ks, vs = keys.clone(), values.clone()
    for a in set(to.values()):
        src = [e for e in to if to[e] == a]
        ks[:, a] = (keys[:, a] + sum(keys[:, e] for e in src)) / (1 + len(src))
        vs[:, a] = (values[:, a] + sum(values[:, e] for e in src)) / (1 + len(src))
    return kept, ks[:, kept], vs[:, kept]


def official_selection(score, start_size, seq_len, forget_num):
    """The official selection logic, as written (kv_cache.py): ranks and indices confused."""
    order = torch.argsort(score[start_size:seq_len - 1])
    selected = torch.where(order > forget_num)[0] + start_size
    thrown = torch.where(order <= forget_num)[0]          # (no +start_size either)
    return torch.cat([torch.arange(start_size), selected, torch.tensor([seq_len - 1])]), thrown


def n_evicted(held, seen, ratio):
    """floor(held - (1 - ratio) * seen) in exact arithmetic (no float rounding at the boundary)."""
    return max(0, math.floor(held - (1 - Fraction(str(ratio))) * seen))


def simulate_decode(stored, seen, appended, ratio=0.2):
    """Entries held after `appended` decode steps, one eviction whenever over budget."""
    for _ in range(appended):
        stored, seen = stored + 1, seen + 1
        stored -= n_evicted(stored, seen, ratio)
    return stored


def no_stop(pipe):
    """Decode exactly max_new_tokens tokens (no stop token), so the steps taken are known."""
    pipe.adapter.stop_ids = lambda: set()
    return pipe


# ----------------------------------------------------------------------------- selection
def test_official_rank_index_confusion_drops_the_top_token_and_ours_does_not():
    # entry 1 has by far the highest score; entry 2 the lowest
    score = torch.tensor([5.0, 10.0, 0.0, 5.5, 6.0, 7.0, 8.0, 9.0, 4.0, 3.0])
    n, start, f = len(score), 1, 2
    kept_official, thrown_official = official_selection(score, start, n, f)
    assert 1 not in kept_official.tolist()                  # the official logic drops the top-scored token
    assert len(thrown_official) == f + 1                    # ... and evicts f + 1 tokens
    kept, evicted, anchor = elastic_select(score[None], torch.arange(n)[None], start, f)
    assert 1 in kept[0].tolist()
    assert sorted(evicted[0].tolist()) == [2, 8]            # the two lowest unprotected (9 is the last token)
    assert kept.shape[1] == n - f
    # the official logic on random scores disagrees with the ranks; ours is the reference
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = torch.rand(41, generator=g)
        kept, _, _ = elastic_select(s[None], torch.arange(41)[None], 4, 8)
        assert kept[0].tolist() == ref_plan(s.tolist(), 4, 8)[0]
        assert set(official_selection(s, 4, 41, 8)[0].tolist()) != set(kept[0].tolist())


@pytest.mark.parametrize("n,start,f", [(37, 1, 7), (20, 4, 4), (9, 0, 3), (50, 3, 10)])
def test_selection_and_anchors_match_reference(n, start, f):
    g = torch.Generator().manual_seed(n + f)
    s = torch.rand(n, generator=g)
    perm = torch.randperm(n, generator=g)              # storage order is arbitrary; sequence index rules
    kept, evicted, anchor = elastic_select(s[perm][None].expand(2, n), perm[None].expand(2, n), start, f)
    ref_kept, to = ref_plan(s.tolist(), start, f)
    for h in range(2):
        assert perm[kept[h]].tolist() == ref_kept                  # in sequence order
        assert {int(perm[e]): int(perm[a]) for e, a in zip(evicted[h], anchor[h])} == to
    assert set(range(min(start, n))) | {n - 1} <= set(ref_kept)


def test_anchor_ties_go_to_the_earlier_anchor():
    s = torch.tensor([9.0, 9.0, 0.0, 9.0, 9.0, 9.0])  # entry 2 evicted, anchors 1 and 3 equally near
    kept, evicted, anchor = elastic_select(s[None], torch.arange(6)[None], 1, 1)
    assert evicted.tolist() == [[2]] and anchor.tolist() == [[1]]


def test_merge_averages_into_anchors():
    g = torch.Generator().manual_seed(2)
    h, n, d, f = 2, 23, 5, 6
    keys, values = torch.randn(1, h, n, d, generator=g), torch.randn(1, h, n, d, generator=g)
    s = torch.rand(n, generator=g)
    kept, evicted, anchor = elastic_select(s[None].expand(h, n), torch.arange(n)[None].expand(h, n), 2, f)
    got_k, got_v = elastic_merge(keys, values, kept, evicted, anchor)
    ref_kept, ref_k, ref_v = ref_compress(keys[0], values[0], s.tolist(), 2, f)
    assert kept[0].tolist() == ref_kept
    torch.testing.assert_close(got_k[0], ref_k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_v[0], ref_v, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- on a cache
def _cache_and_ctx(n=100, h=2, d=8, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = CompressedCache(layers)
    for i in range(layers):
        cache.update(torch.randn(1, h, n, d, generator=g), torch.randn(1, h, n, d, generator=g), i)
    ctx = PressContext(token_type=torch.zeros(n, dtype=torch.int8), num_heads=2 * h, num_kv_heads=h, head_dim=d)
    for i in range(layers):
        ctx.state[("elastic", "scores", i)] = torch.rand(h, n, generator=g)
    return cache, ctx


@pytest.mark.parametrize("ratio", [0.2, 0.35])
def test_compress_budget_protected_and_merge(ratio):
    n = 100
    cache, ctx = _cache_and_ctx(n)
    pre = cache.clone()
    ElasticCache(ratio=ratio, start_size=4).compress(cache, ctx)
    f = n_evicted(n, n, ratio)
    for i, layer in enumerate(cache.layers):
        s = ctx.state[("elastic", "scores", i)].sum(0)               # per token: summed over heads
        kept, rk, rv = ref_compress(pre.layers[i].keys[0], pre.layers[i].values[0], s.tolist(), 4, f)
        assert layer.stored == n - f and layer.seen == n
        assert layer.positions()[0].tolist() == kept == layer.positions()[1].tolist()
        assert {0, 1, 2, 3, n - 1} <= set(kept)
        torch.testing.assert_close(layer.keys[0], rk, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.values[0], rv, atol=1e-6, rtol=1e-6)
        assert ctx.state[("elastic", "p", i)] == n - f - 25


def test_decode_policy_matches_fixed_point_reference():
    """Entries [0, p) stay; past p the cache is a FIFO; one eviction whenever it holds more than
    (1 - ratio) * seen entries, as the official loop does (with exact arithmetic)."""
    n, ratio = 100, 0.2
    cache, ctx = _cache_and_ctx(n, layers=1)
    press = ElasticCache(ratio=ratio)
    press.compress(cache, ctx)
    layer = cache.layers[0]
    ref = layer.positions()[0].tolist()
    p = len(ref) - 25
    seen = n
    g = torch.Generator().manual_seed(1)
    evictions = 0
    for step in range(60):
        cache.update(torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g), 0)
        press.on_decode(cache, ctx, step)
        ref.append(seen)
        seen += 1
        if n_evicted(len(ref), seen, ratio) >= 1:
            del ref[p]
            evictions += 1
        assert layer.positions()[0].tolist() == ref
        assert layer.stored <= (1 - ratio) * seen + 1
    assert evictions == 12                         # every fifth token with ratio 0.2
    assert layer.positions()[0, :p].tolist() == ref[:p]


def test_decode_off_keeps_growing():
    cache, ctx = _cache_and_ctx(50, layers=1)
    press = ElasticCache(decode=False)
    press.compress(cache, ctx)
    for step in range(10):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 0)
        press.on_decode(cache, ctx, step)
    assert cache.layers[0].stored == 40 + 10


def test_elastic_then_kivi_decode_never_touches_packed_entries():
    """With KIVI after it, the decode eviction drops only full-precision entries: the entry at p
    while it is unpacked, then (once KIVI has packed it) the oldest full-precision entry. Nothing
    packed is ever evicted, entries [0, p) never change, the newest token stays, the budget holds."""
    n, ratio = 120, 0.2
    cache, ctx = _cache_and_ctx(n, d=16, layers=1)
    el, kv = ElasticCache(ratio=ratio), KIVI(bits=2, group=8, residual=32, residual_fraction=1)
    el.compress(cache, ctx)
    kv.compress(cache, ctx)
    layer = cache.layers[0]
    p = ctx.state[("elastic", "p", 0)]
    assert p == 96 - 25 and layer.stored == 96 and layer.stored - layer.residual_len == 64  # p starts unpacked
    ref = layer.positions()[0].tolist()
    initial = list(ref)
    packed_ever: set = set()
    regimes = set()
    g = torch.Generator().manual_seed(3)
    for step in range(120):
        cache.update(torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g), 0)
        packed = layer.stored - layer.residual_len
        el.on_decode(cache, ctx, step)
        ref.append(n + step)
        if n_evicted(len(ref), layer.seen, ratio) >= 1:
            regimes.add(p >= packed)
            del ref[max(p, packed)]
        now = layer.positions()[0].tolist()
        assert now == ref
        seg_pos = {int(x) for s in layer.segments for x in s.pos[0]}
        assert packed_ever <= seg_pos                       # nothing packed was ever evicted
        packed_ever |= seg_pos
        assert now[-1] == n + step and now[:p] == initial[:p]
        assert layer.stored <= (1 - ratio) * layer.seen + 1
    assert regimes == {True, False}                         # both: p unpacked, then packed


def test_recipe_rule_allows_only_full_precision_decode_eviction_with_a_quantizer():
    assert [s.name for s in Recipe.parse("elastic+kivi:2").kv] == ["elastic", "kivi"]
    assert Recipe.parse("elastic:0.3,decode=false+kivi:2").kv[0].decode is False
    with pytest.raises(RecipeError, match="evicts during decoding"):
        Recipe.parse("streaming:recent=64+kivi:2")
    with pytest.raises(RecipeError, match="last KV press"):
        Recipe.parse("kivi:2+elastic")
    for bad in ("elastic:0", "elastic:1.2", "elastic:start_size=-1"):
        with pytest.raises(RecipeError):
            Recipe.parse(bad)


def test_compress_refuses_quantized_layers_and_missing_statistics():
    cache, ctx = _cache_and_ctx()
    with pytest.raises(RuntimeError, match="no attention statistics"):
        ElasticCache().compress(cache, PressContext(token_type=ctx.token_type))
    StreamingLLM(recent=50, sink=2).compress(cache, ctx)
    KIVI(bits=2, group=16, residual=8).compress(cache, ctx)
    with pytest.raises(RuntimeError, match="before the quantizing press"):
        ElasticCache().compress(cache, ctx)


# ----------------------------------------------------------------------------- end to end
def test_observed_scores_equal_eager_attention_received(tiny_dir):
    """Chunked prefill (prefix at encode, question at ask) accumulates the eager attention each
    entry receives, summed over queries and averaged over the 4 query heads (GQA 4 -> 2)."""
    fam = "llava_onevision"
    pipe = mmkv.load(tiny_dir[fam], prefill_chunk=17)
    snaps = capture(pipe, [ElasticCache()])
    video = frames_for(fam, n=6, seed=3)
    enc = pipe.encode(video)
    pipe.ask(enc, QUESTION, max_new_tokens=1)
    ids, positions, _ = prompt(pipe, enc, QUESTION)
    atts = eager_attentions(eager_model(tiny_dir[fam]), pipe, enc, ids, positions)
    for layer, att in enumerate(atts):
        got = snaps["state"][("elastic", "scores", layer)].sum(0)
        torch.testing.assert_close(got, att.mean(0).sum(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_generation_matches_reference_cache(family, tiny_dir, pipes):
    """End to end: budget, protected tokens and merged tensors equal the reference on the
    prefilled cache; the first decode step over it equals plain transformers at the original
    next position; decode keeps the cache at (1 - ratio) * seen; prefill itself is exact."""
    pipe = no_stop(mmkv.load(tiny_dir[family], prefill_chunk=29))
    snaps = capture(pipe, [ElasticCache()])
    video = frames_for(family, n=8, seed=22)
    enc = pipe.encode(video)
    res = pipe.ask(enc, QUESTION, max_new_tokens=12, output_scores=True)
    plain = pipes[family].generate(video, QUESTION, max_new_tokens=1, output_scores=True)
    torch.testing.assert_close(res.scores[0], plain.scores[0], atol=1e-4, rtol=1e-4)
    n = res.stats.prompt_tokens
    f = n_evicted(n, n, 0.2)
    assert res.stats.kv_len_per_layer == [n - f] * pipe.adapter.num_layers
    ref_kv = []
    for i, (pre, post) in enumerate(zip(snaps["pre"].layers, snaps["post"].layers)):
        s = snaps["state"][("elastic", "scores", i)].sum(0)
        kept, rk, rv = ref_compress(pre.keys[0].float(), pre.values[0].float(), s.tolist(), 1, f)
        assert post.positions()[0].tolist() == kept and 0 in kept and n - 1 in kept
        torch.testing.assert_close(post.keys[0].float(), rk, atol=1e-6, rtol=1e-6)
        ref_kv.append((rk[None], rv[None]))
    if len(res.tokens) >= 2:
        _, _, nxt = prompt(pipe, enc, QUESTION)
        ref = hf_step_logits(eager_model(tiny_dir[family]), pipe, ref_kv, res.tokens[0], nxt)
        torch.testing.assert_close(res.scores[1], ref, atol=2e-4, rtol=1e-4)
    assert len(res.tokens) == 12
    per_entry = res.stats.kv_bytes // (n - f)
    assert res.stats.extra["kv_bytes_final"] == simulate_decode(n - f, n, 11) * per_entry
    assert res.stats.extra["elastic_kept_fraction"] == pytest.approx((n - f) / n)


def test_elastic_then_kivi_generates_with_decode_eviction(tiny_dir):
    fam = "qwen2_5_vl"
    video = frames_for(fam, n=16, seed=4)
    only = mmkv.load(tiny_dir[fam], recipe="elastic").generate(video, QUESTION, max_new_tokens=30)
    both = mmkv.load(tiny_dir[fam], recipe="elastic+kivi:bits=2,group=16,residual=16").generate(
        video, QUESTION, max_new_tokens=30)
    assert both.stats.kv_len_per_layer == only.stats.kv_len_per_layer
    assert "int2" in both.stats.kv_bytes_by_class and both.stats.kv_bytes < only.stats.kv_bytes / 2
    assert len(both.tokens) > 0


def test_compress_at_encode_then_questions(tiny_dir):
    """Query-agnostic: with compress_at="encode" the prefix is compressed once, each question
    appends to it, and the first decode step trims back to (1 - ratio) * seen."""
    fam = "llava_onevision"
    pipe = no_stop(mmkv.load(tiny_dir[fam], recipe="elastic", compress_at="encode"))
    enc = pipe.encode(frames_for(fam, n=6, seed=5))
    n0 = enc.prefix_len
    l0 = n0 - n_evicted(n0, n0, 0.2)
    assert enc.cache.lengths() == [l0] * 2
    for question in (QUESTION, "Which colors?"):
        res = pipe.ask(enc, question, max_new_tokens=6)
        n = res.stats.prompt_tokens
        assert res.stats.kv_len_per_layer == [l0 + n - n0] * 2          # the question is appended, not compressed
        per_entry = res.stats.kv_bytes // (l0 + n - n0)
        assert res.stats.extra["kv_bytes_final"] == simulate_decode(l0 + n - n0, n, 5) * per_entry
        assert enc.cache.lengths() == [l0] * 2                           # the encoding is reused intact
