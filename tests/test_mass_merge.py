"""merge="mass" (mmkv/cache/mass.py): a kept entry standing for n evicted-into-it entries weighs
log n more in every later softmax. What it must do: a log-weight acts exactly as that many copies
of the entry; the total weight of a layer's entries survives eviction; exact duplicates evicted
with it leave attention unchanged, through KIVI's segments too; the weights are counted in the
cache's bytes; and recipes that would drop them are refused before any work."""
import pytest
import torch

import mmkv
from conftest import frames_for
from mmkv.cache import KIVI, KVLayer
from mmkv.cache.attend import partial_attention
from mmkv.cache.evict import merge_into_kept
from mmkv.cache.mass import mass_merge
from mmkv.cache.storage import storage_nbytes
from mmkv.errors import RecipeError
from mmkv.recipe import Recipe

QUESTION = "What is happening in this video?"


def test_a_log_weight_is_that_many_copies_of_the_entry():
    g = torch.Generator().manual_seed(5)
    hq, hk, n, d = 4, 2, 7, 16
    q = torch.randn(1, hq, 3, d, generator=g)
    k, v = torch.randn(1, hk, n, d, generator=g), torch.randn(1, hk, n, d, generator=g)
    counts = torch.randint(1, 4, (hk, n), generator=g)
    out, lse = partial_attention(q, k, v, 0.25, None, counts.float().log())
    for h in range(hk):  # per KV head: the same attention over explicitly repeated entries
        rk = k[:, h:h + 1].repeat_interleave(counts[h], dim=2)
        rv = v[:, h:h + 1].repeat_interleave(counts[h], dim=2)
        o, l = partial_attention(q[:, 2 * h:2 * h + 2], rk, rv, 0.25)
        torch.testing.assert_close(out[:, 2 * h:2 * h + 2], o)
        torch.testing.assert_close(lse[:, 2 * h:2 * h + 2], l)


@pytest.mark.parametrize("prior", [False, True])
def test_mass_merge_keeps_the_total_weight_and_joins_the_most_similar_key(prior):
    g = torch.Generator().manual_seed(int(prior))
    h, n, d = 3, 23, 8
    keys = torch.randn(1, h, n, d, generator=g)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(h)])
    kept, evicted = perm[:, :6].sort(1).values, perm[:, 6:]
    logw = torch.rand(h, n, generator=g) * 2 if prior else None
    w = torch.ones(h, n) if logw is None else logw.exp()
    out = mass_merge(keys, kept, evicted, logw)
    assert out.shape == (h, 6)
    torch.testing.assert_close(out.exp().sum(1), w.sum(1))                   # nothing is lost
    for hh in range(h):                                                      # brute force
        kn = torch.nn.functional.normalize(keys[0, hh], dim=-1)
        want = w[hh, kept[hh]].clone()
        for e in evicted[hh].tolist():
            want[int((kn[kept[hh]] @ kn[e]).argmax())] += w[hh, e]
        torch.testing.assert_close(out[hh].exp(), want)


