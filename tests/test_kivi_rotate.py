"""kivi:rotate=1 (mmkv/cache/rotate.py) and kivi:value_bits: keys and values quantized in a fixed rotated basis
(QuaRot's randomized Hadamard). What it must do: the rotation is orthogonal and fixed; dequantizing
returns the tensor in its own basis; attention through the fused path (rotated query, output
rotated back) equals the block path and plain attention over the dequantized entries; the codes
take the same bytes as unrotated KIVI; decoding keeps flushing into the rotated segment; it
composes with merge=mass; it cuts the logit error of channel-outlier keys; bad values are refused."""
import pytest
import torch

import mmkv
from conftest import frames_for
from mmkv.cache import KIVI, CompressedCache
from mmkv.cache.attend import partial_attention
from mmkv.cache.rotate import RotatedQuant, rotation
from mmkv.cache.storage import storage_nbytes
from mmkv.errors import RecipeError
from mmkv.kernels import segment_attention
from mmkv.recipe import Recipe


@pytest.mark.parametrize("d", [1, 2, 64, 80, 96, 128])
def test_rotation_is_orthogonal_and_fixed(d):
    r = rotation(d)
    torch.testing.assert_close(r @ r.T, torch.eye(d), atol=1e-5, rtol=0)
    from mmkv.cache import rotate as mod
    mod._ROTATIONS.clear()
    assert torch.equal(rotation(d), r)                    # regenerated, not drawn again
    if d > 2 and d & (d - 1) == 0:                        # a signed Hadamard: every entry +-1/sqrt(d)
        torch.testing.assert_close(r.abs(), torch.full((d, d), d ** -0.5))


def layer_with(k, v, **kivi):
    cache = CompressedCache(1)
    cache.layers[0].update(k, v)
    KIVI(**kivi).compress(cache, None)
    return cache


def outlier_kv(seed, b=1, h=2, t=96, d=64):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)
    k[..., 3] *= 20                                       # the channel outliers of real keys
    k[..., 17] += 15
    v[..., 5] *= 10
    return k, v


def test_dequantize_returns_the_tensor_in_its_own_basis():
    k, v = outlier_kv(1)
    layer = layer_with(k, v, bits=8, group=32, residual=0, residual_fraction=0, rotate=1).layers[0]
    seg = layer.segments[0]
    assert isinstance(seg.keys, RotatedQuant) and isinstance(seg.values, RotatedQuant)
    kd, vd = layer.dequantized()
    # 8-bit codes: within a few scale steps of the original, in the original basis
    assert (kd - k).abs().max() < 0.02 * k.abs().max()
    assert (vd - v).abs().max() < 0.02 * v.abs().max()
    torch.testing.assert_close(seg.keys.dequantize(), seg.keys.inner.dequantize() @ rotation(64).T)


@pytest.mark.parametrize("bits,d,lq", [(2, 64, 1), (4, 80, 3), (2, 32, 5)])
def test_fused_path_equals_block_path_and_plain_attention(bits, d, lq):
    k, v = outlier_kv(bits + d, h=2, t=64 + 32, d=d)
    layer = layer_with(k, v, bits=bits, group=32, residual=0, residual_fraction=0, rotate=1).layers[0]
    seg = layer.segments[0]
    q = torch.randn(1, 4, lq, d, generator=torch.Generator().manual_seed(d))
    fused = seg.fused_attention(q, d ** -0.5)
    assert fused is not None
    blocks = list(seg.blocks(torch.float32, 32))
    assert len(blocks) == 3
    kd, vd = layer.dequantized()
    ref_out, ref_lse = partial_attention(q, kd, vd, d ** -0.5)
    torch.testing.assert_close(fused[0], ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused[1], ref_lse, atol=1e-4, rtol=1e-4)
    # the block path (no fused kernel: dequantized 32 tokens at a time)
    seg.fused_attention = lambda *a: None
    out, lse = segment_attention(q, seg, d ** -0.5, 32)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_same_bytes_as_unrotated_and_counted_from_the_stored_tensors():
    k, v = outlier_kv(3, t=160)
    plain = layer_with(k, v, bits=2, group=32, residual=32, residual_fraction=1)
    rot = layer_with(k, v, bits=2, group=32, residual=32, residual_fraction=1, rotate=1)
    assert rot.nbytes() == plain.nbytes()
    assert rot.storage_nbytes() == rot.nbytes() + rot.index_nbytes() == storage_nbytes(rot.layers)
    seg = rot.layers[0].segments[0]
    assert seg.nbytes == seg.keys.inner.nbytes + seg.values.inner.nbytes


