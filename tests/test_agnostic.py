"""Query-agnostic eviction presses (observed, snapkv, adakv, expected) and budgets: budgets mean
what they say (per layer, per head, ragged storage with real bytes), positions survive
compression (the question over the compressed cache equals plain transformers over the kept
entries), encode once / ask many, composition with KIVI, LOOK-M / Elastic Cache / StreamingLLM
before the question, and `needs_question` on every KV stage."""
import math

import pytest
import torch

import mmkv
from conftest import frames_for
from kvref import capture
from mmkv.cache import (KIVI, LOOKM, AdaKV, CompressedCache, ElasticCache, ExpectedAttention, ObservedAttention,
                        RaggedSegment, SnapKV, StreamingLLM)
from mmkv.cache.attend import partial_attention
from mmkv.cache.base import TEXT
from mmkv.cache.budgets import head_budgets, layer_budgets, mass_entries, select, uniform_keep
from mmkv.errors import RecipeError
from mmkv.recipe import Recipe
from mmkv.stages import STAGES

QUESTION = "What is happening in this video?"


# ----------------------------------------------------------------------------- budgets
def test_uniform_and_layer_budgets_keep_the_total():
    assert uniform_keep(517, 0.9) == 52 and uniform_keep(10, 0.0) == 10 and uniform_keep(3, 0.99) == 1
    sizes = [100, 100, 100, 100]
    base = layer_budgets(sizes, 0.75)
    assert base == [25] * 4
    ada = layer_budgets(sizes, 0.75, needs=[1, 10, 40, 90])
    assert sum(ada) == 100 and ada == sorted(ada) and ada[0] >= 0.2 * 25 - 1 and ada[3] <= 100
    capped = layer_budgets([10, 200, 200], 0.5, needs=[1000, 1, 1])       # layer 0 wants more than it has
    assert capped[0] == 10 and sum(capped) == sum(uniform_keep(n, 0.5) for n in [10, 200, 200])
    m = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    assert mass_entries(m, 0.75) == 2 and mass_entries(m, 0.95) == 4 and mass_entries(m, 0.5) == 1


