"""On a CUDA GPU (`pytest -m gpu`; skipped without one): every Triton kernel and format against its
PyTorch reference ON the device, fp16 and bf16, the GPU default tiles and explicit ones, odd
sizes, NaN statistics, and one end-to-end `mmkv.generate` on the bundled model equal to the CPU
answer. These run the compiled kernels (the interpreter tests run the same kernels on CPU, where
bf16, the non-upcast tl.dot branch and the GPU tiles cannot be checked).
`bash benchmarks/gpu_suite.sh` runs this file first and times nothing if any of it fails.
"""
import pytest
import torch

from mmkv.cache import KIVI, CompressedCache
from mmkv.cache.lowbit import ternary_quantize
from mmkv.cache.quant import quantize
from mmkv.cache.vidkv import VidKV, quantize_keys, select_channels
from mmkv.kernels import quant_decode as qd
from mmkv.kernels import sparse_prefill as sp

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(qd.triton is None, reason="triton is not installed")]
DEV = torch.device("cuda")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _kv(b, hk, t, d, seed, dtype):
    """Keys with per-channel offsets and spreads (as real keys have), values plain, in the model
    dtype on the device."""
    g = _gen(seed)
    k = torch.randn(b, hk, t, d, generator=g) * torch.linspace(0.3, 3, d) + torch.linspace(-4, 4, d)
    return k.to(DEV, dtype), torch.randn(b, hk, t, d, generator=g).to(DEV, dtype)


def _decode_planes(fmt, k, v, group):
    d = k.shape[-1]
    if fmt.startswith("vidkv"):  # vidkv-<key_bits>-<values>-<stats>
        _, key_bits, values, stats = fmt.split("-")
        n_hi, stats = int(round(d * (float(key_bits) - 1))), int(stats)
        keys = quantize_keys(k, select_channels(k, n_hi, per_head=True), n_hi, group, stats)
        vals = ternary_quantize(v, group, stats=stats) if values == "t" else quantize(v, 2, group, "channel", stats)
        return keys.planes(), vals, keys.transform_query
    _, bits, stats = fmt.split("-")  # kivi-<bits>-<key stats>
    kq = quantize(k, int(bits), group, "channel", int(stats))
    return [kq], quantize(v, int(bits), min(group, d), "token"), (lambda q: q.float())


DECODE_FORMATS = ["vidkv-1.5-t-8", "vidkv-1.5-t-16", "vidkv-1.5-2-8", "vidkv-2-t-8", "vidkv-1-t-8", "kivi-2-16",
                  "kivi-2-8", "kivi-4-16", "kivi-8-16"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
def test_decode_kernel_matches_reference_on_device(fmt, dtype):
    """7B-layer GQA (28 query heads over 4 KV heads, dim 128) at 1,056 tokens (33 groups of 32:
    an odd tile count), batch 2; the default tiles (one group: statistics per tile), 64-token
    tiles (statistics per element) and 16-token tiles, with several split counts."""
    dt = DTYPES[dtype]
    k, v = _kv(2, 4, 1056, 128, 7, dt)
    planes, vals, transform = _decode_planes(fmt, k, v, 32)
    q = torch.randn(2, 28, 1, 128, generator=_gen(8)).to(DEV, dt)
    qt = transform(q)
    ref = qd.quant_attention_ref(qt, planes, vals, 128 ** -0.5)
    tiles = [(None, None), (64, 3)] + ([(16, 7)] if fmt in ("vidkv-1.5-t-8", "kivi-2-16") else [])
    for block_n, splits in tiles:
        out, lse = qd.quant_attention_triton(qt, planes, vals, 128 ** -0.5, block_n=block_n, num_splits=splits, dtype=dt)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), (fmt, block_n)
        torch.testing.assert_close(out, ref[0], atol=5e-3, rtol=5e-3, msg=lambda m: f"{fmt} {block_n}: {m}")
        torch.testing.assert_close(lse, ref[1], atol=5e-3, rtol=5e-3, msg=lambda m: f"{fmt} {block_n}: {m}")


@pytest.mark.parametrize("shape", [(1, 2, 3, 1, 96, 13, 16), (1, 3, 1, 2, 80, 80, 16), (3, 1, 8, 1, 200, 64, 8)])
def test_decode_kernel_odd_shapes_on_device(shape):
    """Odd head dims (13, 80), Lq = 2, GQA 8, groups of 8 and 16, batch 3, fp16."""
    b, hk, gq, lq, t, d, group = shape
    k, v = _kv(b, hk, t, d, sum(shape), torch.float16)
    for fmt in ("vidkv-1.5-t-8", "vidkv-1.5-2-16", "kivi-2-16"):
        planes, vals, transform = _decode_planes(fmt, k, v, group)
        qt = transform(torch.randn(b, hk * gq, lq, d, generator=_gen(1)).to(DEV, torch.float16))
        ref = qd.quant_attention_ref(qt, planes, vals, 0.3)
        got = qd.quant_attention_triton(qt, planes, vals, 0.3, dtype=torch.float16)
        torch.testing.assert_close(got[0], ref[0], atol=5e-3, rtol=5e-3, msg=lambda m: f"{fmt}: {m}")
        torch.testing.assert_close(got[1], ref[1], atol=5e-3, rtol=5e-3, msg=lambda m: f"{fmt}: {m}")


