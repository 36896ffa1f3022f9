"""Bi-level KV (Video-XL-2): chunked prefill, sparse level on the device, dense level offloaded,
per-question reload. Exactness when every chunk is dense, original positions, real bytes, encode
once / ask many, disk = CPU offload, follow-ups re-select, budgets, the bench fields."""
import json

import pytest
import torch

import mmkv
from conftest import frames_for
from mmkv.cache.bilevel.parts import DenseSegment, storage_bytes
from mmkv.cache.bilevel.relevance import choose, relevance, summarize
from mmkv.cache.bilevel.sparse import KEY
from mmkv.cache.core import QuantSegment
from mmkv.errors import RecipeError

Q = "What is happening in this video?"
QUESTIONS = ["What is happening in this video?", "What color is the ball?", "Describe the last scene."]


def _enc_state(enc):
    return enc.prefill_state["state"][(KEY,)]


def _kv_tensors(cache):
    out = []
    for layer in cache.layers:
        out += [layer.keys, layer.values] + [t for s in layer.segments for t in (s.keys, s.values)]
        out += [w for w in [layer.logw] + [s.logw for s in layer.segments] if w is not None]  # mass=1's weights
    return out


@pytest.mark.parametrize("spec", ["bilevel:1.0,cross=dense,frames=4", "bilevel:1.0,keep=1.0,frames=4",
                                  "bilevel:1.0,cross=dense,frames=4,keep=0.3,mass=1",
                                  "bilevel:1.0,frames=4,keep=0.3,window=16",
                                  "bilevel:1.0,frames=4,keep=0.3,prekeep=1.0"])
