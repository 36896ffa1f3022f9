"""ZipVL (mmkv.prefill.zipvl): probe scores and adaptive budgets against an independent computation,
sparse prefill rows, mixed-precision KV bytes and selection, decode re-selection, the pipeline
end to end, the standalone "zipvl" attention implementation, and clear errors."""
import math
from types import SimpleNamespace

import pytest
import torch

import mmkv
from conftest import frames_for
from mmkv import Recipe, RecipeError
from mmkv.cache import CompressedCache, PressContext
from mmkv.cache.quant import ChannelScaledQuant, quantize_channel_separable
from mmkv.prefill.zipvl import ZipVL, adaptive_budget, zipvl_session

FAM = "qwen2_vl"
SMALL = "probes_recent=4,probes_random=4"  # tiny prompts (~80 tokens) need few probes to go sparse


# ----------------------------------------------------------------------------- helpers
def probe_reference(q, k, probe_rows, scaling):
    """Independent: attention of probe rows in float64 (the queries are the last Lq keys), the
    attention each key receives, and nnz = how many probes can see each key."""
    hq, hk = q.shape[1], k.shape[1]
    lq, lk = q.shape[2], k.shape[2]
    pos = torch.as_tensor(probe_rows) + lk - lq
    s = torch.matmul(q.double()[:, :, probe_rows], k.double().repeat_interleave(hq // hk, 1).transpose(-1, -2))
    causal = torch.arange(lk)[None, :] <= pos[:, None]
    p = torch.softmax((s * scaling).masked_fill(~causal, float("-inf")), -1)
    received = p.sum((0, 1, 2))
    nnz = (pos[None, :] >= torch.arange(lk)[:, None]).sum(1).double()
    return received, nnz


def budget_reference(received, tau):
    srt = sorted(received.tolist(), reverse=True)
    total, acc = sum(srt), 0.0
    for i, x in enumerate(srt):
        acc += x
        if acc >= tau * total:
            return i + 1
    return len(srt)


def run_attend(policy, q, k, v, cache=None, layer_idx=0, pctx=None):
    """One prefill call of the policy on layer `layer_idx`, the way mmkv's attention calls it."""
    cache = cache or CompressedCache(layer_idx + 1)
    kk, vv = cache.update(k, v, layer_idx)
    if pctx is not None:
        policy.begin(pctx)
    out = policy.attend(SimpleNamespace(layer_idx=layer_idx), q, kk, vv, q.shape[-1] ** -0.5,
                        SimpleNamespace(cache=cache))
    return out, cache


def qkv(lq=47, lk=47, hq=4, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, lq, d, generator=g) * 2, torch.randn(1, hk, lk, d, generator=g) * 2,
            torch.randn(1, hk, lk, d, generator=g))


# ----------------------------------------------------------------------------- selection
def test_adaptive_budget_is_eq6_and_monotone_in_tau():
    g = torch.Generator().manual_seed(1)
    received = torch.rand(301, generator=g) ** 4
    taus = [0.3, 0.5, 0.8, 0.9, 0.96, 0.975, 0.99, 1.0]
    ps = [adaptive_budget(received, t) for t in taus]
    assert ps == [budget_reference(received.double(), t) for t in taus[:-1]] + [301]
    assert ps == sorted(ps) and ps[0] < ps[-2]
    assert adaptive_budget(received, 0.5, ratio=0.25) == math.ceil(0.25 * 301)
    assert adaptive_budget(torch.zeros(0), 0.9) == 0


@pytest.mark.parametrize("tau", [0.6, 0.9])
def test_attend_selects_like_the_paper_and_zeroes_unimportant_rows(tau):
    """Probe scores, Eq. 6 budget and Eq. 7-8 selection against an independent float64 computation;
    rows outside T get 0 (no token mixing), rows in T equal attention restricted to T."""
    q, k, v = qkv(seed=2)
    r = 6
    policy = ZipVL(tau=tau, probes_recent=r, probes_random=0, dense_layers=0, kv="none", rows="zero")
    pctx = PressContext(token_type=torch.zeros(47, dtype=torch.int8))
    out, _ = run_attend(policy, q, k, v, pctx=pctx)
    received, nnz = probe_reference(q, k, list(range(47 - r, 47)), 16 ** -0.5)
    p = budget_reference(received, tau)
    t = sorted((received / nnz).topk(p).indices.tolist())
    policy.end(CompressedCache(1), pctx)
    assert pctx.stats["zipvl_kept_per_layer"] == [p] and 0 < p < 47
    assert pctx.stats["zipvl_ratio_per_layer"] == [round(p / 47, 4)]
    u = sorted(set(range(47)) - set(t))
    assert out[:, u].abs().max() == 0
    kk, vv = k.repeat_interleave(2, 1)[:, :, t], v.repeat_interleave(2, 1)[:, :, t]
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, t], kk, vv, is_causal=True, scale=16 ** -0.5)
    torch.testing.assert_close(out[:, t], ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # FLOPs accounting from the kept counts: causal pairs inside T plus the probe rows
    dense_pairs, sparse_pairs = 47 * 48 // 2, p * (p + 1) // 2
    probe_pairs = sum(range(47 - r + 1, 48))
    assert pctx.stats["zipvl_attn_flops_dense"] == 4 * 4 * 16 * dense_pairs
    assert pctx.stats["zipvl_attn_flops_saved"] == pytest.approx(1 - (sparse_pairs + probe_pairs) / dense_pairs)


def test_rows_keys_mode_attends_every_row_to_important_keys():
    """rows="keys" on a chunk after a cached prefix: every query row attends to the important keys
    at or before it (rows that see none get 0), with a fixed ratio."""
    q, k, v = qkv(lq=31, lk=52, seed=3)
    policy = ZipVL(ratio=0.4, probes_recent=10, probes_random=0, dense_layers=0, kv="none", rows="keys",
                   dense_above=1.0)
    cache = CompressedCache(1)
    cache.update(k[:, :, :21], v[:, :, :21], 0)
    out, _ = run_attend(policy, q, k[:, :, 21:], v[:, :, 21:], cache=cache,
                        pctx=PressContext(token_type=torch.zeros(52, dtype=torch.int8)))
    received, nnz = probe_reference(q, k, list(range(21, 31)), 0.25)
    t = (received / nnz).topk(math.ceil(0.4 * 52)).indices
    allowed = torch.zeros(52, dtype=torch.bool)
    allowed[t] = True
    vis = allowed[None, :] & (torch.arange(52)[None, :] <= torch.arange(21, 52)[:, None])
    s = torch.matmul(q.double(), k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    ref = torch.matmul(torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0),
                       v.double().repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert policy._pctx.state["zipvl_counts"][0][0] == math.ceil(0.4 * 52)


@pytest.mark.parametrize("rows,ratio,dense_above,dense", [
    ("keys", 0.5, None, True), ("keys", 0.3, None, False), ("keys", 0.5, 0.6, False),
    ("zero", 0.5, None, False), ("zero", 0.95, None, True), ("zero", 0.5, 0.45, True),
])
def test_layers_past_the_break_even_attend_densely(rows, ratio, dense_above, dense):
    """A layer whose kept ratio is above the break-even (BREAK_EVEN[rows] = 0.4 for keys, 0.9 for
    zero, measured on CPU; or dense_above) attends densely, and the stats say so: ratio 1, the
    budget's ratio, one fallback, and FLOPs = dense + probes."""
    from mmkv.prefill.zipvl.budget import BREAK_EVEN
    assert BREAK_EVEN == {"keys": 0.4, "zero": 0.9}
    q, k, v = qkv(lq=60, lk=60, seed=8)
    policy = ZipVL(ratio=ratio, rows=rows, dense_above=dense_above, probes_recent=6, probes_random=6,
                   dense_layers=0, kv="none")
    pctx = PressContext(token_type=torch.zeros(60, dtype=torch.int8))
    out, _ = run_attend(policy, q, k, v, pctx=pctx)
    policy._write_stats(pctx)
    s = pctx.stats
    p = math.ceil(ratio * 60)
    assert s["zipvl_budget_ratio_per_layer"] == [round(p / 60, 4)]
    assert (out is None) == dense and s["zipvl_dense_fallbacks_per_layer"] == [int(dense)]
    assert s["zipvl_ratio_per_layer"] == ([1.0] if dense else [round(p / 60, 4)])
    per_pair = 4 * q.shape[1] * q.shape[-1]
    assert s["zipvl_attn_flops_dense"] == 60 * 61 // 2 * per_pair
    probe_pairs = pctx.state["zipvl_counts"][0][4]
    assert sum(range(55, 61)) < probe_pairs <= 12 * 60                # 6 recent + 6 random probe rows
    if dense:   # what the layer really did: dense attention plus the probes that found the ratio
        assert s["zipvl_attn_flops"] == (60 * 61 // 2 + probe_pairs) * per_pair
        assert s["zipvl_attn_flops_saved"] < 0
    else:
        assert s["zipvl_attn_flops_saved"] > 0


def test_tau_one_and_all_probe_chunks_are_exactly_dense():
    q, k, v = qkv(seed=4)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.25).transpose(1, 2)
    out, _ = run_attend(ZipVL(tau=1.0, dense_layers=0, kv="none", probes_recent=4, probes_random=4), q, k, v,
                        pctx=PressContext(token_type=torch.zeros(47, dtype=torch.int8)))
    assert out is None  # keep-all: the base implementation runs, bit for bit the dense path
    # a chunk with no more queries than probes is answered from the probe rows (the full attention)
    out, _ = run_attend(ZipVL(tau=0.5, dense_layers=0, kv="none"), q, k, v,
                        pctx=PressContext(token_type=torch.zeros(47, dtype=torch.int8)))
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- mixed-precision KV
def test_channel_separable_quant_error_and_bytes():
    x = torch.randn(1, 3, 29, 24, generator=torch.Generator().manual_seed(5))
    x[..., 5] *= 30  # an outlier channel
    for bits in (2, 4):
        cq = quantize_channel_separable(x, bits)
        assert isinstance(cq, ChannelScaledQuant) and cq.num_tokens == 29
        c = cq.channel_scale.float()
        step = cq.inner.scale.float().repeat_interleave(24, 3) * c
        assert (cq.dequantize(torch.float32) - x).abs().le(step / 2 + 1e-5).all()
        assert torch.allclose(c.squeeze(2), x.abs().amax(2).sqrt(), rtol=1e-3)
        assert cq.nbytes == 3 * 29 * math.ceil(24 * bits / 8) + 2 * 2 * 3 * 29 + 2 * 3 * 24
        sub = cq.select(torch.tensor([0, 7, 28]))
        torch.testing.assert_close(sub.dequantize(), cq.dequantize()[:, :, [0, 7, 28]])


def _tensor_bytes(seg) -> int:
    vals = seg.values
    ts = [seg.keys.codes, seg.keys.scale, seg.keys.zero]
    ts += [vals.inner.codes, vals.inner.scale, vals.inner.zero, vals.channel_scale] if hasattr(vals, "inner") \
        else [vals.codes, vals.scale, vals.zero]
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("values", ["channel_separable", "token"])
def test_mixed_precision_selection_and_bytes(values):
    """End of prefill: T at 4 bits, the rest at 2 bits, chosen by Eq. 6-8 from the probe scores;
    the byte counts are those of the stored tensors."""
    q, k, v = qkv(lq=53, lk=53, seed=6)
    policy = ZipVL(tau=0.8, probes_recent=7, probes_random=0, dense_layers=1, values=values)
    pctx = PressContext(token_type=torch.zeros(53, dtype=torch.int8))
    out, cache = run_attend(policy, q, k, v, pctx=pctx)
    assert out is None  # a dense layer still scores for the KV
    policy.end(cache, pctx)
    layer = cache.layers[0]
    received, nnz = probe_reference(q, k, list(range(46, 53)), 0.25)
    p = budget_reference(received, 0.8)
    t = sorted((received / nnz).topk(p).indices.tolist())
    hi, lo = layer.segments
    assert (hi.label, lo.label) == ("int4", "int2") and layer.residual_len == 0 and layer.stored == 53
    assert hi.pos[0].tolist() == t and lo.pos[0].tolist() == sorted(set(range(53)) - set(t))
    assert pctx.stats["zipvl_kv_important_per_layer"] == [p]
    by_class = cache.bytes_by_class()
    assert by_class["int4"] == _tensor_bytes(hi) and by_class["int2"] == _tensor_bytes(lo)
    h, d = 2, 16
    for seg, bits, n in ((hi, 4, p), (lo, 2, 53 - p)):
        codes = 2 * h * n * math.ceil(d * bits / 8)
        stats = 2 * 2 * h * d + 2 * 2 * h * n + (2 * h * d if values == "channel_separable" else 0)
        assert seg.nbytes == codes + stats
    # the dequantized cache is close to the original, the 4-bit class closer
    kd, _ = layer.dequantized(torch.float32)
    err4 = (kd[:, :, :p] - k[:, :, t]).abs().mean()
    err2 = (kd[:, :, p:] - k[:, :, sorted(set(range(53)) - set(t))]).abs().mean()
    assert err4 < err2 < 1.0


def test_evict_mode_keeps_only_important_tokens():
    q, k, v = qkv(lq=41, lk=41, seed=8)
    policy = ZipVL(tau=0.7, probes_recent=5, probes_random=0, dense_layers=0, kv="evict")
    pctx = PressContext(token_type=torch.zeros(41, dtype=torch.int8))
    _, cache = run_attend(policy, q, k, v, pctx=pctx)
    policy.end(cache, pctx)
    layer = cache.layers[0]
    received, nnz = probe_reference(q, k, list(range(36, 41)), 0.25)
    t = sorted((received / nnz).topk(budget_reference(received, 0.7)).indices.tolist())
    assert layer.pos[0].tolist() == t and not layer.segments
    assert torch.equal(layer.keys, k[:, :, t]) and layer.seen == 41


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def video():
    return frames_for(FAM, n=8, seed=1)


def test_pipeline_tau_one_equals_plain_model(tiny_dir, video):
    """tau = 1 with mixed-precision off reproduces the empty recipe token for token; with the KV
    quantized, the prefill (first-token logits) is still exact. Prefilled in chunks of 29."""
    q = "What is happening?"
    base = mmkv.load(tiny_dir[FAM], prefill_chunk=29).generate(video, q, max_new_tokens=6, output_scores=True)
    for spec in (f"zipvl:tau=1.0,kv=none,dense_layers=0,{SMALL}", f"zipvl:tau=1.0,dense_layers=0,{SMALL}"):
        pipe = mmkv.load(tiny_dir[FAM], recipe=spec, prefill_chunk=29)  # several chunks
        r = pipe.generate(video, q, max_new_tokens=6, output_scores=True)
        assert torch.equal(r.scores[0], base.scores[0])
        assert r.stats.extra["zipvl_ratio_per_layer"] == [1.0, 1.0]
        if "kv=none" in spec:
            assert r.tokens == base.tokens
        else:
            assert set(r.stats.kv_bytes_by_class) >= {"int4"} and "int2" not in r.stats.kv_bytes_by_class


def test_pipeline_sparse_stats_budgets_and_bytes(tiny_dir, video):
    pipe = mmkv.load(tiny_dir[FAM], recipe=f"zipvl:tau=0.8,dense_layers=1,rows=zero,{SMALL}")
    r = pipe.generate(video, "What is happening?", max_new_tokens=1)
    s, n = r.stats.extra, r.stats.prompt_tokens
    assert len(s["zipvl_ratio_per_layer"]) == 2 and s["zipvl_ratio_per_layer"][0] == 1.0
    assert 0 < s["zipvl_kept_per_layer"][1] < n and s["zipvl_ratio_mean"] == pytest.approx(s["zipvl_kept_per_layer"][1] / n)
    assert 0 < s["zipvl_attn_flops_saved"] < 1
    # per-layer KV budgets: the int4 class holds exactly the important tokens of each layer
    # (recomputed from the stored cache: the segment labels give the bytes, the stats the counts)
    assert r.stats.kv_len_per_layer == [n, n]
    assert set(r.stats.kv_bytes_by_class) >= {"int4", "int2"}
    assert sum(r.stats.kv_bytes_by_class.values()) == r.stats.kv_bytes
    assert all(0 < k < n for k in s["zipvl_kv_important_per_layer"])


def test_pipeline_kept_ratio_rises_with_tau(tiny_dir, video):
    """The first sparse layer sees the same input for every tau: its kept ratio rises with tau."""
    ratios = []
    for tau in (0.3, 0.6, 0.8, 0.95, 1.0):
        pipe = mmkv.load(tiny_dir[FAM], recipe=f"zipvl:tau={tau},kv=none,dense_layers=1,{SMALL}")
        ratios.append(pipe.generate(video, "What is happening?", max_new_tokens=1).stats.extra["zipvl_ratio_per_layer"][1])
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1] == 1.0


@pytest.mark.parametrize("kv", ["mixed", "evict"])
def test_decode_reselection_every_n_tokens(tiny_dir, video, kv):
    pipe = mmkv.load(tiny_dir[FAM], recipe=f"zipvl:tau=0.7,kv={kv},every=3,dense_layers=0,{SMALL}")
    stop = pipe.adapter.stop_ids
    pipe.adapter.stop_ids = lambda: set()  # decode exactly max_new_tokens
    try:
        r = pipe.generate(video, "What is happening?", max_new_tokens=8)
    finally:
        pipe.adapter.stop_ids = stop
    s, n = r.stats.extra, r.stats.prompt_tokens
    # 8 tokens: 7 decode steps append to the cache -> re-selections after 3 and 6 of them
    assert s["zipvl_decode_reselections"] == 2 and len(s["zipvl_decode_ratio_per_layer"]) == 2
    assert all(0 < x <= 1 for x in s["zipvl_decode_ratio_per_layer"])
    assert len(r.tokens) == 8


def test_decode_reselection_on_cache():
    """Re-selection on a cache directly: the newest `every` tokens are classified by the attention
    their own queries pay them, normalized by how many of those queries see each one."""
    g = torch.Generator().manual_seed(9)
    k, v, q = torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g), \
        torch.randn(1, 4, 30, 16, generator=g)
    policy = ZipVL(tau=0.75, probes_recent=4, probes_random=0, dense_layers=0, every=5)
    pctx = PressContext(token_type=torch.zeros(30, dtype=torch.int8), num_heads=4, num_kv_heads=2, head_dim=16)
    _, cache = run_attend(policy, q[:, :, :25], k[:, :, :25], v[:, :, :25], pctx=pctx)
    policy.end(cache, pctx)
    for step in range(5):  # five decode steps
        cache.update(k[:, :, 25 + step:26 + step], v[:, :, 25 + step:26 + step], 0)
        pctx.queries = {0: q[:, :, 25 + step:26 + step]}
        policy.on_decode(cache, pctx, step)
    layer = cache.layers[0]
    assert layer.residual_len == 0 and layer.stored == 30 and pctx.stats["zipvl_decode_reselections"] == 1
    # independent: the 5 queries over all 30 keys, dequantized as stored for the first 25
    order = layer.positions()[0].argsort()
    keys = layer.dequantized(torch.float32)[0][:, :, order]
    keys[:, :, 25:] = k[:, :, 25:]  # the new tokens were full precision when they were scored
    s = torch.matmul(q[:, :, 25:].double(), keys.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    causal = torch.arange(30)[None, :] <= torch.arange(25, 30)[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    received = p[..., 25:].sum((0, 1, 2))
    nnz = torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.double)
    t = sorted((25 + (received / nnz).topk(budget_reference(received, 0.75)).indices).tolist())
    new_hi = [s for s in layer.segments[2:] if s.label == "int4"]
    assert sorted(sum((s.pos[0].tolist() for s in new_hi), [])) == t


def test_encode_once_ask_twice_is_repeatable(tiny_dir, video):
    pipe = mmkv.load(tiny_dir[FAM], recipe=f"zipvl:tau=0.8,{SMALL}", prefill_chunk=40)
    enc = pipe.encode(video)
    assert not enc.deferred
    a = pipe.ask(enc, "What is happening?", max_new_tokens=4)
    b = pipe.ask(enc, "What is happening?", max_new_tokens=4)
    assert a.tokens == b.tokens and a.stats.extra == b.stats.extra
    s = a.stats.extra
    assert s["zipvl_ratio_per_layer"] == [1.0, 1.0]  # layers 0-1 dense (the default), scored for the KV
    assert all(0 < k < a.stats.prompt_tokens for k in s["zipvl_kv_important_per_layer"])
    assert a.stats.kv_len_per_layer == [a.stats.prompt_tokens] * 2
    qa = mmkv.load(tiny_dir[FAM], recipe=f"zipvl:tau=0.8,query_aware=true,{SMALL}")
    assert qa.encode(video).deferred  # the prefill waits for the question


# ----------------------------------------------------------------------------- standalone + errors
def test_standalone_attention_implementation():
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 300, (1, 150))
    with torch.inference_mode():
        ref = model(ids).logits
        model.set_attn_implementation("zipvl")
        with zipvl_session(ZipVL(tau=1.0, kv="none")) as st:
            same = model(ids).logits
        with zipvl_session(ZipVL(tau=0.8, kv="none", probes_recent=8, probes_random=8, dense_layers=1,
                                 dense_above=1.0)) as st2:
            sparse = model(ids).logits
        with pytest.raises(ValueError, match="unpadded"):
            mask = torch.ones(2, 150, dtype=torch.long)
            mask[1, :3] = 0
            model(torch.cat([ids, ids]), attention_mask=mask)
    assert torch.equal(same, ref) and st["zipvl_ratio_per_layer"] == [1.0, 1.0, 1.0]
    assert not torch.equal(sparse, ref) and st2["zipvl_ratio_per_layer"][0] == 1.0
    assert all(0 < r < 1 for r in st2["zipvl_ratio_per_layer"][1:])


@pytest.mark.parametrize("spec,needle", [
    ("zipvl:0", "tau"), ("zipvl:tau=1.5", "tau"), ("zipvl:ratio=0", "ratio"), ("zipvl:ratio=1.2", "ratio"),
    ("zipvl:rows=drop", "rows"), ("zipvl:kv=int3", "kv"), ("zipvl:bits_high=3", "bits"),
    ("zipvl:bits_high=2,bits_low=4", "bits_low"), ("zipvl:probes_recent=0,probes_random=0", "probe"),
    ("zipvl:dense_layers=-1", "dense_layers"), ("zipvl:every=-5", "every"), ("zipvl:values=fp8", "values"),
    ("zipvl+kivi:2", "kv=none"), ("zipvl:tau=abc", "not a valid float"),
])
def test_bad_parameters_are_clear(spec, needle):
    with pytest.raises(RecipeError, match=needle):
        Recipe.parse(spec)


def test_composes_with_kv_presses_when_kv_none():
    r = Recipe.parse("zipvl:kv=none+kivi:2")
    assert r.prefill.name == "zipvl" and [s.name for s in r.kv] == ["kivi"]