def test_decode_kernel_fp32_is_ieee_on_device():
    k, v = _kv(1, 4, 512, 128, 3, torch.float32)
    planes, vals, transform = _decode_planes("vidkv-1.5-t-8", k, v, 32)
    qt = transform(torch.randn(1, 28, 1, 128, generator=_gen(2)).to(DEV))
    got = qd.quant_attention_triton(qt, planes, vals, 0.088, dtype=torch.float32)
    ref = qd.quant_attention_ref(qt, planes, vals, 0.088)
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["ternary scale16", "sign scale16", "key zero16", "key anchor8", "v2 anchor8"])
def test_decode_kernel_propagates_nan_on_device(fmt):
    """NaN statistics give NaN exactly where the reference has NaN (the GPU's max ignores NaN,
    the interpreter's does not: both must still agree with the reference)."""
    from test_nan import _nan_planes

    keys, vals = _nan_planes(fmt)
    keys.hi, keys.lo, keys.perm = (_to_dev(keys.hi), _to_dev(keys.lo), keys.perm.to(DEV))
    vals = _to_dev(vals)
    qt = keys.transform_query(torch.randn(1, 6, 1, 12, generator=_gen(4)).to(DEV))
    ref = qd.quant_attention_ref(qt, keys.planes(), vals, 0.3)
    for block_n in (16, 32):
        got = qd.quant_attention_triton(qt, keys.planes(), vals, 0.3, num_splits=2, block_n=block_n)
        for a, r in zip(got, ref):
            assert torch.equal(torch.isnan(a), torch.isnan(r)), (fmt, block_n)
            torch.testing.assert_close(a.nan_to_num(0.0), r.nan_to_num(0.0), atol=1e-3, rtol=1e-3)


def _to_dev(p):
    import dataclasses

    return dataclasses.replace(p, **{f.name: getattr(p, f.name).to(DEV) for f in dataclasses.fields(p)
                                     if isinstance(getattr(p, f.name), torch.Tensor)})


@pytest.mark.parametrize("press", ["vidkv", "kivi"])
def test_layer_attend_uses_the_kernel_on_device(press, monkeypatch):
    """KVLayer.attend on CUDA (the dispatcher picks the kernel: checked) equals dense attention
    over the dequantized cache, bf16."""
    calls = []
    real = qd.quant_attention_triton
    monkeypatch.setattr(qd, "quant_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    k, v = _kv(1, 4, 1000, 128, 5, torch.bfloat16)
    cache = CompressedCache(1)
    cache.set_fused(True)
    cache.update(k, v, 0)
    (VidKV(stp=0) if press == "vidkv" else KIVI(bits=2)).compress(cache, None)
    layer = cache.layers[0]
    q = torch.randn(1, 28, 1, 128, generator=_gen(6)).to(DEV, torch.bfloat16)
    got = layer.attend(q, 128 ** -0.5).float()
    kd, vd = layer.dequantized(torch.float32)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kd, vd, scale=128 ** -0.5, enable_gqa=True)
    assert calls
    torch.testing.assert_close(got.transpose(1, 2), ref, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- sparse prefill
def _sparse_case(b, hq, hk, lq, lk, d, frac, seed, mode, dtype, layout):
    g = _gen(seed)
    shape = (lambda h, l: (b, l, h, d)) if layout == "blhd" else (lambda h, l: (b, h, l, d))
    q, k, v = (torch.randn(*shape(h, l), generator=g).to(DEV, dtype) for h, l in ((hq, lq), (hk, lk), (hk, lk)))
    if layout == "blhd":  # transformers' projections viewed as [B, H, L, D]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    keep = torch.rand(lk, generator=g) < frac
    keep[-1] = True
    k_idx = keep.nonzero().squeeze(1)
    q_idx = keep[lk - lq:].nonzero().squeeze(1) if mode == "subset" else torch.arange(lq)
    return q, k, v, q_idx.to(DEV), k_idx.to(DEV), d ** -0.5


SPARSE_TOL = {"fp16": 5e-3, "bf16": 2e-2, "fp32": 1e-4}


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 28, 4, 700, 700, 128), (2, 14, 2, 333, 517, 64), (1, 16, 16, 200, 200, 80),
                                   (1, 6, 3, 45, 61, 32)])