def test_every_chunk_dense_equals_uncompressed(family, pipes, spec):
    """All chunks brought back (budget 1) with dense cross-chunk attention (cross=dense, a dense
    window longer than the video, or a prefill that sees every entry: prekeep=1), or a sparse
    level that keeps everything: token for token the uncompressed answer, logits equal."""
    base = pipes[family]
    video = frames_for(family, n=12, seed=5)
    ref = base.generate(video, Q, max_new_tokens=10, output_scores=True)
    res = base.with_recipe(spec).generate(video, Q, max_new_tokens=10, output_scores=True)
    ex = res.stats.extra
    assert ex["bilevel_chunks"] >= 3
    assert res.tokens == ref.tokens
    torch.testing.assert_close(torch.stack(res.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    if "cross=dense" in spec:   # every layer brought every chunk back
        assert all(c == list(range(ex["bilevel_chunks"])) for c in ex["bilevel_chosen"])
        assert ex["bilevel_offloaded_bytes"] > 0


def test_positions_are_the_original_ones(pipes):
    """Every entry of both levels is the uncompressed cache's entry at the same sequence index:
    in layer 0 exactly (keys depend only on embeddings and positions), and in layer 1 for the
    first chunk (it attends to the same text and itself); each chunk's entries are split
    between the levels, every one exactly once."""
    fam = "qwen2_vl"  # 3-D M-RoPE
    video = frames_for(fam, n=12, seed=6)
    full = pipes[fam].encode(video)
    pipe = pipes[fam].with_recipe("bilevel:0.2,keep=0.25,frames=4")
    enc = pipe.encode(video)
    st = _enc_state(enc)
    plan = st.plan
    for idx in (0, 1):
        ref_k, ref_v = full.cache.layers[idx].keys[0], full.cache.layers[idx].values[0]   # [H, L, D]
        parts = st.pool[idx] + [st.offload.fetch(p, "cpu") for row in st.dense[idx] for p in row]
        got = {}
        for p in parts:
            k, v = p.keys.dequantize(torch.float32)[0], p.values.dequantize(torch.float32)[0]
            for h in range(k.shape[0]):
                for j, s in enumerate(p.pos[h].tolist()):
                    assert (h, s) not in got
                    got[(h, s)] = (k[h, j], v[h, j])
        every = [s for c in range(plan.n) for s in range(int(plan.starts[c]), int(plan.ends[c]))]
        assert sorted(got) == sorted((hh, s) for hh in range(ref_k.shape[0]) for s in every)
        first = range(int(plan.starts[0]), int(plan.ends[0]))
        check = got if idx == 0 else {key: val for key, val in got.items() if key[1] in first}
        for (hh, s), (k, v) in check.items():
            torch.testing.assert_close(k, ref_k[hh, s].float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, ref_v[hh, s].float(), atol=1e-5, rtol=1e-5)
    # the device tail holds exactly the text (no chunk entry is left in full precision)
    tail = enc.cache.layers[0].pos[0]
    assert bool((plan.chunk_of(tail) < 0).all())


@pytest.mark.parametrize("spec", ["bilevel:0.3,frames=4", "bilevel:0.3,frames=4,keep=0.5+kivi:2,group=8,residual=8",
                                  "bilevel:0.3,frames=4,offload=disk", "bilevel:0.3,frames=4,keep=0.2,prekeep=0.6",
                                  "bilevel:0.3,frames=4,keep=0.25,prekeep=0.7+kivi:2,group=8,residual=8"])
def test_levels_bytes_are_the_stored_tensors(pipes, spec):
    pipe = pipes["qwen2_vl"].with_recipe(spec)
    enc = pipe.encode(frames_for("qwen2_vl", n=16, seed=7))
    st = _enc_state(enc)
    ex = enc.prefill_state["stats"]
    offloaded = [p for row in st.dense for parts in row for p in parts]
    if st.offload.mode == "cpu":
        # every offloaded tensor is its own storage: the storages are exactly the bytes counted
        assert storage_bytes(offloaded) == st.offload.stored_bytes == ex["bilevel_offloaded_storage_bytes"]
    else:
        assert st.offload.file_size() == st.offload.size >= st.offload.stored_bytes > 0
        assert all(not isinstance(t, torch.Tensor) for p in offloaded for t in (p.pos,))
    fetched = [st.offload.fetch(p, "cpu") for p in offloaded]
    assert sum(p.nbytes for p in fetched) == ex["bilevel_offloaded_bytes"]
    assert storage_bytes(fetched) == st.offload.stored_bytes
    # the device cache: its byte count is its storages (no view keeps a larger tensor alive)
    assert storage_bytes(_kv_tensors(enc.cache)) == enc.cache.nbytes()
    if "kivi" in spec:
        assert any(isinstance(p, QuantSegment) and p.label == "int2 dense" for p in fetched)
        assert any(isinstance(p, QuantSegment) and p.label == "int2 sparse" for p in st.pool[0])
    else:
        # full precision: the complement is every chunk entry not in the sparse level, K and V
        a = pipe.adapter
        n = sum(int(s) - k for s, k in zip(st.plan.sizes, st.keep))
        assert ex["bilevel_offloaded_bytes"] == 2 * a.num_layers * a.num_kv_heads * a.head_dim * n * a.dtype.itemsize
        assert all(isinstance(p, DenseSegment) for p in fetched)


def test_encode_once_ask_many_in_any_order(pipes):
    pipe = pipes["llava_onevision"].with_recipe("bilevel:0.3,frames=2")
    enc = pipe.encode(frames_for("llava_onevision", n=12, seed=8))
    segs = [list(layer.segments) for layer in enc.cache.layers]
    lens = enc.cache.lengths()
    fwd = [pipe.ask(enc, q, max_new_tokens=6) for q in QUESTIONS]
    rev = [pipe.ask(enc, q, max_new_tokens=6) for q in reversed(QUESTIONS)][::-1]
    assert [r.tokens for r in fwd] == [r.tokens for r in rev]
    assert [r.stats.extra["bilevel_chosen"] for r in fwd] == [r.stats.extra["bilevel_chosen"] for r in rev]
    assert any(c for r in fwd for c in r.stats.extra["bilevel_chosen"])       # something was brought back
    assert enc.cache.lengths() == lens
    assert all(all(a is b for a, b in zip(layer.segments, old)) and len(layer.segments) == len(old)
               for layer, old in zip(enc.cache.layers, segs))


def test_disk_offload_answers_like_cpu(pipes):
    video = frames_for("qwen2_5_vl", n=16, seed=9)
    cpu = pipes["qwen2_5_vl"].with_recipe("bilevel:0.4,frames=4")
    disk = pipes["qwen2_5_vl"].with_recipe("bilevel:0.4,frames=4,offload=disk")
    a = cpu.generate(video, Q, max_new_tokens=8, output_scores=True)
    b = disk.generate(video, Q, max_new_tokens=8, output_scores=True)
    assert a.tokens == b.tokens
    assert torch.equal(torch.stack(a.scores), torch.stack(b.scores))
    assert a.stats.extra["bilevel_chosen"] == b.stats.extra["bilevel_chosen"]
    assert b.stats.extra["bilevel_offload"].startswith("disk")
    assert a.stats.extra["bilevel_reloaded_bytes"] == b.stats.extra["bilevel_reloaded_bytes"] > 0


def test_budget_is_respected(pipes):
    pipe = pipes["qwen2_vl"].with_recipe("bilevel:0.25,frames=4,keep=0.1")
    enc = pipe.encode(frames_for("qwen2_vl", n=24, seed=10))
    st = _enc_state(enc)
    r = pipe.ask(enc, Q, max_new_tokens=2)
    ex = r.stats.extra
    comp = [int(n) - k for n, k in zip(st.plan.sizes, st.keep)]
    for chosen in ex["bilevel_chosen"]:
        assert chosen and sum(comp[c] for c in chosen) <= 0.25 * st.plan.total
    assert ex["bilevel_reloaded_tokens"] == sum(comp[c] for ch in ex["bilevel_chosen"] for c in ch)
    # the device holds the text, the sparse levels and the chosen complements, nothing else
    assert r.stats.kv_len_per_layer == [enc.cache.layers[i].stored + r.stats.prompt_tokens - enc.prefix_len
                                        + sum(comp[c] for c in ch) for i, ch in enumerate(ex["bilevel_chosen"])]
    # a byte budget: two chunks' complements per layer (the chunks are the same size here)
    assert len(set(st.dense_bytes[0])) == 1
    mib = 2 * st.dense_bytes[0][0] * len(enc.cache.layers) / 2**20
    by_bytes = pipes["qwen2_vl"].with_recipe(f"bilevel:frames=4,keep=0.1,budget_mib={mib}")
    r2 = by_bytes.ask(by_bytes.encode(frames_for("qwen2_vl", n=24, seed=10)), Q, max_new_tokens=1)
    assert r2.stats.extra["bilevel_reloaded_bytes"] <= mib * 2**20
    assert all(len(c) == 2 for c in r2.stats.extra["bilevel_chosen"])


def test_follow_up_reselects_its_own_chunks(pipes):
    pipe = pipes["qwen2_vl"].with_recipe("bilevel:0.2,frames=2,keep=0.1")
    enc = pipe.encode(frames_for("qwen2_vl", n=16, seed=11))
    st = _enc_state(enc)
    comp = [int(n) - k for n, k in zip(st.plan.sizes, st.keep)]
    conv = pipe.chat(enc)
    r1 = conv.ask(QUESTIONS[0], max_new_tokens=3)
    r2 = conv.ask(QUESTIONS[1], max_new_tokens=3)
    c1, c2 = r1.stats.extra["bilevel_chosen"], r2.stats.extra["bilevel_chosen"]
    assert r2.stats.extra["bilevel_reloaded_tokens"] > 0                # turn 2 selected (and fetched) again
    cache = conv._session.cache
    for i, layer in enumerate(cache.layers):
        mix = [s for s in layer.segments if s.label.endswith("dense")]
        held = {int(p) for s in mix for p in s.pos[0]}
        want = {p for c in c2[i] for p in range(int(st.plan.starts[c]), int(st.plan.ends[c]))}
        assert held <= want and len(held) == sum(comp[c] for c in c2[i])   # only turn 2's chunks, once
    # the same questions asked fresh select the same chunks for turn 1
    assert pipe.ask(enc, QUESTIONS[0], max_new_tokens=3).stats.extra["bilevel_chosen"] == c1


def test_composes_with_a_vision_press_and_kivi(pipes):
    pipe = pipes["qwen2_vl"].with_recipe("pool+bilevel:1.0,cross=dense,frames=4+kivi:2,group=8,residual=8")
    video = frames_for("qwen2_vl", n=16, seed=12)
    r = pipe.generate(video, Q, max_new_tokens=4)
    ex = r.stats.extra
    assert r.stats.visual_tokens_kept < r.stats.visual_tokens_in
    assert sum(ex["bilevel_chunk_tokens"]) == r.stats.visual_tokens_kept   # chunks of the kept tokens
    assert len(ex["bilevel_chunk_tokens"]) == 4
    assert any(k.startswith("int2") for k in r.stats.kv_bytes_by_class)


@pytest.mark.parametrize("spec", ["bilevel:0.2,frames=2,keep=0.2,mass=1",
                                  "bilevel:0.2,frames=2,keep=0.5,mass=1+kivi:2,group=8,residual=8",
                                  "bilevel:0.2,frames=2,keep=0.2,prekeep=0.5,mass=1",
                                  "bilevel:0.2,frames=2,keep=0.3,prekeep=0.6,mass=1+kivi:2,group=8,residual=8"])
def test_mass_sparse_levels_stand_for_their_chunks_until_brought_back(pipes, spec):
    """mass=1: each chunk's sparse entries carry its whole weight (their exp(logw) sum to the
    chunk's size in every layer and head); a question resets the weights of the chunks it brings
    back, in its own copy, and a follow-up re-selects; every chunk brought back with dense
    cross-chunk attention is the uncompressed answer (tested with the other specs above)."""
    pipe = pipes["qwen2_vl"].with_recipe(spec)
    enc = pipe.encode(frames_for("qwen2_vl", n=16, seed=13))
    st = _enc_state(enc)
    plan = st.plan
    for idx in range(len(st.pool)):
        w = torch.cat([s.logw if s.logw is not None else torch.zeros(s.pos.shape) for s in st.pool[idx]], 1)
        c = plan.chunk_of(torch.cat([s.pos for s in st.pool[idx]], 1))
        for ch in range(plan.n):
            torch.testing.assert_close(torch.where(c == ch, w.exp(), 0.0).sum(1),
                                       torch.full((w.shape[0],), float(plan.sizes[ch])))
    conv = pipe.chat(enc)
    for q in QUESTIONS[:2]:
        r = conv.ask(q, max_new_tokens=3)
        chosen = r.stats.extra["bilevel_chosen"]
        for idx, layer in enumerate(conv._session.cache.layers):
            sparse = [s for s in layer.segments if s.label.endswith("sparse")]
            assert len(sparse) == len(st.pool[idx])                           # the pool, re-weighted once
            for s in sparse:
                back = torch.isin(plan.chunk_of(s.pos), torch.tensor(chosen[idx], dtype=torch.long))
                assert float(s.logw[back].abs().sum()) == 0                   # brought back: itself only
                if back.any() and (~back).any():
                    assert float(s.logw[~back].max()) > 0                     # left sparse: its chunk's weight
    again = [[float(s.logw.sum()) for s in layer.segments if s.label.endswith("sparse")] for layer in enc.cache.layers]
    assert again == [[float(s.logw.sum()) for s in pool] for pool in st.pool]  # the encoding is unchanged
    assert pipe.ask(enc, QUESTIONS[0], max_new_tokens=3).tokens == pipe.ask(enc, QUESTIONS[0], max_new_tokens=3).tokens


@pytest.mark.parametrize("window", [0, 1, 2])
def test_window_keeps_the_last_chunks_dense_for_the_next(pipes, monkeypatch, window):
    """window=W: chunk c is sealed (its complement offloaded) only once chunk c + W is prefilled,
    so the W chunks before each chunk are attended densely; the rest at the end of the prefill."""
    from mmkv.cache.bilevel.stage import BiLevel

    sealed_at, orig = [], BiLevel._seal

    def spy(self, cache, ctx, enc, chunks):
        sealed_at.append((list(chunks), cache.layers[0].seen))
        return orig(self, cache, ctx, enc, chunks)

    monkeypatch.setattr(BiLevel, "_seal", spy)
    enc = pipes["qwen2_vl"].with_recipe(f"bilevel:0.2,frames=4,keep=0.3,window={window}").encode(
        frames_for("qwen2_vl", n=16, seed=3))
    plan = _enc_state(enc).plan
    assert plan.n >= 4
    ends = plan.ends.tolist()
    when = {c: seen for chunks, seen in sealed_at for c in chunks}
    assert sorted(when) == list(range(plan.n))
    for c in range(plan.n - window):   # sealed right after chunk c + window ended
        assert when[c] == ends[c + window], (c, when, ends)
    for c in range(plan.n - window, plan.n):
        assert when[c] >= ends[-1]


@pytest.mark.parametrize("mass", [0, 1])
def test_prekeep_widens_the_prefill_only(pipes, monkeypatch, mass):
    """prekeep=P: while the video is prefilled, every later chunk sees the top P of each sealed
    chunk (the sparse level and the next entries by the same ranking), and after the prefill
    the entries beyond the sparse level join the offloaded level: the encoding holds the same
    entries per chunk on the device as without prekeep, none of the prefill-only entries, and
    its sparse level is the top `keep` of what the prefill saw. prekeep=1: the prefill sees every
    entry, so every stored key is the uncompressed model's."""
    from mmkv.cache.bilevel.stage import BiLevel

    fam = "qwen2_vl"
    video = frames_for(fam, n=16, seed=15)
    seen_during, orig = [], BiLevel.after_forward

    def spy(self, cache, ctx, end, last):
        orig(self, cache, ctx, end, last)
        st = ctx.state[(KEY,)]
        if not st.done:   # entries of sealed chunks the next slice attends to, in layer 0
            segs = [s for s in cache.layers[0].segments if s.label.endswith(("sparse", "seen"))]
            seen_during.append((st.sealed, sum(int(s.pos.shape[1]) for s in segs)))

    monkeypatch.setattr(BiLevel, "after_forward", spy)
    base = f"bilevel:0.3,frames=4,keep=0.2,window=0,mass={mass}"
    plain_enc = pipes[fam].with_recipe(base).encode(video)
    plain = _enc_state(plain_enc)
    seen_during.clear()
    enc = pipes[fam].with_recipe(base + ",prekeep=0.5").encode(video)
    st = _enc_state(enc)
    assert st.keep == plain.keep and all(p >= k for p, k in zip(st.seen, st.keep)) and st.seen != st.keep
    for sealed, entries in seen_during:
        assert entries == sum(st.seen[:sealed])
    assert any(sealed for sealed, _ in seen_during)
    for idx, layer in enumerate(enc.cache.layers):
        assert not any(s.label.endswith("seen") for s in layer.segments)
        assert sum(int(s.pos.shape[1]) for s in st.pool[idx]) == sum(st.keep)
        rest = sum(int(p.pos.shape[1]) for row in st.dense[idx] for p in row)
        assert rest == sum(int(n) - k for n, k in zip(st.plan.sizes, st.keep))
    assert enc.cache.nbytes() == plain_enc.cache.nbytes()          # the same device bytes as without it
    assert enc.prefill_state["stats"]["bilevel_offloaded_bytes"] == sum(map(sum, plain.dense_bytes))
    peak, plain_peak = (e.prefill_state["stats"]["bilevel_prefill_peak_device_bytes"] for e in (enc, plain_enc))
    assert peak > plain_peak >= plain_enc.cache.nbytes()                # the wider view costs device bytes

    full = pipes[fam].encode(video)
    st = _enc_state(pipes[fam].with_recipe(base + ",prekeep=1.0").encode(video))
    for idx in range(len(st.pool)):
        ref = full.cache.layers[idx].keys[0]
        for p in st.pool[idx] + [st.offload.fetch(p, "cpu") for row in st.dense[idx] for p in row]:
            k = p.keys.dequantize(torch.float32)[0]
            for h in range(k.shape[0]):
                torch.testing.assert_close(k[h], ref[h, p.pos[h].long()].float(), atol=1e-4, rtol=1e-4)


def test_share_picks_one_sparse_level_for_every_layer(pipes):
    """share=1: every layer's scores (here key norms, which differ per layer) are replaced by
    their mean over the layers, so every layer and head keeps the same entries of each chunk
    (share=0: they differ)."""
    video = frames_for("qwen2_vl", n=16, seed=14)
    sets = {}
    for share in (0, 1):
        st = _enc_state(pipes["qwen2_vl"].with_recipe(f"bilevel:0.2,frames=8,keep=0.25,sparse=norm,share={share}").encode(video))
        sets[share] = [torch.cat([s.pos for s in pool], 1).sort(1).values for pool in st.pool]
    one = sets[1][0][0]
    assert all(torch.equal(p, one.expand_as(p)) for p in sets[1])
    assert not all(torch.equal(p, sets[0][0][0].expand_as(p)) for p in sets[0])


@pytest.mark.parametrize("spec, match", [
    ("bilevel:mass=1+vidkv", "kivi"),
    ("bilevel:share=1,sparse=uniform", "uniform"),
    ("bilevel:share=2", "share"),
    ("streaming:recent=8,decode=false+bilevel", "own sparse level"),
    ("zipvl:kv=none+bilevel", "prefill policy"),
    ("bilevel:score=nearest", "score"),
    ("bilevel:sparse=nothing", "sparse="),
    ("bilevel:keep=0", "keep"),
    ("bilevel:keep=1.5", "count"),
    ("bilevel:cross=window", "cross"),
    ("bilevel:window=-1", "window"),
    ("bilevel:prekeep=-0.1", "prekeep"),
    ("bilevel:prekeep=2.5", "count"),
    ("bilevel+vidkv", "mass=0"),                      # the default mass=1 needs kivi's segments
    ("bilevel:offload=gpu", "offload"),
])
def test_bad_recipes_are_clear(tiny_dir, spec, match):
    with pytest.raises(RecipeError, match=match):
        mmkv.load(tiny_dir["qwen2_vl"], recipe=spec)


def test_relevance_rules_find_the_matching_chunk():
    torch.manual_seed(0)
    b, hk, g, d, n_chunks, per = 1, 2, 2, 16, 5, 6
    direction = torch.randn(hk, d)
    keys = torch.randn(b, hk, n_chunks * per, d) * 0.3
    keys[:, :, 3 * per:4 * per] += 2 * direction[None, :, None, :]      # chunk 3 matches the question
    query = (direction.repeat_interleave(g, 0)[None, :, None, :] + 0.1 * torch.randn(b, hk * g, 4, d))
    chunk = torch.arange(n_chunks).repeat_interleave(per).expand(hk, -1)
    for rule in ("attn", "quest", "mean"):
        if rule == "attn":
            rel = relevance(rule, query, d ** -0.5, n_chunks, keys=keys, chunk=chunk)
        else:
            summ = torch.stack([summarize(rule, keys[:, :, c * per:(c + 1) * per]) for c in range(n_chunks)], 1)
            rel = relevance(rule, query, d ** -0.5, n_chunks, summary=summ)
        assert int(rel.argmax()) == 3, rule
    assert choose(torch.tensor([0.1, 0.5, 0.2, 0.9]), [2, 2, 1, 3], 4) == [2, 3]       # 3, then 1 does not fit, 2 does
    assert choose(torch.tensor([0.1, 0.5, 0.2, 0.9]), [1, 1, 1, 1], 3, ends=True) == [0, 1, 3]   # ends first


def test_scorer_plugs_in_from_a_stage(tiny_dir, monkeypatch):
    """sparse=NAME takes a KV stage's entry_scores (here: keep the latest entries of each chunk)."""
    from dataclasses import dataclass
    from typing import ClassVar

    from mmkv.cache import KVPress
    from mmkv.stages import STAGES

    @dataclass
    class Latest(KVPress):
        name: ClassVar[str] = "latest_test"

        def entry_scores(self, idx, keys, values, pos, ctx):
            return pos.float()

    monkeypatch.setitem(STAGES, "latest_test", Latest)
    pipe = mmkv.load(tiny_dir["qwen2_vl"], recipe="bilevel:0.0,keep=0.25,frames=4,sparse=latest_test")
    enc = pipe.encode(frames_for("qwen2_vl", n=8, seed=13))
    st = _enc_state(enc)
    pool = torch.cat([p.pos for p in st.pool[0]], 1)
    want = [p for c in range(st.plan.n) for p in range(int(st.plan.ends[c]) - st.keep[c], int(st.plan.ends[c]))]
    assert sorted(pool[0].tolist()) == want


def test_renderer_shows_each_chunk(pipes):
    from mmkv.cache.bilevel import chunks_html, chunks_image
    from mmkv.cache.bilevel.render import chunk_usage

    r = pipes["qwen2_vl"].with_recipe("bilevel:0.3,frames=4").generate(frames_for("qwen2_vl", n=16, seed=14), Q,
                                                                         max_new_tokens=2)
    rows = chunk_usage(r)
    n = r.stats.extra["bilevel_chunks"]
    assert len(rows) == n and any(x["layers"] for x in rows)
    assert all(x["end_s"] > x["start_s"] for x in rows)
    html = chunks_html(r)
    assert html.count("title=") == n and "brought back" in html
    assert chunks_image(r, width=120).size == (120, 40)
    with pytest.raises(ValueError, match="bilevel"):
        chunk_usage(pipes["qwen2_vl"].generate(frames_for("qwen2_vl", n=4), Q, max_new_tokens=1))
    # the demo's per-answer panel shows the strip (and nothing of it for other recipes)
    from mmkv.demo.render import layers_html
    page = layers_html(r.stats)
    assert "chunks brought back dense for this answer" in page and page.count("title=") == n
    plain = pipes["qwen2_vl"].generate(frames_for("qwen2_vl", n=4), Q, max_new_tokens=1)
    assert "chunks brought back" not in layers_html(plain.stats)


def test_long_bench_reports_device_and_offloaded_bytes(tiny_dir, tmp_path):
    from mmkv.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "quality", "--task", "long", "--model", tiny_dir["qwen2_vl"], "--frames", "96",
                 "--n", "1", "--protocol", "encode", "--recipes", "none;bilevel:0.1,frames=16,keep=0.1",
                 "--data-dir", str(tmp_path / "data"), "--json", str(out), "--no-progress"]) == 0
    none, bl = json.load(open(out))
    assert none["offloaded_bytes_ratio"] == 0 and none["kv_bytes_ratio"] == pytest.approx(1.0)
    assert bl["skipped"] is None and 0 < bl["kv_bytes_ratio"] < 0.6
    assert 0.4 < bl["offloaded_bytes_ratio"] < 1
    assert bl["kv_bytes_ratio"] + bl["offloaded_bytes_ratio"] >= 0.99    # every visual entry is somewhere


