"""VidKV's 8-bit group statistics against fp16 ones on the CPU decode path, interleaved A/B.

The same synthetic layer (benchmarks/quant_decode.py's `build`) is quantized with `stats=16` and
`stats=8`; the PyTorch attention path over each segment is called alternately, one thread,
process CPU time, and the medians and their ratio are printed. Interleaving keeps the machine's
drift (a VM sharing memory bandwidth) out of the ratio.

    python benchmarks/vidkv_stats_ab.py                       # 0.5B layer shape (14/2/64), 32K tokens
    python benchmarks/vidkv_stats_ab.py --heads 28 --kv-heads 4 --head-dim 128 --context 8192
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from quant_decode import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--press", default="vidkv:stp=0", help="the press; stats=16 / stats=8 are appended")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mmkv.kernels import quant_decode as qd

    segs = {}
    for stats in (16, 8):
        layer, _, _ = build(f"{args.press},stats={stats}", args.kv_heads, args.context, args.head_dim,
                            torch.float32, torch.device("cpu"))
        segs[stats] = layer.segments[0]
    q = torch.randn(1, args.heads, 1, args.head_dim)
    times = {k: [] for k in segs}
    for i in range(args.repeats + 3):
        for stats, seg in segs.items():
            qt, planes = seg.keys.transform_query(q), seg.keys.planes()
            t0 = time.process_time()
            qd.quant_attention_torch(qt, planes, seg.values, args.head_dim ** -0.5)
            if i >= 3:  # warm-up
                times[stats].append(time.process_time() - t0)
    m16, m8 = statistics.median(times[16]), statistics.median(times[8])
    print(f"{args.press}, Hq={args.heads}, Hk={args.kv_heads}, D={args.head_dim}, {args.context} tokens, "
          f"{args.repeats} interleaved calls each, one thread, CPU time")
    print("| statistics | bits/elem | torch path ms | vs fp16 statistics |")
    print("|---|---|---|---|")
    for stats, m in ((16, m16), (8, m8)):
        seg = segs[stats]
        bits = 8 * seg.nbytes / (2 * seg.values.shape[1] * seg.num_tokens * args.head_dim)
        print(f"| {stats}-bit | {bits:.3f} | {m * 1e3:.2f} | {m / m16:.2f} |")


if __name__ == "__main__":
    main()
