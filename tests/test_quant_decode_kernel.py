"""The fused quantized decode-attention kernel (mmkv.kernels.quant_decode) against its PyTorch
reference, run on CPU by the Triton interpreter: KIVI and VidKV formats, fp16 and fp32, odd sizes,
several splits, memory outside the valid region poisoned with NaN, and the CPU dispatch.

TRITON_INTERPRET=1 must be set before triton (even triton.language's own jit functions) is
imported, and conftest imports transformers, which imports triton. So `test_interpreter_run`
runs this module's kernel tests (marked `interp`) in one pytest subprocess started with
TRITON_INTERPRET=1; in this process they are skipped, and the others run as usual.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from mmkv.cache import KIVI, CompressedCache
from mmkv.cache.attend import partial_attention
from mmkv.cache.lowbit import SignTensor, TernaryTensor, sign_quantize, ternary_quantize
from mmkv.cache.quant import QuantTensor, quantize
from mmkv.cache.vidkv import VidKV, quantize_keys, select_channels
from mmkv.kernels import interpreter_problem
from mmkv.kernels import quant_decode as qd

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(qd.triton is None, reason="triton is not installed")
interp = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess (test_interpreter_run)")
INTERP_TESTS = "kernel_matches_reference or memory_outside or through_the_layer or kernel_propagates_nan"
N_INTERP = 32  # the @interp tests


def test_interpreter_run():
    """Run the `interp` tests below in a subprocess with TRITON_INTERPRET=1; all must pass."""
    if INTERPRETING:
        pytest.skip("this is the interpreter run")
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", INTERP_TESTS,
                           os.path.abspath(__file__)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == N_INTERP and "skipped" not in proc.stdout.splitlines()[-1], tail


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _vidkv_planes(b, hk, t, d, n_hi, group, values, seed, stats=16):
    g = _gen(seed)
    k = torch.randn(b, hk, t, d, generator=g) * torch.linspace(0.3, 3, d) + torch.linspace(-4, 4, d)
    v = torch.randn(b, hk, t, d, generator=g)
    keys = quantize_keys(k, select_channels(k, n_hi, per_head=True), n_hi, group, stats)
    vq = ternary_quantize(v, group, stats=stats) if values == "ternary" else quantize(v, 2, group, "channel", stats)
    return keys, vq


def _close(got, ref, dtype):
    out, lse = got
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out, ref[0], atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref[1], atol=tol, rtol=tol)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [
    # (B, Hk, G, Lq, T, D, n_hi, group, values, splits, block_n, stats)
    (1, 2, 3, 1, 80, 13, 5, 16, "ternary", 3, 32, 16),   # VidKV 1.x-bit keys, ternary values
    (2, 1, 4, 1, 48, 11, 11, 16, "2bit", 2, 16, 16),     # key_bits = 2 (2-bit only), 2-bit values
    (1, 3, 1, 2, 72, 9, 0, 8, "ternary", 4, 16, 16),     # key_bits = 1 (FFT signs only), Lq = 2
    (1, 2, 3, 1, 80, 13, 5, 16, "ternary", 3, 32, 8),    # 8-bit statistics (log8 scales, int8 zeros)
    (2, 1, 2, 1, 48, 11, 7, 16, "2bit", 2, 16, 8),       # 8-bit statistics, 2-bit values with anchors
    (1, 2, 2, 1, 96, 13, 5, 32, "ternary", 2, None, 8),  # auto tile = the group (one row of statistics)
])
def test_kernel_matches_reference_vidkv(case, dtype):
    b, hk, gq, lq, t, d, n_hi, group, values, splits, block_n, stats = case
    keys, vq = _vidkv_planes(b, hk, t, d, n_hi, group, values, seed=t + d, stats=stats)
    planes = [*keys.planes(), vq]
    assert all((p.scale.dtype == torch.uint8) == (stats == 8) for p in planes)
    q = torch.randn(b, hk * gq, lq, d, generator=_gen(1)).to(dtype)
    qt = keys.transform_query(q)
    got = qd.quant_attention_triton(qt, keys.planes(), vq, 0.37, num_splits=splits, block_n=block_n, dtype=dtype)
    _close(got, qd.quant_attention_ref(qt, keys.planes(), vq, 0.37), dtype)
    # and the same as plain attention over the inverse-FFT keys: Parseval inside the kernel
    dense = partial_attention(q.float(), keys.dequantize(torch.float32), vq.dequantize(torch.float32), 0.37)
    _close(got, dense, dtype)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kbits,vbits,kaxis,vaxis,vgroup,group", [
    (2, 2, "channel", "token", 4, 8), (4, 1, "channel", "channel", 8, 8), (8, 4, "token", "token", 3, 8),
    (2, 2, "channel", "token", 4, 16)])   # 16: auto tile = the keys' group (one row of statistics)
def test_kernel_matches_reference_kivi(kbits, vbits, kaxis, vaxis, vgroup, group, dtype):
    b, hk, gq, t, d = 1, 2, 5, 64 if group == 16 else 56, 12
    g = _gen(kbits * 10 + vbits)
    k, v = torch.randn(b, hk, t, d, generator=g), torch.randn(b, hk, t, d, generator=g)
    kq = quantize(k, kbits, group if kaxis == "channel" else 4, kaxis)
    vq = quantize(v, vbits, vgroup, vaxis)
    q = torch.randn(b, hk * gq, 1, d, generator=g).to(dtype)
    got = qd.quant_attention_triton(q, [kq], vq, 0.29, num_splits=3, block_n=None if group == 16 else 16)
    _close(got, qd.quant_attention_ref(q, [kq], vq, 0.29), dtype)


@interp
@pytest.mark.parametrize("one_group", [True, False])
@pytest.mark.parametrize("fmt", ["ternary scale16", "sign scale16", "key zero16", "key anchor8", "v2 anchor8"])
def test_kernel_propagates_nan_statistics_like_the_reference(fmt, one_group):
    """A NaN statistic gives NaN exactly where the reference has NaN, out and lse, with tiles of
    one group (statistics per tile; ternary scales after the dot) and of two (per element). A
    zero trit under a NaN scale used to come out as a literal 0 here."""
    from test_nan import _nan_planes

    keys, vals = _nan_planes(fmt)
    qt = keys.transform_query(torch.randn(1, 6, 1, 12, generator=_gen(4)))
    got = qd.quant_attention_triton(qt, keys.planes(), vals, 0.3, num_splits=2, block_n=16 if one_group else 32)
    ref = qd.quant_attention_ref(qt, keys.planes(), vals, 0.3)
    assert torch.isnan(ref[0]).any()
    for a, r in zip(got, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(r))
        torch.testing.assert_close(a.nan_to_num(0.0), r.nan_to_num(0.0), atol=1e-5, rtol=1e-5)


def _view_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:, :, :n]


@interp
def test_memory_outside_the_valid_tokens_never_reaches_the_output():
    """Planes are views into larger buffers whose tail (tokens >= T) holds NaN scales and random
    codes: masked loads must not read them, and the result equals the reference on the view."""
    b, hk, t, pad, d, n_hi, group = 1, 2, 40, 24, 10, 4, 8
    keys, vq = _vidkv_planes(b, hk, t + pad, d, n_hi, group, "ternary", seed=5)
    tg = t // group
    for sc in (keys.hi.scale, keys.hi.zero, keys.lo.scale, vq.scale):
        sc[:, :, tg:] = float("nan")
    for c in (keys.hi.codes, keys.lo.codes, vq.codes):
        c[:, :, t:] = torch.randint(0, 243, c[:, :, t:].shape, generator=_gen(0), dtype=torch.uint8)
    hi = QuantTensor(keys.hi.codes[:, :, :t], keys.hi.scale[:, :, :tg], keys.hi.zero[:, :, :tg], 2, group, "channel",
                     n_hi)
    lo = SignTensor(keys.lo.codes[:, :, :t], keys.lo.scale[:, :, :tg], group, d - n_hi)
    vv = TernaryTensor(vq.codes[:, :, :t], vq.scale[:, :, :tg], group, d)
    assert not hi.codes.is_contiguous()  # really views with the big buffers' strides
    q = torch.randn(b, hk * 3, 1, d, generator=_gen(2))
    qt = keys.transform_query(q)
    got = qd.quant_attention_triton(qt, [hi, lo], vv, 0.4, num_splits=3, block_n=16)
    _close(got, qd.quant_attention_ref(qt, [hi, lo], vv, 0.4), torch.float32)
    # and a NaN inside the valid region is not hidden
    bad = TernaryTensor(vv.codes, vv.scale.clone(), group, d)
    bad.scale[0, 1, 0, 0] = float("nan")
    out, _ = qd.quant_attention_triton(qt, [hi, lo], bad, 0.4, num_splits=2, block_n=16)
    assert torch.isnan(out[0, 3:]).any() and torch.isfinite(out[0, :3]).all()


@interp
def test_vidkv_segment_through_the_layer_with_the_kernel(monkeypatch):
    """KVLayer.attend over a VidKV layer with the dispatcher forced onto the kernel equals dense
    attention over the dequantized cache (the residual merged by log-sum-exp)."""
    cache = CompressedCache(1)
    g = _gen(3)
    cache.update(torch.randn(1, 2, 77, 16, generator=g), torch.randn(1, 2, 77, 16, generator=g), 0)
    VidKV(stp=0, group=8, residual=13).compress(cache, None)
    layer = cache.layers[0]
    monkeypatch.setattr(qd, "kernel_available", lambda x: True)
    q = torch.randn(1, 4, 1, 16, generator=g)
    got = layer.attend(q, 0.25)
    k, v = layer.dequantized(torch.float32)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           scale=0.25)
    torch.testing.assert_close(got.transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
    # KIVI segments go through the same kernel via QuantSegment.fused_attention
    cache = CompressedCache(1)
    cache.update(torch.randn(1, 2, 77, 16, generator=g), torch.randn(1, 2, 77, 16, generator=g), 0)
    KIVI(bits=2, group=16, residual=13).compress(cache, None)
    seg = cache.layers[0].segments[0]
    got = seg.fused_attention(q, 0.25)
    assert got is not None
    _close(got, qd.quant_attention_ref(q, [seg.keys], seg.values, 0.25), torch.float32)


def test_cpu_dispatch_uses_the_pytorch_path(monkeypatch):
    keys, vq = _vidkv_planes(1, 2, 64, 12, 6, 16, "ternary", seed=9)
    q = torch.randn(1, 4, 1, 12, generator=_gen(4))
    qt = keys.transform_query(q)

    def boom(*a, **k):
        raise AssertionError("the kernel must not run on CPU tensors")

    monkeypatch.setattr(qd, "quant_attention_triton", boom)
    assert not qd.kernel_available(qt)
    got = qd.quant_attention(qt, keys.planes(), vq, 0.3, block=16)  # 4 blocks merged by lse
    _close(got, qd.quant_attention_ref(qt, keys.planes(), vq, 0.3), torch.float32)
    cache = CompressedCache(1)
    cache.update(torch.randn(1, 2, 60, 8), torch.randn(1, 2, 60, 8), 0)
    KIVI(bits=2, group=8, residual=8).compress(cache, None)
    seg = cache.layers[0].segments[0]
    q8 = torch.randn(1, 4, 3, 8, generator=_gen(5))
    _close(seg.fused_attention(q8, 0.3), qd.quant_attention_ref(q8, [seg.keys], seg.values, 0.3), torch.float32)


@pytest.mark.parametrize("fmt,stats", [(f, 16) for f in ("q1c", "q2c", "q4t", "q8t", "sign", "ternary")] +
                         [(f, 8) for f in ("q1c", "q2c", "sign", "ternary")])  # 8-bit stats: 1-2 bits per channel
def test_table_lookup_dequantization_matches_the_formats_own(fmt, stats):
    """The PyTorch path's block dequantization (byte -> values table) equals each format's own
    dequantize on every group-aligned slice."""
    x = torch.randn(2, 3, 48, 10, generator=_gen(len(fmt))) * 3
    if fmt == "sign":
        p = sign_quantize(x, 8, stats)
    elif fmt == "ternary":
        p = ternary_quantize(x, 8, stats=stats)
    else:
        p = quantize(x, int(fmt[1]), 8 if fmt[2] == "c" else 5, "channel" if fmt[2] == "c" else "token",
                     **({"stats": 8} if stats == 8 else {}))
    for s, e in [(0, 48), (8, 24), (40, 48), (16, 17) if fmt[-1] == "t" else (16, 40)]:
        torch.testing.assert_close(qd._dequant_block(p, s, e), p.dequantize(torch.float32, s, e), atol=0, rtol=0)


def _can_target_cuda():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


aot = pytest.mark.skipif(INTERPRETING or not _can_target_cuda(),
                         reason="compiles the real kernels for a GPU (not under the interpreter; needs triton's CUDA backend)")


def _launches(planes, values, b, hk, t, hq=28, block_n=None, dtype=torch.bfloat16):
    """The kernel launches at [b, hk, t] (meta tensors: no memory), as on an H100 (132 SMs)."""
    from mmkv.kernels.aot import meta_plane

    qt = torch.empty(b, hq, 1, sum(p.head_dim for p in planes), device="meta")
    return qd.quant_attention_launches(qt, [meta_plane(p, b, hk, t) for p in planes], meta_plane(values, b, hk, t),
                                       0.08, block_n=block_n, dtype=dtype, on_gpu=True, sms=132)[2]


@aot
def test_kernels_compile_for_gpus():
    """The interpreter does not type-check like the compiler: compile both kernels for sm_80 and
    sm_90 (ptxas ships with triton; no GPU needed) with the launcher's own specialization at the
    7B layer shape (28/4/128, 32K tokens), and check the dots use tensor cores and the per-tile
    statistics stay per channel under every Triton version."""
    from mmkv.kernels.aot import compile_launch

    g = _gen(0)
    k, v = torch.randn(1, 4, 64, 128, generator=g), torch.randn(1, 4, 64, 128, generator=g)
    keys = quantize_keys(k, select_channels(k, 64, per_head=False), 64, 32, 8)
    tern = ternary_quantize(v, 32, stats=8)
    kivi = [quantize(k, 2, 32, "channel")], quantize(v, 2, 32, "token")
    ptx = {}
    for name, arch, planes, values, bn in [("vidkv8", 90, keys.planes(), tern, None),
                                           ("vidkv8_rows", 90, keys.planes(), tern, 64),
                                           ("vidkv16", 80, quantize_keys(k, keys.perm, 64, 32).planes(),
                                            ternary_quantize(v, 32), None),
                                           ("kivi", 80, *kivi, None)]:
        launches = _launches(planes, values, 1, 4, 32768, block_n=bn)
        ptx[name] = compile_launch(launches[0], arch).asm["ptx"]
        assert "mma.sync" in ptx[name] or "wgmma" in ptx[name]
    compile_launch(launches[1], 90)  # the split reduction
    # a tile that is one group decodes its 8-bit statistics once per channel, not once per element:
    # a handful of exp2 per thread (the softmax's and one per plane), under Triton 3.6 as under 3.8
    assert ptx["vidkv8"].count("ex2.approx") <= 16 < ptx["vidkv8_rows"].count("ex2.approx")
    # codes become floats without int-to-float conversions, and trits without integer division
    # (each u16 division was a call to a subroutine; `python tools/kernel_counts.py` prints the counts)
    assert "div.u16" not in ptx["vidkv8"] and ptx["vidkv8"].count("cvt.rn.f32.s32") < 8


def _addptr_offset_types(ttir: str, names) -> dict:
    """{pointer argument: set of offset types of the scalar tt.addptr ops applied to it}."""
    import re

    out = {n: set() for n in names}
    for name, ty in re.findall(r"tt\.addptr %(\w+), %[\w#]+ : !tt\.ptr<\w+>, (i\d+)", ttir):
        if name in out:
            out[name].add(ty)
    return out


@aot
def test_batch_and_head_offsets_are_int64_where_they_pass_2_31():
    """8-bit KIVI planes at batch 8 x 599,040 tokens (4 KV heads, dim 128): each stride fits int32
    (the launch types it i32), but b * batch stride + h * head stride reaches 2.38e9 > 2**31. The
    kernel must widen to int64 before multiplying: every base-pointer add in the TTIR takes an
    i64 offset."""
    from mmkv.kernels.aot import compile_launch

    k = torch.randn(1, 4, 64, 128, generator=_gen(1))
    kq = quantize(k, 8, 32, "token")
    main = _launches([kq], kq, 8, 4, 599040)[0]
    ints = [a for a in main[2] if isinstance(a, int)]
    assert max(ints) < 2**31 and 7 * ints[0] + 3 * ints[1] >= 2**31   # k1c_b, k1c_h: i32 each, the sum is not
    types = _addptr_offset_types(compile_launch(main, 90).asm["ttir"], ["K1C", "K1S", "K1Z", "VC", "VS", "VZ"])
    assert all(ty == {"i64"} for ty in types.values()), types


def test_bad_inputs_are_rejected():
    keys, vq = _vidkv_planes(1, 2, 32, 8, 4, 16, "ternary", seed=1)
    qt = keys.transform_query(torch.randn(1, 4, 1, 8))
    with pytest.raises(ValueError, match="query"):
        qd.quant_attention_triton(qt[..., :7], keys.planes(), vq, 0.3)
    with pytest.raises(ValueError, match="rows"):
        qd.quant_attention_triton(keys.transform_query(torch.randn(1, 2 * 65, 1, 8)), keys.planes(), vq, 0.3)
    with pytest.raises(ValueError, match="planes"):
        qd.quant_attention_triton(qt, keys.planes()[::-1], vq, 0.3)
    with pytest.raises(ValueError, match="block_n=24: tile sizes must be powers of two"):
        qd.quant_attention_triton(qt, keys.planes(), vq, 0.3, block_n=24)
    with pytest.raises(ValueError, match="block_n=8.*>= 16"):
        qd.quant_attention_launches(qt, keys.planes(), vq, 0.3, block_n=8, on_gpu=True, sms=132)
