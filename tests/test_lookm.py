"""LOOK-M (arXiv 2406.18139): text-prior probe scores, per-head budgets, the three merge variants
against direct loop references, the official averaged-merge pairing bug, GQA, composition with
KIVI, and generation end to end."""
import math

import pytest
import torch

import mmkv
from conftest import frames_for
from kvref import capture, eager_attentions, eager_model, hf_step_logits, prompt
from mmkv.cache import KIVI, LOOKM, SEPARATOR, TEXT, VISUAL, CompressedCache, PressContext
from mmkv.cache.lookm import lookm_merge, lookm_select
from mmkv.cache.scores import accumulate, attention_received
from mmkv.errors import RecipeError
from mmkv.recipe import Recipe

QUESTION = "What is happening in this video?"


# ----------------------------------------------------------------------------- references
def ref_select(scores, is_text, hh_ratio, recent_ratio):
    """Loop reference of the text-prior selection for one head (entries in sequence order)."""
    n = len(scores)
    hh, rc = int(n * hh_ratio), int(n * recent_ratio)
    if n <= hh + rc:
        return list(range(n))
    recent = set(range(n - rc, n))
    text = {j for j in range(n - rc) if is_text[j]}
    images = sorted((j for j in range(n - rc) if not is_text[j]), key=lambda j: -scores[j])
    return sorted(text | recent | set(images[:max(0, hh - len(text))]))


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def ref_merge(keys, values, kept, evicted, variant):
    """Loop reference of LOOK-M merging. keys/values [H, n, D]; kept/evicted: per-head lists."""
    h_n = keys.shape[0]
    best = {}  # (h, e) -> (similarity, pivot m)
    for h in range(h_n):
        for e in evicted[h]:
            sims = [cos(keys[h, e], keys[h, m]) for m in kept[h]]
            i = max(range(len(sims)), key=lambda t: (sims[t], -t))
            best[h, e] = (sims[i], kept[h][i])
    allowed = {key: True for key in best}
    if variant in ("averaged", "weighted"):
        mean_all = sum(s for s, _ in best.values()) / len(best)
        by_token = {}
        for (h, e), (s, _) in best.items():
            by_token.setdefault(e, []).append(s)
        allowed = {(h, e): sum(by_token[e]) / len(by_token[e]) >= mean_all for (h, e) in best}
    out_k, out_v = [], []
    for h in range(h_n):
        ks, vs = [], []
        for m in kept[h]:
            srcs = [(e, best[h, e][0]) for e in evicted[h] if best[h, e][1] == m and allowed[h, e]]
            k_sum, v_sum = keys[h, m].clone(), values[h, m].clone()
            for e, s in srcs:
                if variant == "pivotal":
                    k_sum += (keys[h, e] + keys[h, m]) / 2
                    v_sum += (values[h, e] + values[h, m]) / 2
                elif variant == "averaged":
                    k_sum += keys[h, e]
                    v_sum += values[h, e]
                elif variant == "weighted":
                    k_sum += s * keys[h, e]
                    v_sum += s * values[h, e]
            ks.append(k_sum / (1 + len(srcs)))
            vs.append(v_sum / (1 + len(srcs)))
        out_k.append(torch.stack(ks))
        out_v.append(torch.stack(vs))
    return torch.stack(out_k), torch.stack(out_v)


