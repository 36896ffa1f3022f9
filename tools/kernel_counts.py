"""Static counts of mmkv's Triton kernels, compiled for an NVIDIA GPU without one, each with the
specialization its launcher gives it at a real shape (`mmkv.kernels.aot.compile_launch` on meta
tensors): registers, spills and shared memory, and per thread the PTX exp2 / global loads and
SASS instructions. Counts, not timings: they show what an edit removes or adds, and what a Triton
version does with the same source, nothing about speed.

Decode (`quant_decode`): the 7B-VLM layer (28 query heads, 4 KV heads, head dim 128), one query
token, 32K tokens, batch 1, bf16 model. Sparse prefill (`sparse_prefill`): 8K tokens, half kept,
the GPU default tiles (the launch without autotuning), bf16, and
the autotuner's candidate tiles.

    python tools/kernel_counts.py                 # sm_90
    python tools/kernel_counts.py --arch 80 --only decode
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from mmkv.kernels.aot import compile_launch, instruction_counts, meta_plane  # noqa: E402

B, HQ, HK, D, T = 1, 28, 4, 128, 32768


def decode_variants() -> dict:
    """name -> the fused decode kernel's launch (its first launch: the split kernel)."""
    from mmkv.cache.lowbit import ternary_quantize
    from mmkv.cache.quant import quantize
    from mmkv.cache.vidkv import quantize_keys, select_channels
    from mmkv.kernels import quant_decode as qd

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, HK, 64, D, generator=g), torch.randn(1, HK, 64, D, generator=g)
    qt = torch.empty(B, HQ, 1, D, device="meta")
    perm = select_channels(k, 64, per_head=False)
    out = {}
    for name, stats, vbits in [("VidKV 8-bit stats (default)", 8, 1.58), ("VidKV fp16 stats", 16, 1.58),
                               ("VidKV 8-bit, 2-bit values", 8, 2)]:
        keys = quantize_keys(k, perm, 64, 32, stats)
        vals = ternary_quantize(v, 32, stats=stats) if vbits != 2 else quantize(v, 2, 32, "channel", stats)
        planes = [meta_plane(p, B, HK, T) for p in keys.planes()]
        out[name] = (planes, meta_plane(vals, B, HK, T), None)
    planes, vals, _ = out["VidKV 8-bit stats (default)"]
    out["VidKV 8-bit, 64-token tiles (statistics per element)"] = (planes, vals, 64)
    out["KIVI 2-bit"] = ([meta_plane(quantize(k, 2, 32, "channel"), B, HK, T)],
                         meta_plane(quantize(v, 2, 32, "token"), B, HK, T), None)
    out["KIVI 2-bit, 8-bit key stats"] = ([meta_plane(quantize(k, 2, 32, "channel", 8), B, HK, T)],
                                          out["KIVI 2-bit"][1], None)
    return {name: qd.quant_attention_launches(qt, planes, vals, D ** -0.5, block_n=bn, dtype=torch.bfloat16,
                                              on_gpu=True, sms=132)[2][0]
            for name, (planes, vals, bn) in out.items()}


def sparse_variants() -> dict:
    from mmkv.kernels import sparse_prefill as sp

    out = {}
    for name, d, hq, hk, dtype in [("D=128 (7B), bf16", 128, 28, 4, torch.bfloat16),
                                   ("D=128 (7B), fp16", 128, 28, 4, torch.float16),
                                   ("D=64 (0.5B), bf16", 64, 14, 2, torch.bfloat16),
                                   ("D=80, bf16", 80, 16, 16, torch.bfloat16)]:
        L = 8192
        q = torch.empty(1, L, hq, d, dtype=dtype, device="meta").transpose(1, 2)   # transformers' layout
        k = torch.empty(1, L, hk, d, dtype=dtype, device="meta").transpose(1, 2)
        idx = torch.arange(0, L, 2)
        out[name] = sp.sparse_attention_launches(q, k, k, idx, idx, d ** -0.5, on_gpu=True)[1][0]
    kernel, grid, a, kw = out["D=128 (7B), bf16"]
    for c in sp.TUNE_CONFIGS:  # the autotuner's candidates at D = 128
        name = f"D=128 bf16, tuned candidate {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}, {c.num_warps} warps, " \
               f"{c.num_stages} stages"
        out[name] = (kernel, grid, a, dict(kw, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def table(title: str, launches: dict, arch: int) -> None:
    counts = {name: instruction_counts(compile_launch(launch, arch)) for name, launch in launches.items()}
    keys = list(next(iter(counts.values())))
    print(f"\n| {title} | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, c in counts.items():
        print(f"| {name} | " + " | ".join(str(c.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", choices=["decode", "sparse"], default=None)
    args = ap.parse_args()
    import triton

    print(f"triton {triton.__version__}, sm_{args.arch}; static counts per thread (registers, spills) or per "
          f"program (shared memory)")
    if args.only != "sparse":
        table(f"decode, sm_{args.arch}, {HQ}/{HK}/{D}, {T} tokens", decode_variants(), args.arch)
    if args.only != "decode":
        table(f"sparse prefill, sm_{args.arch}, 8K tokens", sparse_variants(), args.arch)
