"""The compressed cache: packing, quantization bounds, byte counts of the stored tensors,
split attention, snapshots, and KIVI end to end."""
import math

import pytest
import torch

import mmkv
from conftest import frames_for
from mmkv.cache import KIVI, CompressedCache, QuantSegment, StreamingLLM, pack, quantize, unpack
from mmkv.cache.attend import causal_mask, merge_partials, partial_attention
from mmkv.cache.quant import log8_decode, log8_encode
from mmkv.errors import RecipeError


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [1, 7, 16, 33])
def test_pack_unpack_roundtrip(bits, d):
    g = torch.Generator().manual_seed(bits * 100 + d)
    codes = torch.randint(0, 2 ** bits, (2, 3, 5, d), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(d * bits / 8)
    assert torch.equal(unpack(packed, bits, d), codes)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis,shape,group", [("channel", (1, 2, 64, 24), 32), ("channel", (2, 3, 21, 5), 7),
                                              ("token", (1, 2, 13, 32), 32), ("token", (1, 3, 9, 24), 8)])
def test_quantize_error_within_half_step(bits, axis, shape, group):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 3 + 0.5
    x[..., 0, 0] = 40.0  # an outlier channel/token
    q = quantize(x, bits, group, axis)
    err = (q.dequantize(torch.float32) - x).abs()
    scale = q.scale.float()
    step = scale.repeat_interleave(group, 2) if axis == "channel" else scale.repeat_interleave(group, 3)
    assert torch.isfinite(err).all()
    assert (err <= step / 2 + 1e-6).all()
    # the stored bytes are what the layout says
    b, h, t, d = shape
    n_groups = (t // group) * d if axis == "channel" else t * (d // group)
    assert q.nbytes == b * h * t * math.ceil(d * bits / 8) + 2 * 2 * b * h * n_groups


def test_quantize_constant_group_is_exact():
    x = torch.full((1, 1, 32, 4), 1.25)
    q = quantize(x, 2, 32, "channel")
    assert torch.equal(q.dequantize(torch.float32), x)


def test_log8_codes_round_trip_within_their_step():
    x = torch.cat([torch.logspace(-4.5, 4.5, 1001), torch.tensor([0.0, 1.0, 2.0 ** -3])])
    near, up = log8_encode(x), log8_encode(x, up=True)
    assert near.dtype == torch.uint8 and near[-3] == 0 and log8_decode(near)[-3] == 0
    pos = x > 0
    assert (log8_decode(up)[pos] >= x[pos]).all()
    assert (log8_decode(up)[pos] <= x[pos] * 2 ** (1 / 8) * (1 + 1e-6)).all()
    rel = (log8_decode(near)[pos] / x[pos] - 1).abs()
    assert rel.max() <= 2 ** (1 / 16) - 1 + 1e-6
    assert log8_decode(near[-2:]).tolist() == [1.0, 0.125]  # powers of two are exact


@pytest.mark.parametrize("bits", [1, 2])
def test_quantize_with_8bit_statistics_bound_and_step(bits):
    g = torch.Generator().manual_seed(bits)
    b, h, t, d, group = 2, 3, 96, 9, 32
    x = torch.randn(b, h, t, d, generator=g) * torch.linspace(0.05, 6, d) + torch.linspace(-30, 30, d)
    x[:, :, 32:64, 2] = 1e3 + x[:, :, 32:64, 2] * 1e-3  # a group far from its channel's center, tiny spread
    x[:, :, 64:96, 3] = x[0, 0, 64, 3]         # a constant group
    x[:, :, 0:32, 4] = 0.0                     # an all-zero group
    q8 = quantize(x, bits, group, "channel", stats=8)
    q16 = quantize(x, bits, group, "channel")
    assert (q8.scale.dtype, q8.zero.dtype, q8.anchor.dtype) == (torch.uint8, torch.int8, torch.float16)
    assert q8.anchor.shape == (b, h, 2, d) and q8.stats == 8 and q16.stats == 16 and q16.anchor is None
    s8, _ = q8.group_stats(0, t // group)
    err = (q8.dequantize(torch.float32) - x).abs()
    assert (err <= s8.repeat_interleave(group, 2) / 2 * (1 + 1e-5) + 1e-6).all()
    # where the offset from the center fits, the step is at most 2.2% (log ceil) x L / (L - 1/16)
    # coarser than with fp16 statistics
    levels = 2 ** bits - 1
    near = ((x.view(b, h, 3, group, d).amin(3) - q8.anchor[:, :, 0:1].float()).abs() * 16 / 127) <= (s8 * 0.5)
    ratio = s8 / q16.scale.float().clamp_min(1e-6)
    floor = q8.anchor[:, :, 1:2].float() * 2 ** (-190 / 32)  # the smallest scale (see below)
    fine = near & (q16.scale.float() > floor)
    assert fine.float().mean() > 0.75 and (ratio[fine] <= 2 ** (1 / 32) * levels / (levels - 1 / 16) * 1.002).all()
    # the far group: covered (bound above) with a coarser step, not clipped; it sets its channel's
    # scale reference, and the channel's other groups get at least reference / 61
    assert (s8[:, :, 1, 2] > 10 * q16.scale[:, :, 1, 2].float()).all()
    ref = q8.anchor[:, :, 1, 2].float()
    assert (s8[:, :, :, 2] >= ref[..., None] * 2 ** (-190 / 32) * 0.999).all()
    assert q8.nbytes == b * h * t * math.ceil(d * bits / 8) + 2 * b * h * (t // group) * d + 4 * b * h * d


def test_8bit_statistics_extend_with_the_same_anchor():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 64, 6, generator=g) * 2 + 5
    a = quantize(x[:, :, :32], 2, 16, "channel", stats=8)
    bq = quantize(x[:, :, 32:], 2, 16, "channel", stats=8, anchor=a.anchor)
    both = a.cat(bq)
    torch.testing.assert_close(both.dequantize(torch.float32),
                               torch.cat([a.dequantize(torch.float32), bq.dequantize(torch.float32)], 2))
    with pytest.raises(ValueError, match="anchor"):
        a.cat(quantize(x[:, :, 32:], 2, 16, "channel", stats=8))
    with pytest.raises(ValueError, match="formats"):
        a.cat(quantize(x[:, :, 32:], 2, 16, "channel"))
    with pytest.raises(ValueError, match="per-channel"):
        quantize(x, 2, 6, "token", stats=8)
    with pytest.raises(ValueError, match="1- and 2-bit"):
        quantize(x, 4, 16, "channel", stats=8)
    with pytest.raises(ValueError, match="stats"):
        quantize(x, 2, 16, "channel", stats=4)


@pytest.mark.parametrize("stats", [16, 8])
def test_values_beyond_fp16_are_clipped_not_inf(stats):
    """bf16 models can hold K/V beyond fp16's range; the fp16 (or fp16-anchored) statistics must
    clip them, never overflow to inf / NaN."""
    from mmkv.cache.lowbit import sign_quantize, ternary_quantize

    x = torch.randn(1, 2, 64, 6, generator=torch.Generator().manual_seed(9)) * 10
    x[..., 0] += 1e5
    x[..., 1] -= 7e4
    x = x.bfloat16()
    clipped = x.float().clamp(-65504, 65504)
    for q in (quantize(x, 2, 32, "channel", stats=stats), quantize(x, 1, 32, "channel", stats=stats),
              sign_quantize(x, 32, stats), ternary_quantize(x, 32, stats=stats)):
        r = q.dequantize(torch.float32)
        assert torch.isfinite(r).all()
        assert r.abs().max() <= 65504 * 1.1
    r = quantize(x, 2, 32, "channel", stats=stats).dequantize(torch.float32)
    assert (r[..., 2:] - clipped[..., 2:]).abs().max() < 15   # the ordinary channels are untouched


def test_quantize_rejects_partial_groups():
    with pytest.raises(ValueError):
        quantize(torch.randn(1, 1, 30, 8), 2, 32, "channel")


@pytest.mark.parametrize("lq,lk,hq,hk", [(1, 37, 4, 2), (5, 19, 6, 3), (3, 3, 2, 2)])
def test_split_attention_equals_full(lq, lk, hq, hk):
    """Attention over key blocks merged by log-sum-exp equals attention over all keys."""
    g = torch.Generator().manual_seed(lq * lk)
    q = torch.randn(1, hq, lq, 16, generator=g)
    k = torch.randn(1, hk, lk, 16, generator=g)
    v = torch.randn(1, hk, lk, 16, generator=g)
    mask = causal_mask(lq, lk, "cpu")
    full, _ = partial_attention(q, k, v, 0.25, mask)
    cut = lk // 3 + 1
    m1, m2 = (None, None) if mask is None else (mask[:, :cut], mask[:, cut:])
    parts = [partial_attention(q, k[:, :, :cut], v[:, :, :cut], 0.25, m1),
             partial_attention(q, k[:, :, cut:], v[:, :, cut:], 0.25, m2)]
    torch.testing.assert_close(merge_partials(parts), full, atol=1e-5, rtol=1e-5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)


def _filled_cache(n_layers=2, b=1, h=2, t=150, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = CompressedCache(n_layers)
    for i in range(n_layers):
        cache.update(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g), i)
    return cache


def test_kivi_bytes_match_stored_tensors():
    cache = _filled_cache(t=150, d=16)
    press = KIVI(bits=2, group=32, residual=40, residual_fraction=1)  # the fixed window
    press.compress(cache, None)
    n_q = (150 - 40) // 32 * 32  # 96 quantized, 54 full precision
    for layer in cache.layers:
        assert layer.residual_len == 150 - n_q and layer.segments[0].num_tokens == n_q
        seg = layer.segments[0]
        real = sum(x.nbytes for x in (seg.keys.codes, seg.keys.scale, seg.keys.zero,
                                      seg.values.codes, seg.values.scale, seg.values.zero, layer.keys, layer.values))
        assert layer.nbytes == real
        h = 2  # keys: 2-bit codes + fp16 scale & zero per (32 tokens, channel); values: per (token, 16 channels)
        codes = 2 * h * n_q * 16 * 2 // 8
        stats = h * (n_q // 32) * 16 * 2 * 2 + h * n_q * (16 // 16) * 2 * 2
        window = 2 * h * 54 * 16 * 4
        assert layer.nbytes == codes + stats + window
    assert cache.nbytes() < _filled_cache(t=150, d=16).nbytes()


def test_kivi_flushes_whole_groups_while_decoding():
    cache = _filled_cache(n_layers=1, t=40, d=8)
    press = KIVI(bits=4, group=8, residual=16, residual_fraction=1)
    press.compress(cache, None)
    layer = cache.layers[0]
    assert layer.residual_len == 16 + 0 and layer.segments[0].num_tokens == 24
    for step in range(10):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 0)
        assert 16 <= layer.residual_len < 16 + 8 + 1
        assert layer.stored == 41 + step and layer.seen == 41 + step
    assert sorted(layer.positions()[0].tolist()) == list(range(50))


def test_kivi_with_8bit_key_statistics():
    """stats=8: key scale / zero one byte each against a per-channel anchor, values unchanged;
    decode-time groups join the segment with its anchor; attention equals dense over the
    dequantized cache."""
    cache = _filled_cache(n_layers=1, t=150, d=16, seed=5)
    KIVI(bits=2, group=32, residual=40, residual_fraction=1, stats=8).compress(cache, None)
    layer = cache.layers[0]
    seg = layer.segments[0]
    n_q, h = 96, 2
    assert (seg.keys.scale.dtype, seg.keys.zero.dtype, seg.values.scale.dtype) == (torch.uint8, torch.int8,
                                                                                   torch.float16)
    codes = 2 * h * n_q * 16 * 2 // 8
    stats = h * (n_q // 32) * 16 * 2 + h * 2 * 16 * 2 + h * n_q * 1 * 2 * 2   # keys 1+1 byte, anchor, values
    assert seg.nbytes == codes + stats
    for _ in range(40):  # decode: whole groups flush into the same segment, with its anchor
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    assert len(layer.segments) == 1 and layer.segments[0].num_tokens == 128
    assert layer.segments[0].keys.anchor is seg.keys.anchor
    q = torch.randn(1, 4, 1, 16)
    k, v = layer.dequantized(torch.float32)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           scale=0.25)
    torch.testing.assert_close(layer.attend(q, 0.25).transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RecipeError, match="1- and 2-bit"):
        KIVI(bits=4, stats=8)


def test_quantized_attention_matches_dequantized_reference():
    """KVLayer.attend over [packed segment | window] equals dense attention over the dequantized cache."""
    cache = _filled_cache(n_layers=1, h=2, t=70, d=16, seed=3)
    KIVI(bits=2, group=16, residual=20).compress(cache, None)
    layer = cache.layers[0]
    q = torch.randn(1, 4, 1, 16)
    k, v = layer.dequantized(torch.float32)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           scale=0.25)
    got = layer.attend(q, 0.25)
    torch.testing.assert_close(got.transpose(1, 2), ref, atol=1e-5, rtol=1e-5)


def test_clone_is_an_independent_snapshot():
    cache = _filled_cache(t=50)
    KIVI(bits=2, group=16, residual=8).compress(cache, None)
    snap = cache.clone()
    before = (cache.nbytes(), cache.lengths(), cache.layers[0].keys.clone())
    snap.update(torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16), 0)
    StreamingLLM(recent=4, sink=1).compress(_filled_cache(), None)
    assert (cache.nbytes(), cache.lengths()) == before[:2]
    assert torch.equal(cache.layers[0].keys, before[2])
    assert snap.lengths()[0] == 80


