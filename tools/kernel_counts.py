"""Static instruction counts of the fused decode kernel (mmkv/kernels/quant_decode.py), compiled
for sm_90 without a GPU: VidKV at head dim 128 with 8-bit statistics, 32-token tiles, with the
group statistics loaded once per tile (one-group tiles, the default) and once per element.
Counts, not timings: they show what an edit removes or adds, nothing about speed.

    python tools/kernel_counts.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmkv.kernels import quant_decode as qd  # noqa: E402
from mmkv.kernels.aot import DECODE_POINTERS_STATS8, DECODE_VIDKV8, aot_compile, instruction_counts  # noqa: E402

if __name__ == "__main__":
    rows = {"one-group tiles (default)": DECODE_VIDKV8,
            "statistics per element": {**DECODE_VIDKV8, "ONE_GROUP": False}}
    counts = {name: instruction_counts(aot_compile(qd._quant_decode_kernel, cx, DECODE_POINTERS_STATS8, 90))
              for name, cx in rows.items()}
    keys = list(next(iter(counts.values())))
    print("| sm_90, VidKV 8-bit, 32-token tiles | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, c in counts.items():
        print(f"| {name} | " + " | ".join(str(c[k]) for k in keys) + " |")
