"""The sparse prefill kernel (mmkv.kernels.sparse_prefill) run on CPU by the Triton interpreter,
against its PyTorch reference, and the reference against a plain masked-softmax computation.

TRITON_INTERPRET must be set before triton is imported, and transformers (imported by conftest)
imports triton. So the kernel runs in ONE subprocess started with TRITON_INTERPRET=1, which
computes the kernel's outputs for every case below and saves them; the tests rebuild the same
inputs from their seeds and compare in this process.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import mmkv.kernels.sparse_prefill as sp
from mmkv.kernels import interpreter_problem

pytestmark = pytest.mark.skipif(sp.triton is None, reason="triton is not installed")

HERE = os.path.dirname(os.path.abspath(__file__))


def naive(q, k, v, q_idx, k_idx, scaling):
    """Independent formulation: full attention in float64 where keys outside k_idx are masked
    out and causality is by original index, keeping rows q_idx (others 0)."""
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hk, 1)
    vv = v.double().repeat_interleave(hq // hk, 1)
    s = torch.matmul(q.double(), kk.transpose(-1, -2)) * scaling             # [B, Hq, Lq, Lk]
    allowed = torch.zeros(lk, dtype=torch.bool)
    allowed[k_idx] = True
    causal = torch.arange(lk)[None, :] <= (torch.arange(lq) + lk - lq)[:, None]
    vis = causal & allowed[None, :]
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.matmul(p, vv).transpose(1, 2)                                # [B, Lq, Hq, D]
    keep_rows = torch.zeros(lq, dtype=torch.bool)
    keep_rows[q_idx] = True
    return out * keep_rows[None, :, None, None]


def case(b, hq, hk, lq, lk, d, frac, seed, mode, dtype=torch.float32, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    if layout == "blhd":  # transformers' projections: [B, L, H, D] viewed as [B, H, L, D] (non-contiguous)
        q = torch.randn(b, lq, hq, d, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(b, lk, hk, d, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(b, lk, hk, d, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
        k = torch.randn(b, hk, lk, d, generator=g).to(dtype)
        v = torch.randn(b, hk, lk, d, generator=g).to(dtype)
    keep = torch.rand(lk, generator=g) < frac
    keep[-1] = True
    k_idx = keep.nonzero().squeeze(1)
    if mode == "subset":      # ZipVL: the important queries of the chunk over the important keys
        q_idx = keep[lk - lq:].nonzero().squeeze(1)
    else:                     # every query over the important keys
        q_idx = torch.arange(lq)
    return q, k, v, q_idx, k_idx, d ** -0.5


SHAPES = [  # b, hq, hk, lq, lk, d: odd lengths, GQA, a cached prefix (lq < lk), d not a power of two
    (1, 4, 2, 37, 37, 16),
    (2, 3, 1, 21, 50, 24),
    (1, 2, 2, 1, 9, 16),
    (1, 6, 3, 45, 61, 32),
    (1, 4, 2, 29, 33, 80),   # head dim in two chunks (64 + 16), not padded to 128
    (1, 2, 1, 19, 19, 48),   # 32 + 16
]
DTYPES = {"fp32": (torch.float32, 2e-5), "fp16": (torch.float16, 3e-3)}
MODES = ("subset", "all_rows")


def kernel_cases() -> dict:
    """name -> (case() kwargs, q_idx override, k_idx override); inputs are rebuilt from the seed."""
    cases = {}
    for dt in DTYPES:
        for shape in SHAPES:
            for mode in MODES:
                cases[f"{dt}-{shape}-{mode}"] = dict(args=list(shape), frac=0.55, seed=sum(shape), mode=mode,
                                                     dtype=dt)
    # strided inputs (transformers' [B, L, H, D] viewed as [B, H, L, D]) with keep-all sets
    cases["strided-dense"] = dict(args=[1, 4, 2, 29, 40, 16], frac=1.0, seed=3, mode="all_rows", dtype="fp32",
                                  layout="blhd")
    # empty query set; rows before the first kept key
    cases["empty-q"] = dict(args=[1, 2, 1, 17, 17, 16], frac=0.5, seed=5, mode="subset", dtype="fp32",
                            q_idx=[])
    cases["late-keys"] = dict(args=[1, 2, 1, 17, 17, 16], frac=0.5, seed=5, mode="all_rows", dtype="fp32",
                              k_idx=[9, 12])
    return cases


def build(spec):
    q, k, v, q_idx, k_idx, sc = case(*spec["args"], frac=spec["frac"], seed=spec["seed"], mode=spec["mode"],
                                     dtype=DTYPES[spec["dtype"]][0], layout=spec.get("layout", "bhld"))
    if "q_idx" in spec:
        q_idx = torch.tensor(spec["q_idx"], dtype=torch.long)
    if "k_idx" in spec:
        k_idx = torch.tensor(spec["k_idx"], dtype=torch.long)
    return q, k, v, q_idx, k_idx, sc


def run_kernel_cases(out_path: str) -> None:
    """Subprocess entry point (TRITON_INTERPRET=1): the kernel's output for every case."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    res = {}
    for name, spec in kernel_cases().items():
        q, k, v, q_idx, k_idx, sc = build(spec)
        res[name] = sp.sparse_attention_triton(q, k, v, q_idx, k_idx, sc, block_m=16, block_n=16)
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory):
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    path = str(tmp_path_factory.mktemp("sparse_prefill") / "out.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_sparse_prefill_kernel as t; " \
           f"t.run_kernel_cases({json.dumps(path)})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize("name", [n for n, s in kernel_cases().items() if "layout" not in s and "q_idx" not in s
                                  and "k_idx" not in s])