def test_streaming_budget_and_positions():
    cache = _filled_cache(t=100)
    press = StreamingLLM(recent=10, sink=3)
    press.compress(cache, None)
    assert cache.lengths() == [13, 13]
    assert cache.layers[1].positions()[0].tolist() == [0, 1, 2] + list(range(90, 100))
    cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    press.on_decode(cache, None, 0)
    assert cache.layers[0].positions()[0].tolist() == [0, 1, 2] + list(range(91, 101))
    assert cache.get_seq_length() == 101  # logical length is unchanged by eviction


def test_kivi_generation_runs_and_saves_memory(tiny_dir):
    fam = "qwen2_5_vl"
    video = frames_for(fam, n=16, seed=9)
    plain = mmkv.load(tiny_dir[fam]).generate(video, "What?", max_new_tokens=6)
    q = mmkv.load(tiny_dir[fam], recipe="kivi:bits=2,group=16,residual=16").generate(video, "What?",
                                                                                    max_new_tokens=6)
    assert len(q.tokens) > 0
    n = plain.stats.kv_len_per_layer[0]
    n_q = (n - 16) // 16 * 16
    h, d = 2, 16  # fp32 model, head_dim 16
    codes = 2 * h * n_q * d * 2 // 8                            # 2-bit keys and values
    key_stats = h * (n_q // 16) * d * (2 + 2)                   # fp16 scale + zero per (16 tokens, channel)
    value_stats = h * n_q * (d // 16) * (2 + 2)                 # fp16 scale + zero per (token, 16 channels)
    window = 2 * h * (n - n_q) * d * 4                          # fp32 recent window
    per_layer = codes + key_stats + value_stats + window
    assert q.stats.kv_bytes == 2 * per_layer
    assert "int2" in q.stats.kv_bytes_by_class
    assert q.stats.kv_len_per_layer == plain.stats.kv_len_per_layer


def test_kivi4_stays_close_to_full_precision(tiny_dir):
    """4-bit KIVI barely moves the logits of the first decoded tokens on a tiny model."""
    fam = "llava_onevision"
    video = frames_for(fam, n=16, seed=10)
    plain = mmkv.load(tiny_dir[fam]).generate(video, "What?", max_new_tokens=4, output_scores=True)
    q = mmkv.load(tiny_dir[fam], recipe="kivi:bits=4,group=16,residual=8").generate(video, "What?",
                                                                                  max_new_tokens=4,
                                                                                  output_scores=True)
    assert torch.equal(plain.scores[0], q.scores[0])  # prefill itself is exact
    assert (plain.scores[1] - q.scores[1]).abs().max() < 0.05
    assert not torch.equal(plain.scores[1], q.scores[1])  # quantization did happen