@pytest.mark.parametrize("reach", [1, 3, 17, 10_000])
def test_reach_matches_only_near_kept_entries_and_keeps_the_total_weight(reach):
    """reach > 0: each evicted entry joins the most similar kept key among those within `reach`
    positions, or its nearest kept neighbour on either side; the total weight survives; a reach
    beyond the sequence is the whole-head search exactly."""
    g = torch.Generator().manual_seed(reach)
    h, n, d = 3, 61, 8
    keys = torch.randn(1, h, n, d, generator=g)
    pos = torch.stack([torch.randperm(n, generator=g) for _ in range(h)])     # entry i sits at pos[:, i]
    order = pos.argsort(1)
    keep = torch.zeros(h, n, dtype=torch.bool).scatter_(1, torch.stack([torch.randperm(n, generator=g)[:13]
                                                                          for _ in range(h)]), True)
    ks = keep.gather(1, order)
    kept, evicted = order[ks].view(h, -1), order[~ks].view(h, -1)
    out = mass_merge(keys, kept, evicted, None, pos, reach)
    torch.testing.assert_close(out.exp().sum(1), torch.full((h,), float(n)))
    for hh in range(h):                                                      # brute force over the candidates
        kn = torch.nn.functional.normalize(keys[0, hh], dim=-1)
        kp = pos[hh, kept[hh]]
        want = torch.ones(kept.shape[1])
        for e in evicted[hh].tolist():
            ep = int(pos[hh, e])
            near = (kp - ep).abs() <= reach
            before, after = (kp < ep).nonzero(), (kp > ep).nonzero()
            if len(before):
                near[before.max()] = True
            if len(after):
                near[after.min()] = True
            sim = (kn[kept[hh]] @ kn[e]).masked_fill(~near, float("-inf"))
            want[int(sim.argmax())] += 1
        torch.testing.assert_close(out[hh].exp(), want)
    if reach >= n:
        torch.testing.assert_close(out, mass_merge(keys, kept, evicted))


@pytest.mark.parametrize("tiles", [(7, 5), (4, 9), (1, 1), (3, 100)])
def test_the_tiled_cpu_search_finds_the_brute_force_match(monkeypatch, tiles):
    """The CPU search in ROW_TILE x KEY_TILE tiles (a running max over key tiles): every evicted
    key gets its most cosine-similar kept key, ties (duplicated kept keys) to the lowest index."""
    import mmkv.cache.lookm as lookm

    monkeypatch.setattr(lookm, "ROW_TILE", tiles[0])
    monkeypatch.setattr(lookm, "KEY_TILE", tiles[1])
    g = torch.Generator().manual_seed(sum(tiles))
    b, h, k, e, d = 2, 3, 41, 29, 8
    kept, ev = torch.randn(b, h, k, d, generator=g), torch.randn(b, h, e, d, generator=g)
    kept[:, :, 30] = kept[:, :, 2]                                           # a tie across key tiles
    ev[:, :, 5] = 3 * kept[:, :, 2]
    sim, piv = lookm._best_match(kept, ev)
    cos = torch.nn.functional.normalize(ev, dim=-1) @ torch.nn.functional.normalize(kept, dim=-1).transpose(-1, -2)
    want = cos.max(-1)
    torch.testing.assert_close(sim, want.values)
    assert torch.equal(piv, want.indices)
    assert (piv[:, :, 5] == 2).all()


def test_reach_needs_the_mass_merge():
    with pytest.raises(RecipeError, match="needs merge='mass'"):
        Recipe.parse("snapkv:0.5,reach=64")
    with pytest.raises(RecipeError, match="reach"):
        Recipe.parse("observed:0.5,merge=mass,reach=-1")
    assert Recipe.parse("observed:0.5,merge=mass,reach=64").kv[0].reach == 64


def duplicated_layer(seed: int, n: int = 40, dup: int = 24, d: int = 16):
    """A layer whose last `dup` entries copy earlier ones exactly (keys and values), and the keep
    mask that evicts the copies."""
    g = torch.Generator().manual_seed(seed)
    base = n - dup
    k, v = torch.randn(1, 2, base, d, generator=g), torch.randn(1, 2, base, d, generator=g)
    src = torch.randint(0, base, (dup,), generator=g)
    k, v = torch.cat([k, k[:, :, src]], 2), torch.cat([v, v[:, :, src]], 2)
    layer = KVLayer()
    layer.update(k, v)
    keep = torch.zeros(2, n, dtype=torch.bool)
    keep[:, :base] = True
    return layer, keep, k, v