def test_kernel_matches_reference(kernel_out, name):
    spec = kernel_cases()[name]
    q, k, v, q_idx, k_idx, sc = build(spec)
    dtype, tol = DTYPES[spec["dtype"]]
    out = kernel_out[name]
    ref = sp.sparse_attention_ref(q.float(), k.float(), v.float(), q_idx, k_idx, sc)
    assert out.dtype == dtype and out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_kernel_strided_inputs_keep_all_is_causal_attention(kernel_out):
    q, k, v, q_idx, k_idx, sc = build(kernel_cases()["strided-dense"])
    assert not q.is_contiguous() and len(k_idx) == k.shape[2]
    mask = torch.ones(29, 40, dtype=torch.bool).tril_(40 - 29)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             attn_mask=mask, scale=sc).transpose(1, 2)
    torch.testing.assert_close(kernel_out["strided-dense"], dense, atol=2e-5, rtol=2e-5)


def test_kernel_empty_sets_and_unseen_rows(kernel_out):
    assert torch.equal(kernel_out["empty-q"], torch.zeros(1, 17, 2, 16))
    out = kernel_out["late-keys"]  # rows before the first kept key (9) see nothing: 0, never NaN
    assert torch.isfinite(out).all() and out[:, :9].abs().max() == 0 and out[:, 9:].abs().min() > 0
    q, k, v, q_idx, k_idx, sc = build(kernel_cases()["late-keys"])
    torch.testing.assert_close(out, sp.sparse_attention_ref(q, k, v, q_idx, k_idx, sc), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_naive(shape, mode):
    q, k, v, q_idx, k_idx, sc = case(*shape, frac=0.45, seed=7 + sum(shape), mode=mode)
    ref = sp.sparse_attention_ref(q, k, v, q_idx, k_idx, sc)
    torch.testing.assert_close(ref.double(), naive(q, k, v, q_idx, k_idx, sc), atol=1e-5, rtol=1e-5)


def test_dispatcher_uses_reference_on_cpu_and_checks_shapes():
    q, k, v, q_idx, k_idx, sc = case(1, 4, 2, 13, 20, 16, frac=0.6, seed=11, mode="subset")
    assert torch.equal(sp.sparse_attention(q, k, v, q_idx, k_idx, sc), sp.sparse_attention_ref(q, k, v, q_idx, k_idx, sc))
    with pytest.raises(ValueError, match="more queries"):
        sp.sparse_attention_ref(k.repeat(1, 2, 1, 1), q[:, :2], q[:, :2], q_idx, k_idx, sc)
    with pytest.raises(ValueError, match="GQA"):
        sp.sparse_attention_ref(q[:, :3], k, v, q_idx, k_idx, sc)


def _can_target_cuda():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _can_target_cuda(), reason="needs triton's CUDA backend (compiles without a GPU)")
@pytest.mark.parametrize("dtype,arch", [(torch.bfloat16, 90), (torch.float16, 80)])
def test_kernel_compiles_for_gpus_with_int64_offsets(dtype, arch):
    """Compile the launch the launcher makes on a GPU (its default 64 x 32 tiles, bf16 / fp16
    straight into tl.dot, no upcast) for sm_90 and sm_80 from meta tensors at the 7B shape in
    transformers' [B, L, H, D] layout at batch 6 x 128K tokens: the batch offset b * s_qb passes
    2**31 (5 * 469,762,048), so every base-pointer add must take an int64 offset."""
    import re

    from mmkv.kernels.aot import compile_launch

    b, L, hq, hk, d = 6, 131072, 28, 4, 128
    q = torch.empty(b, L, hq, d, dtype=dtype, device="meta").transpose(1, 2)
    k = torch.empty(b, L, hk, d, dtype=dtype, device="meta").transpose(1, 2)
    idx = torch.arange(0, L, 3)
    launch = sp.sparse_attention_launches(q, k, k, idx, idx, d ** -0.5, on_gpu=True)[1][0]
    kw = launch[3]
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["UPCAST"]) == (64, 32, False)
    assert q.stride(0) < 2**31 <= (b - 1) * q.stride(0)
    kernel = compile_launch(launch, arch)
    assert "mma.sync" in kernel.asm["ptx"] or "wgmma" in kernel.asm["ptx"]
    types = {}
    for name, ty in re.findall(r"tt\.addptr %(\w+), %[\w#]+ : !tt\.ptr<\w+>, (i\d+)", kernel.asm["ttir"]):
        types.setdefault(name, set()).add(ty)
    assert all(types.get(n) == {"i64"} for n in ("Q", "K", "V", "Out")), types


def test_head_dims_split_into_power_of_two_chunks():
    assert [tuple(sp.head_chunks(d).values()) for d in (24, 64, 80, 96, 128, 192)] == \
        [(32, 0), (64, 0), (64, 16), (64, 32), (128, 0), (128, 64)]
    q, k, v, q_idx, k_idx, sc = case(1, 2, 1, 9, 9, 80, frac=1.0, seed=1, mode="subset")
    kw = sp.sparse_attention_launches(q, k, v, q_idx, k_idx, sc, on_gpu=True)[1][0][3]
    assert (kw["BLOCK_D"], kw["BLOCK_D2"]) == (64, 16)


def test_explicit_tiles_are_checked():
    q, k, v, q_idx, k_idx, sc = case(1, 2, 1, 9, 9, 16, frac=1.0, seed=1, mode="subset")
    for bad in (12, 4, 0):
        with pytest.raises(ValueError, match="powers of two >= 8"):
            sp.sparse_attention_launches(q, k, v, q_idx, k_idx, sc, block_m=bad)
    with pytest.raises(ValueError, match="block_n=8.*>= 16"):
        sp.sparse_attention_launches(q, k, v, q_idx, k_idx, sc, block_n=8, on_gpu=True)