def test_decoding_flushes_into_the_rotated_segment():
    k, v = outlier_kv(4, t=64)
    cache = layer_with(k, v, bits=4, group=16, residual=16, residual_fraction=1, rotate=1)
    layer = cache.layers[0]
    assert layer.segments[0].num_tokens == 48 and layer.residual_len == 16
    k2, v2 = outlier_kv(5, t=40)
    for i in range(40):                                   # one token at a time, as decoding
        layer.update(k2[:, :, i:i + 1], v2[:, :, i:i + 1])
    assert len(layer.segments) == 1 and isinstance(layer.segments[0].keys, RotatedQuant)
    assert layer.stored == 104 and layer.residual_len < 16 + 16
    kd, vd = layer.dequantized()
    allk, allv = torch.cat([k, k2], 2), torch.cat([v, v2], 2)
    assert (kd - allk).abs().max() < 0.2 * allk.abs().max()
    torch.testing.assert_close(kd[:, :, -layer.residual_len:], allk[:, :, -layer.residual_len:])


def test_rotation_cuts_the_logit_error_of_outlier_channels():
    k, v = outlier_kv(6, t=256)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 8, 64, generator=g)
    q[..., 3] *= 5                                        # queries large where keys are
    errs = {}
    for rot in (0, 1):
        kd, vd = layer_with(k, v, bits=2, group=32, residual=0, residual_fraction=0, rotate=rot).layers[0].dequantized()
        errs[rot] = ((kd - k) @ q.transpose(-1, -2)).pow(2).mean().item()
    assert errs[1] < 0.5 * errs[0], errs


def test_composes_with_mass_merge_in_the_pipeline(tiny_dir):
    fam = "qwen2_vl"
    video = frames_for(fam, n=16, seed=31)
    base = "observed:0.6,share=1,merge=mass+kivi:2,group=16,residual=8"
    res = {}
    for r in (base, base + ",rotate=1"):
        pipe = mmkv.load(tiny_dir[fam], recipe=r, compress_at="encode")
        enc = pipe.encode(video)
        for layer in enc.cache.layers:                     # the weights travel into the rotated codes
            assert layer.segments and layer.segments[0].logw is not None
            assert isinstance(layer.segments[0].keys, RotatedQuant) == r.endswith("rotate=1")
        a, b = pipe.ask(enc, "What is happening in this video?", max_new_tokens=6), \
            pipe.ask(enc, "What is happening in this video?", max_new_tokens=6)
        assert a.tokens == b.tokens and len(a.tokens) > 0
        res[r] = a
    assert res[base + ",rotate=1"].stats.kv_bytes == res[base].stats.kv_bytes


def test_bad_values_are_refused():
    with pytest.raises(RecipeError, match="rotate"):
        Recipe.parse("kivi:2,rotate=2")


@pytest.mark.parametrize("bits,vbits,rot", [(4, 2, 0), (2, 4, 1)])
def test_value_bits_sets_the_values_width_alone(bits, vbits, rot):
    """value_bits: the values' codes at their own width (the keys keep `bits`); the bytes are those
    of the two code widths, and attention over the codes equals attention over the dequantized."""
    k, v = outlier_kv(8, t=128)
    cache = layer_with(k, v, bits=bits, value_bits=vbits, group=32, residual=0, residual_fraction=0, rotate=rot)
    seg = cache.layers[0].segments[0]
    kq = seg.keys.inner if rot else seg.keys
    vq = seg.values.inner if rot else seg.values
    assert (kq.bits, vq.bits, seg.label) == (bits, vbits, f"k{bits}v{vbits}")
    b, h, t, d = k.shape
    assert kq.codes.nbytes == b * h * t * d * bits // 8 and vq.codes.nbytes == b * h * t * d * vbits // 8
    same = layer_with(k, v, bits=bits, group=32, residual=0, residual_fraction=0).layers[0].segments[0]
    assert same.label == f"int{bits}" and same.values.bits == bits
    q = torch.randn(1, 4, 2, d, generator=torch.Generator().manual_seed(9))
    out, lse = seg.fused_attention(q, d ** -0.5)
    kd, vd = cache.layers[0].dequantized()
    ref_out, ref_lse = partial_attention(q, kd, vd, d ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_bad_value_bits_are_refused():
    with pytest.raises(RecipeError, match="value_bits"):
        Recipe.parse("kivi:2,value_bits=3")