def test_evicting_exact_duplicates_with_mass_leaves_attention_unchanged_through_kivi():
    layer, keep, k, v = duplicated_layer(0)
    nk, nv, p, w = merge_into_kept(layer.keys, layer.values, layer.pos, keep, torch.zeros_like(keep), "mass")
    layer.set_residual(nk, nv, p, w)
    assert layer.stored == 16 and torch.equal(layer.pos, torch.arange(16, dtype=torch.int32).expand(2, -1))
    g = torch.Generator().manual_seed(1)
    kq, vq, q = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 4, 1, 16, generator=g)
    layer.update(kq, vq)                                                     # a new token stands for itself
    assert layer.logw.shape == (2, 17) and float(layer.logw[:, -1].abs().max()) == 0
    full, _ = partial_attention(q, torch.cat([k, kq], 2), torch.cat([v, vq], 2), 0.25)
    plain, _ = partial_attention(q, torch.cat([k[:, :, :16], kq], 2), torch.cat([v[:, :, :16], vq], 2), 0.25)
    got = layer.attend(q, 0.25).transpose(1, 2)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert (plain - full).abs().max() > 1e-2                                # plain eviction does change it
    before = layer.logw.clone()
    KIVI(bits=8, group=8, residual=1).flush(layer, 1)                        # the weights travel into the codes
    seg = layer.segments[0]
    assert seg.logw is not None and torch.equal(torch.cat([seg.logw, layer.logw], 1), before)
    torch.testing.assert_close(layer.attend(q, 0.25).transpose(1, 2), full, atol=3e-2, rtol=0)
    assert layer.nbytes == seg.keys.nbytes + seg.values.nbytes + seg.logw.nbytes + layer.keys.nbytes \
        + layer.values.nbytes + layer.logw.nbytes
    assert storage_nbytes([layer]) == layer.nbytes + layer.index_nbytes
    assert seg.nbytes == seg.keys.nbytes + seg.values.nbytes + seg.logw.nbytes


def test_a_press_that_would_drop_the_weights_raises():
    layer, keep, *_ = duplicated_layer(2)
    nk, nv, p, w = merge_into_kept(layer.keys, layer.values, layer.pos, keep, torch.zeros_like(keep), "mass")
    layer.set_residual(nk, nv, p, w)
    with pytest.raises(RuntimeError, match="mass merge"):
        layer.set_residual(nk, nv, p)


def test_pipeline_mass_merge_at_encode(tiny_dir):
    fam = "qwen2_vl"
    video = frames_for(fam, n=16, seed=31)
    base = mmkv.load(tiny_dir[fam])
    ref = base.ask(base.encode(video), QUESTION, max_new_tokens=8).tokens
    zero = mmkv.load(tiny_dir[fam], recipe="observed:0,merge=mass", compress_at="encode")
    enc = zero.encode(video)
    assert all(layer.logw is not None and float(layer.logw.abs().max()) == 0 for layer in enc.cache.layers)
    assert zero.ask(enc, QUESTION, max_new_tokens=8).tokens == ref               # nothing evicted: the same answer
    pipe = mmkv.load(tiny_dir[fam], recipe="observed:0.6,share=1,merge=mass+kivi:2,group=16,residual=8",
                     compress_at="encode")
    enc = pipe.encode(video)
    n = enc.prefix_len
    for layer in enc.cache.layers:
        w = torch.cat([s.logw for s in layer.segments] + [layer.logw], 1)
        assert layer.segments and w.shape == (layer.pos.shape[0], layer.stored) and layer.stored < n
        torch.testing.assert_close(w.exp().sum(1), torch.full((w.shape[0],), float(n)))  # every entry accounted for
    a, b = pipe.ask(enc, QUESTION, max_new_tokens=6), pipe.ask(enc, QUESTION, max_new_tokens=6)
    assert a.tokens == b.tokens and len(a.tokens) > 0
    assert a.stats.kv_bytes < a.stats.kv_bytes_fp16 * 0.5


@pytest.mark.parametrize("recipe, match", [
    ("observed:0.5,merge=mass+vidkv", "only kivi"),
    ("zipvl:kv=none+snapkv:0.5,merge=mass", "prefill policy"),
    ("observed:0.5,merge=mass,budget=head", "same count in every head"),
])
def test_recipes_that_would_lose_the_weights_are_refused(recipe, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.parse(recipe)