# ----------------------------------------------------------------------------- scores
def test_attention_received_matches_dense_reference_with_gqa():
    """Blocked probe rows (GQA, causal by sequence index, shuffled key order) equal the dense sum."""
    g = torch.Generator().manual_seed(0)
    b, hq, hk, lq, lk, d = 1, 6, 2, 7, 23, 8
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hk, lk, d, generator=g)
    kpos = torch.stack([torch.randperm(lk, generator=g) for _ in range(hk)]) + 3  # keys 3..25, any order
    qpos = torch.arange(lk + 3 - lq, lk + 3)                                     # last 7 sequence indices
    rows = torch.tensor([0, 2, 3, 6])
    got = attention_received(q, k, kpos, qpos, 0.3, rows, max_elements=2 * hq * lk)  # 2 rows per block
    ref = torch.zeros(hk, lk)
    for h in range(hq):
        kv = h // (hq // hk)
        for i in rows.tolist():
            s = (k[0, kv] @ q[0, h, i]) * 0.3
            s[kpos[kv] > qpos[i]] = float("-inf")
            ref[kv] += s.softmax(-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # accumulate scatters by sequence index and never touches the previous tensor
    prev = torch.ones(hk, 10)
    acc = accumulate(prev, got, kpos, 26)
    assert torch.equal(prev, torch.ones(hk, 10)) and acc.shape == (hk, 26)
    torch.testing.assert_close(acc[:, 3:].gather(1, kpos - 3), got + (kpos < 10).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("probe", ["text", "all"])
def test_observed_scores_equal_eager_text_rows(tiny_dir, probe):
    """Chunked prefill (prefix at encode, question at ask) accumulates exactly the eager attention
    of the text rows (or all rows), summed over each KV head's query-head group (GQA 4 -> 2)."""
    fam = "qwen2_5_vl"
    pipe = mmkv.load(tiny_dir[fam], prefill_chunk=19)
    snaps = capture(pipe, [LOOKM(probe=probe)])
    video = frames_for(fam, n=6, seed=3)
    enc = pipe.encode(video)
    pipe.ask(enc, QUESTION, max_new_tokens=1)
    ids, positions, _ = prompt(pipe, enc, QUESTION)
    atts = eager_attentions(eager_model(tiny_dir[fam]), pipe, enc, ids, positions)
    tt = snaps["token_type"]
    assert len(tt) == len(ids) and (tt == TEXT).sum() < len(tt) // 2 and (tt == VISUAL).any()
    rows = (tt == TEXT) if probe == "text" else torch.ones(len(tt), dtype=torch.bool)
    for layer, att in enumerate(atts):
        hq = att.shape[0]
        ref = att[:, rows].sum(1).view(2, hq // 2, -1).sum(1)         # [Hk, n]
        torch.testing.assert_close(snaps["state"][("lookm", "scores", layer)], ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- selection and merging
@pytest.mark.parametrize("n,hh,rc", [(97, 0.1, 0.1), (50, 0.3, 0.05), (31, 0.0, 0.2), (20, 0.5, 0.5)])
def test_selection_matches_reference_and_keeps_budget(n, hh, rc):
    g = torch.Generator().manual_seed(n)
    h = 3
    scores = torch.rand(h, n, generator=g)
    is_text = torch.zeros(n, dtype=torch.bool)
    is_text[:4] = True            # system prompt
    is_text[n - 6:] = True        # question (partly inside the recent window)
    pos = torch.arange(n).expand(h, n)
    kept, evicted = lookm_select(scores, is_text.expand(h, n), pos, hh, rc)
    for head in range(h):
        ref = ref_select(scores[head].tolist(), is_text.tolist(), hh, rc)
        assert kept[head].tolist() == ref
        assert sorted(kept[head].tolist() + evicted[head].tolist()) == list(range(n))
    # the budget: max(hh, text outside the recent window) + recent, the same in every head
    n_rc = int(n * rc)
    text_out = int(is_text[:n - n_rc].sum())
    expect = n if n <= int(n * hh) + n_rc else max(int(n * hh), text_out) + n_rc
    assert kept.shape == (h, expect)
    assert all(set(is_text.nonzero().squeeze(1).tolist()) <= set(kept[i].tolist()) for i in range(h))


def test_selection_differs_per_head_and_follows_sequence_order():
    """Heads pick different visual tokens; entry order in storage does not matter, sequence index does."""
    n, h = 40, 2
    scores = torch.zeros(h, n)
    scores[0, 5:10] = 1.0
    scores[1, 20:25] = 1.0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    pos = perm.expand(h, n)                          # entry i holds sequence index perm[i]
    scores_by_entry = scores[:, perm]
    is_text = torch.zeros(h, n, dtype=torch.bool)
    kept, _ = lookm_select(scores_by_entry, is_text, pos, 0.125, 0.1)
    got = [sorted(perm[kept[i]].tolist()) for i in range(h)]
    assert got[0] == [5, 6, 7, 8, 9, 36, 37, 38, 39]
    assert got[1] == [20, 21, 22, 23, 24, 36, 37, 38, 39]
    assert all(perm[kept[i]].tolist() == got[i] for i in range(h))  # stored in sequence order


@pytest.mark.parametrize("variant", ["pivotal", "averaged", "weighted", "none"])
def test_merge_matches_loop_reference(variant):
    g = torch.Generator().manual_seed(5)
    b, h, n, d = 1, 2, 29, 6
    keys = torch.randn(b, h, n, d, generator=g)
    values = torch.randn(b, h, n, d, generator=g)
    kept = torch.stack([torch.sort(torch.randperm(n, generator=g)[:9]).values for _ in range(h)])
    evicted = torch.stack([torch.tensor(sorted(set(range(n)) - set(kept[i].tolist()))) for i in range(h)])
    pos = torch.arange(n).expand(h, n)
    got_k, got_v = lookm_merge(keys, values, kept, evicted, pos, variant)
    if variant == "none":
        ref_k = torch.stack([keys[0, i, kept[i]] for i in range(h)])
        ref_v = torch.stack([values[0, i, kept[i]] for i in range(h)])
    else:
        ref_k, ref_v = ref_merge(keys[0], values[0], kept.tolist(), evicted.tolist(), variant)
    torch.testing.assert_close(got_k[0], ref_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v[0], ref_v, atol=1e-5, rtol=1e-5)
    if variant != "none":
        assert not torch.allclose(got_k[0], torch.stack([keys[0, i, kept[i]] for i in range(h)]))


def test_averaged_merge_pairs_the_filtered_tokens_not_the_official_ones():
    """Official bug: pivots are filtered but the merged keys are not, so the j-th kept pivot gets
    the j-th UNFILTERED evicted key. Here e0 (dissimilar to everything) is filtered out and e1
    (close to k0) merges into k0; the official pairing would average k0 with e0 instead."""
    k0, k1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    e0, e1 = torch.tensor([-1.0, -0.2]), torch.tensor([0.9, 0.1])
    keys = torch.stack([k0, k1, e0, e1])[None, None]                    # [1, 1, 4, 2]
    values = keys * 10
    kept, evicted = torch.tensor([[0, 1]]), torch.tensor([[2, 3]])
    got_k, got_v = lookm_merge(keys, values, kept, evicted, torch.arange(4)[None], "averaged")
    correct = torch.stack([(k0 + e1) / 2, k1])
    # the official pairing: filter = [False, True], index = pivots[filter] = [k0], src = evicted[:1] = e0
    official = torch.stack([(k0 + e0) / 2, k1])
    torch.testing.assert_close(got_k[0, 0], correct)
    torch.testing.assert_close(got_v[0, 0], correct * 10)
    assert not torch.allclose(got_k[0, 0], official)


# ----------------------------------------------------------------------------- on a cache
def _cache_and_ctx(n=60, h=2, d=8, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = CompressedCache(layers)
    for i in range(layers):
        cache.update(torch.randn(1, h, n, d, generator=g), torch.randn(1, h, n, d, generator=g), i)
    tt = torch.full((n,), VISUAL, dtype=torch.int8)
    tt[:3] = TEXT
    tt[n - 5:] = TEXT
    tt[20] = SEPARATOR
    ctx = PressContext(token_type=tt, num_heads=2 * h, num_kv_heads=h, head_dim=d)
    for i in range(layers):
        ctx.state[("lookm", "scores", i)] = torch.rand(h, n, generator=g)
    return cache, ctx


def test_compress_budget_positions_and_text_kept():
    cache, ctx = _cache_and_ctx()
    pre = cache.clone()
    LOOKM().compress(cache, ctx)
    n = 60
    for i, layer in enumerate(cache.layers):
        assert layer.stored == int(0.1 * n) + int(0.1 * n)             # 6 + 6: text (3 outside recent) fits in hh
        assert layer.seen == n and cache.get_seq_length(i) == n          # logical length unchanged
        pos = layer.positions()
        ref = [ref_select(ctx.state[("lookm", "scores", i)][h].tolist(), (ctx.token_type == TEXT).tolist(), 0.1, 0.1)
               for h in range(2)]
        assert pos.tolist() == ref
        assert {0, 1, 2} <= set(pos[0].tolist()) and {0, 1, 2} <= set(pos[1].tolist())
        # pivotal merge of the held tensors: the reference from the pre-compression cache
        evicted = [sorted(set(range(n)) - set(r)) for r in ref]
        ref_k, ref_v = ref_merge(pre.layers[i].keys[0], pre.layers[i].values[0], ref, evicted, "pivotal")
        torch.testing.assert_close(layer.keys[0], ref_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values[0], ref_v, atol=1e-5, rtol=1e-5)
    assert pre.lengths() == [n, n]  # the snapshot was not touched
    assert ctx.stats["lookm_kept_fraction"] == pytest.approx(12 / 60)


def test_compress_refuses_quantized_layers_and_missing_statistics():
    cache, ctx = _cache_and_ctx()
    with pytest.raises(RuntimeError, match="no attention statistics"):
        LOOKM().compress(cache, PressContext(token_type=ctx.token_type))
    KIVI(bits=2, group=16, residual=8).compress(cache, ctx)
    with pytest.raises(RuntimeError, match="before the quantizing press"):
        LOOKM().compress(cache, ctx)


def test_bad_parameters_are_rejected():
    for bad in ("lookm:merge=mean", "lookm:hh_ratio=1.5", "lookm:hh_ratio=0,recent_ratio=0", "lookm:probe=video"):
        with pytest.raises(RecipeError):
            Recipe.parse(bad)
    assert Recipe.parse("lookm:weighted").kv[0].merge == "weighted"
    assert Recipe.parse("look-m+kivi:2").spec() == "lookm:pivotal+kivi:2"


def test_lookm_then_kivi_quantizes_the_kept_entries_per_head():
    cache, ctx = _cache_and_ctx(n=200, d=16)
    LOOKM(hh_ratio=0.2, recent_ratio=0.1).compress(cache, ctx)
    kept = [layer.positions().clone() for layer in cache.layers]
    assert cache.lengths() == [60, 60]
    KIVI(bits=2, group=16, residual=20, residual_fraction=1).compress(cache, ctx)
    for layer, pos in zip(cache.layers, kept):
        assert layer.segments[0].num_tokens == 32 and layer.residual_len == 28
        assert torch.equal(layer.positions(), pos)                    # per-head positions survive packing
        assert not torch.equal(pos[0], pos[1])
        seg = layer.segments[0]
        assert layer.nbytes == sum(x.nbytes for x in (seg.keys.codes, seg.keys.scale, seg.keys.zero, seg.values.codes,
                                                      seg.values.scale, seg.values.zero, layer.keys, layer.values))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_generation_matches_reference_cache(family, tiny_dir, pipes):
    """End to end: the compressed cache equals the loop reference applied to the prefilled cache
    with the observed scores; the first decode step over it equals plain transformers over the
    same entries at the original next position (positions kept); prefill itself is exact."""
    pipe = mmkv.load(tiny_dir[family], prefill_chunk=23)
    snaps = capture(pipe, [LOOKM()])
    video = frames_for(family, n=8, seed=21)
    enc = pipe.encode(video)
    res = pipe.ask(enc, QUESTION, max_new_tokens=4, output_scores=True)
    plain = pipes[family].generate(video, QUESTION, max_new_tokens=1, output_scores=True)
    torch.testing.assert_close(res.scores[0], plain.scores[0], atol=1e-4, rtol=1e-4)
    n = res.stats.prompt_tokens
    tt = snaps["token_type"]
    text_out = int((tt[:n - int(0.1 * n)] == TEXT).sum())
    k = max(int(0.1 * n), text_out) + int(0.1 * n)
    assert res.stats.kv_len_per_layer == [k] * pipe.adapter.num_layers
    a = pipe.adapter
    assert res.stats.kv_bytes == a.num_layers * 2 * a.num_kv_heads * k * a.head_dim * 4  # fp32 tiny model
    ref_kv = []
    for i, (pre, post) in enumerate(zip(snaps["pre"].layers, snaps["post"].layers)):
        scores = snaps["state"][("lookm", "scores", i)]
        kept = [ref_select(scores[h].tolist(), (tt == TEXT).tolist(), 0.1, 0.1) for h in range(scores.shape[0])]
        evicted = [sorted(set(range(n)) - set(r)) for r in kept]
        rk, rv = ref_merge(pre.keys[0].float(), pre.values[0].float(), kept, evicted, "pivotal")
        assert post.positions().tolist() == kept
        torch.testing.assert_close(post.keys[0].float(), rk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.values[0].float(), rv, atol=1e-5, rtol=1e-5)
        ref_kv.append((rk[None], rv[None]))
    if len(res.tokens) >= 2:
        _, _, nxt = prompt(pipe, enc, QUESTION)
        ref = hf_step_logits(eager_model(tiny_dir[family]), pipe, ref_kv, res.tokens[0], nxt)
        torch.testing.assert_close(res.scores[1], ref, atol=2e-4, rtol=1e-4)


def test_no_eviction_when_the_budget_covers_the_prompt(tiny_dir, pipes):
    """hh + recent covering the whole prompt leaves the cache (and the answer) untouched."""
    fam = "llava_onevision"
    video = frames_for(fam, n=6, seed=2)
    plain = pipes[fam].generate(video, QUESTION, max_new_tokens=8)
    res = mmkv.load(tiny_dir[fam], recipe="lookm:hh_ratio=0.6,recent_ratio=0.4").generate(video, QUESTION,
                                                                                           max_new_tokens=8)
    assert res.tokens == plain.tokens
    assert res.stats.kv_len_per_layer == plain.stats.kv_len_per_layer


def test_lookm_then_kivi_generates(tiny_dir):
    fam = "qwen2_5_vl"
    video = frames_for(fam, n=16, seed=4)
    only = mmkv.load(tiny_dir[fam], recipe="lookm:hh_ratio=0.3").generate(video, QUESTION, max_new_tokens=5)
    both = mmkv.load(tiny_dir[fam], recipe="lookm:hh_ratio=0.3+kivi:bits=2,group=16,residual=16").generate(
        video, QUESTION, max_new_tokens=5)
    assert both.stats.kv_len_per_layer == only.stats.kv_len_per_layer
    assert "int2" in both.stats.kv_bytes_by_class
    assert both.stats.kv_bytes < only.stats.kv_bytes
    assert len(both.tokens) > 0
    k = only.stats.kv_len_per_layer[0]
    assert k == math.floor(0.3 * only.stats.prompt_tokens) + math.floor(0.1 * only.stats.prompt_tokens)


def test_lookm_then_vidkv_keeps_each_heads_entries(tiny_dir):
    """LOOK-M's per-head selection survives VidKV quantization (issue 6's composition example)."""
    from mmkv.cache import VidKV
    cache, ctx = _cache_and_ctx(n=200, d=16)
    LOOKM(hh_ratio=0.2, recent_ratio=0.1).compress(cache, ctx)
    kept = [layer.positions().clone() for layer in cache.layers]
    VidKV(stp=0.0, group=8, residual=16).compress(cache, ctx)
    for layer, pos in zip(cache.layers, kept):
        assert layer.segments and layer.stored == 60
        assert torch.equal(layer.positions().sort(1).values, pos)
    fam = "qwen2_5_vl"
    video = frames_for(fam, n=16, seed=4)
    res = mmkv.load(tiny_dir[fam], recipe="lookm:hh_ratio=0.3+vidkv:group=8,residual=16").generate(
        video, QUESTION, max_new_tokens=4)
    assert len(res.tokens) > 0 and any(k.startswith("vidkv") for k in res.stats.kv_bytes_by_class)