def test_head_budgets_follow_adakv_and_sum_exactly():
    g = torch.Generator().manual_seed(0)
    h, n, k = 4, 50, 10
    scores = torch.rand(h, n, generator=g)
    scores[0] *= 10                                                            # head 0 dominates
    prot = torch.zeros(h, n, dtype=torch.bool)
    prot[:, :2] = True
    b = head_budgets(scores, k, prot, alpha=0.2)
    assert int(b.sum()) == h * k and bool((b >= 2).all()) and int(b[0]) == b.max()
    free = h * (k - 2)
    wins = torch.bincount(scores.masked_fill(prot, -1).reshape(-1).topk(free).indices // n, minlength=h)
    want = 0.2 * free / h + 0.8 * wins.float() + 2
    assert (b.float() - want).abs().max() <= 1
    assert head_budgets(scores, k, prot, alpha=1.0).tolist() == [k] * h       # alpha = 1: uniform
    keep = select(scores, b, prot)
    assert keep.sum(1).tolist() == b.tolist() and bool(keep[:, :2].all())
    for hh in range(h):  # the kept are the top scores of their head
        free_s = scores[hh, 2:]
        kept_s = free_s[keep[hh, 2:]]
        assert kept_s.numel() == 0 or float(kept_s.min()) >= float(free_s[~keep[hh, 2:]].max())


def test_ragged_segment_attention_equals_per_head_attention_and_stores_no_padding():
    g = torch.Generator().manual_seed(2)
    hk, gq, d, lq = 2, 3, 8, 5
    lens = [7, 2]
    ks = [torch.randn(1, n, d, generator=g) for n in lens]
    vs = [torch.randn(1, n, d, generator=g) for n in lens]
    seg = RaggedSegment.from_heads(ks, vs, [torch.arange(n) * 3 for n in lens])
    q = torch.randn(1, hk * gq, lq, d, generator=g)
    out, lse = seg.fused_attention(q, 0.4)
    for h in range(hk):
        o, l_ = partial_attention(q[:, h * gq:(h + 1) * gq], ks[h][:, None], vs[h][:, None], 0.4)
        torch.testing.assert_close(out[:, h * gq:(h + 1) * gq], o)
        torch.testing.assert_close(lse[:, h * gq:(h + 1) * gq], l_)
    assert seg.nbytes == 2 * sum(lens) * d * 4 and seg.entries == 9
    assert seg.pos.tolist() == [[0, 3, 6, 9, 12, 15, 18], [0, 3, -1, -1, -1, -1, -1]]
    with pytest.raises(RuntimeError, match="ragged"):
        seg.keys.dequantize(torch.float32)


# ----------------------------------------------------------------------------- end to end
def question_logits_reference(pipe, enc_cache, enc, question):
    """Plain transformers: the question prefilled over a DynamicCache holding the compressed
    entries (same per head), at the uncompressed positions; last-position logits."""
    from transformers import DynamicCache

    a = pipe.adapter
    cache = DynamicCache()
    for i, layer in enumerate(enc_cache.layers):
        cache.update(layer.keys.float(), layer.values.float(), i)
    suf = a.suffix(question, enc.kind, enc.prefix.next_text_position)
    with torch.inference_mode():
        out = a.text_model(inputs_embeds=a.embed(suf.ids)[None], position_ids=a.model_positions(suf.positions),
                           past_key_values=cache, use_cache=True)
        return a.lm_head(out.last_hidden_state[:, -1]).float()[0]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("spec", ["observed:0.75", "snapkv:0.6,window=8", "expected:0.7", "observed:0.8,share=1",
                                  "observed:0.75,merge=pivotal", "observed:0.75,budget=layer"])
def test_encode_compression_keeps_the_budget_and_positions(family, spec, tiny_dir):
    """compress_at="encode": every layer keeps its budget (uniform: round((1 - ratio) n)), text
    entries are never evicted, kept entries keep their sequence indices, and the question's
    logits over the compressed cache equal plain transformers over the same entries."""
    pipe = mmkv.load(tiny_dir[family], recipe=spec, compress_at="encode", prefill_chunk=29)
    press = pipe.recipe.kv[0]
    enc = pipe.encode(frames_for(family, n=8, seed=11))
    n = enc.prefix_len
    lengths = enc.cache.lengths()
    if press.budget == "uniform":
        assert lengths == [uniform_keep(n, press.ratio)] * pipe.adapter.num_layers
    else:
        assert sum(lengths) == pipe.adapter.num_layers * uniform_keep(n, press.ratio) and max(lengths) <= n
    text = (enc.token_type == TEXT).nonzero().squeeze(1)
    for layer in enc.cache.layers:
        pos = layer.pos.long()
        assert bool((pos[:, 1:] > pos[:, :-1]).all())                          # sequence order, no duplicates
        assert all(set(text.tolist()) <= set(p.tolist()) for p in pos)          # text kept in every head
    res = pipe.ask(enc, QUESTION, max_new_tokens=1, output_scores=True)
    ref = question_logits_reference(pipe, enc.cache, enc, QUESTION)
    torch.testing.assert_close(res.scores[0], ref, atol=2e-4, rtol=1e-4)
    assert res.stats.extra[f"{press.name}_kept_fraction"] == pytest.approx(sum(lengths) / (len(lengths) * n))


def test_per_head_budgets_store_ragged_heads_with_real_bytes(tiny_dir):
    fam = "qwen2_5_vl"
    pipe = mmkv.load(tiny_dir[fam], recipe="adakv:0.75,window=4,alpha=0", compress_at="encode")
    enc = pipe.encode(frames_for(fam, n=8, seed=12))
    keep = uniform_keep(enc.prefix_len, 0.75)
    ragged = [layer.segments[0] for layer in enc.cache.layers if layer.segments]
    assert ragged and all(isinstance(s, RaggedSegment) for s in ragged)
    for seg in ragged:
        assert sum(seg.lengths) == 2 * keep and len(set(seg.lengths)) > 1
    d = pipe.adapter.head_dim
    dense = [layer for layer in enc.cache.layers if not layer.segments]
    assert enc.cache.nbytes() == 2 * 4 * d * (sum(sum(s.lengths) for s in ragged)
                                              + sum(2 * layer.residual_len for layer in dense))
    a = pipe.ask(enc, QUESTION, max_new_tokens=4)
    b = pipe.ask(enc, QUESTION, max_new_tokens=4)
    assert a.tokens == b.tokens and len(a.tokens) > 0
    assert a.stats.kv_bytes < a.stats.kv_bytes_fp16 * 2 * 0.5                 # fp32 cache, 25% kept (+question)


def test_encode_once_ask_many_is_order_independent(tiny_dir):
    fam = "qwen2_vl"
    pipe = mmkv.load(tiny_dir[fam], recipe="observed:0.75,share=1+kivi:2,group=16,residual=8",
                     compress_at="encode")
    enc = pipe.encode(frames_for(fam, n=16, seed=13))
    assert any(layer.segments for layer in enc.cache.layers)                  # evicted, then quantized at encode
    qs = [QUESTION, "Which colors?", "Count the shapes."]
    first = [pipe.ask(enc, q, max_new_tokens=5).tokens for q in qs]
    again = [pipe.ask(enc, q, max_new_tokens=5).tokens for q in reversed(qs)][::-1]
    assert first == again


def test_eviction_then_quantization_quantizes_the_kept_entries(tiny_dir):
    fam = "qwen2_vl"
    video = frames_for(fam, n=32, seed=14)
    only = mmkv.load(tiny_dir[fam], recipe="snapkv:0.75", compress_at="encode").encode(video)
    both = mmkv.load(tiny_dir[fam], recipe="snapkv:0.75+kivi:2,group=16,residual=8", compress_at="encode").encode(video)
    for a, b in zip(only.cache.layers, both.cache.layers):
        assert b.stored == a.stored and torch.equal(b.positions().sort(1).values, a.positions().sort(1).values)
        assert b.segments and b.residual_len <= 8 + 16
    assert both.cache.nbytes() < only.cache.nbytes() / 2


def test_lookm_runs_before_the_question_with_an_observed_fallback(tiny_dir):
    """No text row can see the video before the question (only the template's delimiter): LOOK-M
    ranks by observed attention at encode, keeps its text and recent window, within `ratio`."""
    fam = "qwen2_vl"
    pipe = mmkv.load(tiny_dir[fam], recipe="lookm:ratio=0.8,merge=none", compress_at="encode")
    assert pipe.kv_encode and not pipe.kv_ask
    snaps = capture(pipe, list(pipe.recipe.kv))
    enc = pipe.encode(frames_for(fam, n=8, seed=15))
    n = enc.prefix_len
    assert ("lookm", 0, "sum") in snaps["state"] and ("lookm", "scores", 0) in snaps["state"]
    hh = rec = int(n * 0.1)
    text = int((enc.token_type == TEXT).sum())
    assert enc.cache.lengths()[0] == max(hh, text - 1) + rec                    # vision_end is in the recent window
    res = pipe.ask(enc, QUESTION, max_new_tokens=2)
    assert res.stats.kv_len_per_layer[0] == enc.cache.lengths()[0] + res.stats.prompt_tokens - n
    with pytest.raises(RecipeError):
        Recipe.parse("lookm:ratio=1.0")
    assert LOOKM(ratio=0.5).budget == (0.25, 0.25) and LOOKM().budget == (0.1, 0.1)


@pytest.mark.parametrize("spec", ["elastic:0.6,score=observed", "elastic:0.6,probes=4", "lookm:ratio=0.6,score=window"])
def test_lookm_and_elastic_take_any_importance(spec, tiny_dir):
    fam = "qwen2_5_vl"
    pipe = mmkv.load(tiny_dir[fam], recipe=spec, compress_at="encode")
    enc = pipe.encode(frames_for(fam, n=8, seed=16))
    n = enc.prefix_len
    kept = enc.cache.lengths()[0]
    assert kept < 0.5 * n
    assert len(pipe.ask(enc, QUESTION, max_new_tokens=2).tokens) >= 0


def test_streaming_takes_a_ratio(tiny_dir):
    fam = "llava_onevision"
    pipe = mmkv.load(tiny_dir[fam], recipe="streaming:ratio=0.75,decode=false", compress_at="encode")
    enc = pipe.encode(frames_for(fam, n=8, seed=17))
    n = enc.prefix_len
    pos = enc.cache.layers[0].pos[0].tolist()
    keep = uniform_keep(n, 0.75)
    assert pos == list(range(4)) + list(range(n - keep + 4, n))
    assert Recipe.parse("streaming:64").kv[0].budget == 68                    # the window form still works
    assert Recipe.parse("streaming:ratio=0.5,decode=false+kivi:2")             # composes (decode off is required)


def test_needs_question_on_every_kv_stage():
    import mmkv.cache  # noqa: F401  (registers every press)

    kv = {name: cls for name, cls in STAGES.items() if cls.kind == "kv"}
    assert {"observed", "snapkv", "adakv", "expected", "lookm", "elastic", "streaming", "kivi", "vidkv"} <= set(kv)
    for name, cls in kv.items():
        assert isinstance(cls.needs_question, bool)
        assert cls.needs_question == (cls.name == "vidkv"), name       # VidKV: its STP reads the question
    assert not ObservedAttention.needs_question and not SnapKV.needs_question and not AdaKV.needs_question
    assert not ExpectedAttention.needs_question and not LOOKM.needs_question and not ElasticCache.needs_question
    assert not StreamingLLM.needs_question and not KIVI.needs_question


def test_bad_parameters_are_recipe_errors():
    for bad in ("observed:ratio=1.5", "observed:budget=global", "snapkv:merge=mean", "snapkv:kernel=4",
                "expected:rows=video", "adakv:alpha=2", "elastic:score=knorm", "lookm:score=random",
                "streaming:ratio=-0.1", "observed:probes=-1"):
        with pytest.raises(RecipeError):
            Recipe.parse(bad)


def test_compress_refuses_quantized_layers_and_missing_statistics():
    from mmkv.cache import PressContext

    cache = CompressedCache(1)
    cache.layers[0].update(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))
    ctx = PressContext(token_type=torch.ones(40, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="no attention statistics"):
        ObservedAttention().compress(cache, ctx)
    KIVI(bits=2, group=8, residual=8).compress(cache, ctx)
    with pytest.raises(RuntimeError, match="before the quantizing press"):
        SnapKV().compress(cache, ctx)
    assert math.isclose(uniform_keep(40, 0.5), 20)
