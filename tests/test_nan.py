"""NaN and inf in keys or values: a quantized cache cannot carry them, so every quantizer refuses
them with a NonFiniteError (an InputError) and the cache names the decoder layer, at compression
and at the decode-time flush; the attention paths (PyTorch path, reference; the fused kernel in
tests/test_quant_decode_kernel.py and tests/test_gpu.py) propagate a NaN statistic identically.
Before, 8-bit statistics turned a NaN into zeros (NaN encoded as code 0, scale 0), and a NaN in
a 2-bit plane with 8-bit statistics raised IndexError."""
import pytest
import torch

from mmkv.cache import KIVI, CompressedCache
from mmkv.cache.lowbit import sign_quantize, ternary_quantize
from mmkv.cache.quant import NonFiniteError, quantize, quantize_channel_separable
from mmkv.cache.vidkv import VidKV, quantize_keys, select_channels
from mmkv.errors import InputError
from mmkv.kernels import quant_decode as qd

FORMATS = {
    "minmax 2-bit channel fp16": lambda x: quantize(x, 2, 8, "channel"),
    "minmax 2-bit channel 8-bit stats": lambda x: quantize(x, 2, 8, "channel", 8),
    "minmax 1-bit channel 8-bit stats": lambda x: quantize(x, 1, 8, "channel", 8),
    "minmax 4-bit token": lambda x: quantize(x, 4, 4, "token"),
    "minmax 8-bit token": lambda x: quantize(x, 8, 8, "token"),
    "sign fp16": lambda x: sign_quantize(x, 8),
    "sign log8": lambda x: sign_quantize(x, 8, 8),
    "ternary fp16": lambda x: ternary_quantize(x, 8),
    "ternary log8": lambda x: ternary_quantize(x, 8, stats=8),
    "vidkv keys 8-bit stats": lambda x: quantize_keys(x, select_channels(x.nan_to_num(0, 0, 0), 4, False), 4, 8, 8),
    "vidkv keys fp16 stats": lambda x: quantize_keys(x, select_channels(x.nan_to_num(0, 0, 0), 4, False), 4, 8, 16),
    "channel-separable (ZipVL)": lambda x: quantize_channel_separable(x, 2),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_refuses_nan_and_inf(fmt, bad):
    x = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(0))
    FORMATS[fmt](x)  # finite input quantizes
    x[0, 1, 5, 3] = bad
    with pytest.raises(NonFiniteError, match="1 (NaN|inf)"):
        FORMATS[fmt](x)
    assert issubclass(NonFiniteError, InputError)


def _cache(layers=3, t=80, d=16, bad_layer=None, bad_pos=10, values=False):
    g = torch.Generator().manual_seed(1)
    cache = CompressedCache(layers)
    for i in range(layers):
        k, v = torch.randn(1, 2, t, d, generator=g), torch.randn(1, 2, t, d, generator=g)
        if i == bad_layer:
            (v if values else k)[0, 1, bad_pos, 2] = float("nan")
        cache.update(k, v, i)
    return cache


PRESSES = {"kivi:2": lambda: KIVI(bits=2, group=16, residual=16),
           "kivi:2,stats=8": lambda: KIVI(bits=2, group=16, residual=16, stats=8),
           "vidkv": lambda: VidKV(stp=0, group=16, residual=16),
           "vidkv:stats=16": lambda: VidKV(stp=0, group=16, residual=16, stats=16),
           "vidkv:value_bits=2": lambda: VidKV(stp=0, group=16, residual=16, value_bits=2)}


@pytest.mark.parametrize("values", [False, True])
@pytest.mark.parametrize("press", list(PRESSES))
def test_presses_name_the_layer(press, values):
    cache = _cache(bad_layer=1, values=values)
    with pytest.raises(NonFiniteError, match="^layer 1: ") as err:
        PRESSES[press]().compress(cache, None)
    assert err.value.layer == 1


@pytest.mark.parametrize("press", ["kivi:2,stats=8", "vidkv"])
def test_decode_time_flush_names_the_layer(press):
    """A NaN that arrives after compression (a decode step's key) is refused when its group
    leaves the full-precision window, naming the layer."""
    cache = _cache(t=48)
    PRESSES[press]().compress(cache, None)
    g = torch.Generator().manual_seed(2)
    with pytest.raises(NonFiniteError, match="^layer 2: "):
        for step in range(40):
            for i in range(3):
                k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
                if i == 2 and step == 0:
                    k[..., 0] = float("nan")
                cache.update(k, v, i)


def _nan_planes(fmt):
    """VidKV-shaped planes (2-bit keys + signs, ternary or 2-bit values) with one NaN statistic."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 48, 12, generator=g), torch.randn(1, 2, 48, 12, generator=g)
    stats = 8 if fmt.endswith("8") else 16
    v[0, 1, 16:32, 4] = 0.0  # a group whose trits are all 0 (scale 0, set to NaN below)
    keys = quantize_keys(k, select_channels(k, 6, True), 6, 16, stats)
    vals = quantize(v, 2, 16, "channel", stats) if fmt.startswith("v2") else ternary_quantize(v, 16, stats=stats)
    if fmt == "ternary scale16":     # a zero trit times a NaN scale is NaN, not 0
        vals.scale[0, 1, 1, 4] = float("nan")
    elif fmt == "sign scale16":
        keys.lo.scale[0, 0, 2, 1] = float("nan")
    elif fmt == "key zero16":
        keys.hi.zero[0, 1, 0, 3] = float("nan")
    elif fmt == "key anchor8":       # the 8-bit statistics' fp16 anchor: every group of the channel
        keys.hi.anchor[0, 0, 1, 2] = float("nan")
    elif fmt == "v2 anchor8":
        vals.anchor[0, 1, 0, 5] = float("nan")
    return keys, vals


NAN_FORMATS = ["ternary scale16", "sign scale16", "key zero16", "key anchor8", "v2 anchor8"]


@pytest.mark.parametrize("fmt", NAN_FORMATS)
def test_torch_path_propagates_nan_statistics_like_the_reference(fmt):
    keys, vals = _nan_planes(fmt)
    qt = keys.transform_query(torch.randn(1, 6, 1, 12, generator=torch.Generator().manual_seed(4)))
    ref = qd.quant_attention_ref(qt, keys.planes(), vals, 0.3)
    got = qd.quant_attention_torch(qt, keys.planes(), vals, 0.3, block=16)  # 3 blocks merged
    assert torch.isnan(ref[0]).any()
    for a, r in zip(got, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(r))
        torch.testing.assert_close(a.nan_to_num(0.0), r.nan_to_num(0.0), atol=1e-5, rtol=1e-5)