def test_sparse_kernel_matches_reference_on_device(shape, dtype):
    """The GPU default tiles (64 x 32 at D = 128, 64 x 64 at D <= 64), fp16 and bf16 straight into
    tl.dot (no upcast), fp32 upcast IEEE; ZipVL's subset and key-only sparsity, a cached prefix
    (Lq < Lk), GQA, odd lengths, head dim 80, transformers' strided layout."""
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for mode, layout in (("subset", "blhd"), ("all_rows", "bhld")):
        q, k, v, q_idx, k_idx, sc = _sparse_case(*shape, 0.5, sum(shape), mode, dt, layout)
        out, launches = sp.sparse_attention_launches(q, k, v, q_idx, k_idx, sc)  # the untuned default tiles
        kernel, grid, args, kwargs = launches[0]
        assert kwargs["UPCAST"] == (dtype == "fp32") and kwargs["BLOCK_M"] == 64
        kernel[grid](*args, **kwargs)
        ref = sp.sparse_attention_ref(q.float(), k.float(), v.float(), q_idx, k_idx, sc)
        assert out.dtype == dt and torch.isfinite(out).all()
        tol = SPARSE_TOL[dtype]
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol, msg=lambda m: f"{mode} {layout}: {m}")


@pytest.mark.parametrize("shape", [(1, 28, 4, 700, 700, 128), (2, 14, 2, 2500, 2600, 64)])
def test_sparse_kernel_autotuned_on_device(shape):
    """The production launch (autotuned tiles; at 2,500 queries the larger bucket) in bf16."""
    for mode in ("subset", "all_rows"):
        q, k, v, q_idx, k_idx, sc = _sparse_case(*shape, 0.5, sum(shape), mode, torch.bfloat16, "blhd")
        out = sp.sparse_attention_triton(q, k, v, q_idx, k_idx, sc)
        ref = sp.sparse_attention_ref(q.float(), k.float(), v.float(), q_idx, k_idx, sc)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"{mode}: {m}")


@pytest.mark.parametrize("tiles", [(16, 16, 4), (128, 64, 8), (32, 128, 4)])
def test_sparse_kernel_explicit_tiles_on_device(tiles):
    bm, bn, warps = tiles
    q, k, v, q_idx, k_idx, sc = _sparse_case(1, 8, 2, 300, 300, 64, 0.6, 11, "subset", torch.bfloat16, "blhd")
    out = sp.sparse_attention_triton(q, k, v, q_idx, k_idx, sc, block_m=bm, block_n=bn, num_warps=warps)
    ref = sp.sparse_attention_ref(q.float(), k.float(), v.float(), q_idx, k_idx, sc)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_sparse_kernel_empty_rows_and_nan_on_device():
    q, k, v, q_idx, k_idx, sc = _sparse_case(1, 2, 1, 17, 17, 64, 0.5, 5, "all_rows", torch.float16, "bhld")
    k_idx = torch.tensor([9, 12], device=DEV)
    out = sp.sparse_attention_triton(q, k, v, q_idx, k_idx, sc)
    assert torch.isfinite(out).all() and out[:, :9].abs().max() == 0 and out[:, 9:].abs().min() > 0
    k[0, 0, 12, 3] = float("nan")  # the rows that see key 12 are NaN, the others are not
    out = sp.sparse_attention_triton(q, k, v, q_idx, k_idx, sc)
    rows = torch.isnan(out).any(-1).any(-1)[0]
    assert rows[12:].all() and not rows[:12].any(), rows


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("recipe", ["none", "fast", "vidkv", "kivi:2"])
def test_generate_on_cuda_equals_cpu(recipe):
    """The bundled model (fp32 on both devices) answers the same on CUDA as on CPU, through the
    sparse prefill kernel (`fast` = ZipVL) and the decode kernel (VidKV, KIVI)."""
    import mmkv
    from mmkv.synthetic import make_example

    ex = make_example(1_000_000 + 700_500, 64, task="color")
    cpu = mmkv.generate(ex.frames, ex.prompt, model="mmkv-tiny", recipe=recipe, device="cpu", dtype="fp32",
                        max_new_tokens=4)
    gpu = mmkv.generate(ex.frames, ex.prompt, model="mmkv-tiny", recipe=recipe, device="cuda", dtype="fp32",
                        max_new_tokens=4)
    assert gpu.text == cpu.text


def test_generate_bf16_answers_like_cpu():
    """The default dtype on CUDA (bf16) gives the CPU's fp32 answer letter, with the kernels."""
    import mmkv
    from mmkv.synthetic import make_example

    for seed in (1_000_000 + 700_501, 1_000_000 + 700_502):
        ex = make_example(seed, 64, task="shape")
        cpu = mmkv.generate(ex.frames, ex.prompt, model="mmkv-tiny", recipe="fast", device="cpu", dtype="fp32",
                            max_new_tokens=2)
        gpu = mmkv.generate(ex.frames, ex.prompt, model="mmkv-tiny", recipe="fast", device="cuda", max_new_tokens=2)
        assert gpu.text.strip()[:1] == cpu.text.strip()[:1], (seed, gpu.text, cpu.text)