def test_info_names_video_xl_2():
    from mmkv.recipe import available

    doc = dict(available()["kv"])["bilevel"]
    assert "Video-XL-2" in doc


def test_device_bytes_flat_in_video_length(pipes):
    """keep and budget as counts: the device holds the same bytes for a video twice as long
    (up to the relevance summaries, one per chunk), the offloaded level doubles."""
    pipe = pipes["qwen2_vl"].with_recipe("bilevel:32,keep=32,frames=4,score=attn")
    a = pipe.adapter
    entry = 2 * a.num_layers * a.num_kv_heads * a.head_dim * a.dtype.itemsize    # bytes of one entry, all layers
    got = []
    for n in (16, 32):
        enc = pipe.encode(frames_for("qwen2_vl", n=n, seed=15))
        r = pipe.ask(enc, Q, max_new_tokens=1)
        question = (r.stats.prompt_tokens - enc.prefix_len) * entry
        got.append((enc.cache.nbytes(), r.stats.kv_bytes - question, r.stats.extra["bilevel_offloaded_bytes"]))
    (e1, a1, o1), (e2, a2, o2) = got
    assert e1 == e2                                      # the encoding: text + 32 sparse entries per layer
    assert e1 < a1 <= e1 + 32 * entry and e2 < a2 <= e2 + 32 * entry   # + at most the budget
    assert o2 > 1.9 * o1


def test_an_image_stays_whole(pipes):
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(16).integers(0, 256, (100, 150, 3), dtype=np.uint8))
    for fam in ("qwen2_vl", "llava_onevision"):
        ref = pipes[fam].generate(image, Q, max_new_tokens=5)
        res = pipes[fam].with_recipe("bilevel").generate(image, Q, max_new_tokens=5)
        assert res.tokens == ref.tokens and res.stats.extra["bilevel_chunks"] == 0
