"""kivi:salient=F (mmkv/cache/salient.py): the fraction F of each head's to-be-quantized entries that
the prompt's own rows attend to most (normalized attention received) stay exact. What it must do:
salient=0 is plain KIVI; each head keeps round(F * candidates) exact entries, the top-scored ones
by an independent computation of the normalized attention, bit for bit as they were; attention
over the cache equals plain attention over its dequantized entries; bytes are those of the stored
tensors; decoding flushes into the quantized segment only; it cuts the error where attention is
sharp; it runs in the pipeline at encode after a mass merge; bad values and a missing
observation are refused with clear errors."""
import pytest
import torch

import mmkv
from conftest import frames_for
from mmkv.cache import KIVI, CompressedCache
from mmkv.cache.attend import partial_attention
from mmkv.cache.base import VISUAL, PressContext
from mmkv.cache.dense import DenseSegment
from mmkv.cache.storage import storage_nbytes
from mmkv.errors import RecipeError
from mmkv.recipe import Recipe


def observed(k, q, scaling):
    """Reference: causal softmax attention of every row, summed per key over rows and the query
    heads of each KV head's group, divided by the rows that see the key and by the group size."""
    b, hk, t, d = k.shape
    hq = q.shape[1]
    kg = k.repeat_interleave(hq // hk, 1)
    logits = (q @ kg.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    a = logits.softmax(-1).sum(2).sum(0)                                 # [Hq, t]
    a = a.view(hk, hq // hk, t).mean(1)
    return a / torch.arange(t, 0, -1).float()                            # rows t - j see key j


def prefilled(seed, t=101, hk=2, hq=4, d=32, planted=0):
    g = torch.Generator().manual_seed(seed)
    k, v, q = (torch.randn(1, hk, t, d, generator=g), torch.randn(1, hk, t, d, generator=g),
               torch.randn(1, hq, t, d, generator=g))
    if planted:                                   # a few keys every query attends to sharply
        m = torch.randn(d, generator=g)
        m = m / m.norm()
        q = q + 3 * m
        k[:, :, torch.randperm(t - 40, generator=g)[:planted] + 8] = 12 * m
    cache = CompressedCache(1)
    cache.layers[0].update(k, v)
    ctx = PressContext(token_type=torch.full((t,), VISUAL, dtype=torch.int8), head_dim=d)
    return cache, ctx, k, v, q


def compressed(seed, salient, t=101, **kw):
    cache, ctx, k, v, q = prefilled(seed, t=t, planted=kw.pop("planted", 0))
    press = KIVI(salient=salient, **kw)
    for s in range(0, t, 32):   # prefill chunks of 32 rows: every row is a probe (probes=16: 2 x 16)
        press.observe(0, cache.layers[0], q[:, :, s:s + 32], k, v, q.shape[-1] ** -0.5, s, ctx)
    press.compress(cache, ctx)
    return cache, ctx, k, v, q


def test_salient_zero_is_plain_kivi():
    a, *_ = compressed(1, 0.0, group=16, residual=16, residual_fraction=1)
    cache, ctx, k, v, q = prefilled(1)
    KIVI(group=16, residual=16, residual_fraction=1).compress(cache, None)
    la, lb = a.layers[0], cache.layers[0]
    assert [s.label for s in la.segments] == [s.label for s in lb.segments] == ["int2"]
    assert torch.equal(la.segments[0].keys.codes, lb.segments[0].keys.codes)
    assert "kivi_exact_entries" not in ctx.stats


@pytest.mark.parametrize("frac,t,group,residual", [(0.1, 101, 16, 16), (0.05, 333, 32, 40), (0.3, 64, 8, 5)])
def test_each_head_keeps_the_top_scored_entries_exact(frac, t, group, residual):
    cache, ctx, k, v, q = compressed(2 + t, frac, t=t, group=group, residual=residual, residual_fraction=1)
    layer = cache.layers[0]
    exact = layer.segments[0]
    assert exact.label == "exact" and isinstance(exact, DenseSegment)
    cand = t - residual
    s = round(frac * cand)
    assert exact.num_tokens == s == ctx.stats["kivi_exact_entries"]
    ref = observed(k, q, q.shape[-1] ** -0.5)[:, :cand]
    for h in range(k.shape[1]):
        assert set(exact.pos[h].tolist()) == set(ref[h].topk(s).indices.tolist())
        p = exact.pos[h].long()
        assert torch.equal(exact.keys.data[0, h], k[0, h, p]) and torch.equal(exact.values.data[0, h], v[0, h, p])
        assert bool((p[1:] > p[:-1]).all())                              # in sequence order
    # every entry is held once, the window's `residual` entries exact at the end
    pos = layer.positions()
    assert all(sorted(pos[h].tolist()) == list(range(t)) for h in range(pos.shape[0]))
    assert layer.residual_len >= residual and bool((layer.pos[:, -residual:] >= t - residual).all())


def test_attention_equals_plain_attention_over_the_dequantized_entries():
    cache, ctx, k, v, q = compressed(5, 0.1, t=150, group=16, residual=16, residual_fraction=1)
    layer = cache.layers[0]
    qn = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(6))
    layer.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    kd, vd = layer.dequantized()
    ref, _ = partial_attention(qn, kd, vd, 32 ** -0.5)
    out = layer.attend(qn, 32 ** -0.5)                                  # [B, Lq, Hq, D]
    torch.testing.assert_close(out.transpose(1, 2), ref, atol=1e-5, rtol=1e-5)


def test_bytes_are_the_stored_tensors():
    plain, *_ = compressed(7, 0.0, t=200, group=16, residual=16, residual_fraction=1)
    cache, *_ = compressed(7, 0.1, t=200, group=16, residual=16, residual_fraction=1)
    exact = cache.layers[0].segments[0]
    b, h, s, d = exact.keys.shape
    assert exact.nbytes == 2 * b * h * s * d * 4                        # fp32 keys and values
    assert cache.nbytes() == sum(seg.nbytes for seg in cache.layers[0].segments) + \
        cache.layers[0].keys.nbytes + cache.layers[0].values.nbytes
    assert cache.storage_nbytes() == cache.nbytes() + cache.index_nbytes() == storage_nbytes(cache.layers)
    assert cache.bytes_by_class()["exact"] == exact.nbytes
    assert cache.nbytes() > plain.nbytes()


def test_decoding_flushes_into_the_quantized_segment_only():
    cache, ctx, k, v, q = compressed(8, 0.1, t=120, group=16, residual=16, residual_fraction=1)
    layer = cache.layers[0]
    before = layer.segments[0]
    g = torch.Generator().manual_seed(9)
    for _ in range(40):
        layer.update(torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g))
    assert [s.label for s in layer.segments] == ["exact", "int2"]
    assert layer.segments[0] is before
    assert layer.stored == 160


def test_cuts_the_error_where_attention_is_sharp():
    errs = {}
    for frac in (0.0, 0.05):
        cache, ctx, k, v, q = compressed(10, frac, t=400, group=32, residual=32, residual_fraction=1, planted=6)
        kd, vd = cache.layers[0].dequantized()
        qs = q[:, :, -8:]
        ref, _ = partial_attention(qs, k, v, 32 ** -0.5)
        out, _ = partial_attention(qs, kd, vd, 32 ** -0.5)
        errs[frac] = ((out - ref).norm() / ref.norm()).item()
    assert errs[0.05] < 0.5 * errs[0.0], errs


def test_runs_at_encode_after_a_mass_merge(tiny_dir):
    fam = "qwen2_vl"
    video = frames_for(fam, n=16, seed=33)
    r = "observed:0.6,share=1,merge=mass+kivi:2,group=16,residual=8,salient=0.2"
    pipe = mmkv.load(tiny_dir[fam], recipe=r, compress_at="encode")
    enc = pipe.encode(video)
    for layer in enc.cache.layers:
        labels = [s.label for s in layer.segments]
        assert labels[0] == "exact" and "int2" in labels
        assert layer.segments[0].logw is not None                       # the mass merge's weights travel along
    a = pipe.ask(enc, "What is happening in this video?", max_new_tokens=6)
    b = pipe.ask(enc, "What is happening in this video?", max_new_tokens=6)
    assert a.tokens == b.tokens and len(a.tokens) > 0
    assert a.stats.extra["kivi_exact_entries"] > 0
    plain = mmkv.load(tiny_dir[fam], recipe=r.replace(",salient=0.2", ""), compress_at="encode")
    assert a.stats.kv_bytes > plain.ask(plain.encode(video), "What is happening in this video?",
                                        max_new_tokens=6).stats.kv_bytes


def test_bad_values_and_a_missing_observation_are_refused():
    for bad in ("kivi:2,salient=1", "kivi:2,salient=-0.1"):
        with pytest.raises(RecipeError, match="salient"):
            Recipe.parse(bad)
    cache, ctx, *_ = prefilled(11)
    with pytest.raises(RuntimeError, match="observe"):
        KIVI(salient=0.1, group=16, residual=16, residual_fraction=1).compress(cache, ctx)


def test_refused_after_bilevel_where_it_would_do_nothing(tiny_dir):
    with pytest.raises(RecipeError, match="salient"):
        mmkv.load(tiny_dir["qwen2_vl"], recipe="bilevel+kivi:2,salient=0.05", compress_at="encode").encode(
            frames_for("qwen2_vl", n=8, seed=1))
