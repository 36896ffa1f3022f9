"""The mass merge's search on the CPU, one block against tiles, side by side (issue 14).

Every evicted key is matched to its most cosine-similar kept key (`mmkv.cache.lookm._best_match`,
used by `merge=mass`, LOOK-M's merge and the bi-level stage). On the CPU it runs in tiles of
ROW_TILE x KEY_TILE per head with a running max over the key tiles (`_best_match_tiled`); before,
in blocks of evicted rows against all kept keys, up to SIM_ELEMENTS similarities per block
(`_best_match_blocked`, still the path off the CPU). This script times both on the same random keys, alternating
them `--repeats` times, and checks that they choose the same kept key for every evicted one.

    python benchmarks/match_search.py                      # the bundled model's shape and two larger
    python benchmarks/match_search.py --threads 1 --repeats 9

Shapes are (KV heads, kept, evicted, head dim); the first is mmkv-long's at 1,024 frames and 75%
evicted (2 KV heads, 2,048 kept, 6,144 evicted, dim 64), the last a 7B-like head dim at 32K tokens.
Prints the median milliseconds per call of each and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(2, 2048, 6144, 64), (2, 8192, 24576, 64), (4, 8192, 24576, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import mmkv.cache.lookm as lookm

    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}; tiles {lookm.ROW_TILE} x {lookm.KEY_TILE}; "
          f"blocks of up to {lookm.SIM_ELEMENTS} similarities")
    search = {"block": lookm._best_match_blocked, "tiled": lookm._best_match_tiled}
    print("| KV heads | kept | evicted | dim | blocks ms | tiles ms | speed-up | same matches |")
    print("|---|---|---|---|---|---|---|---|")
    for h, k, e, d in SHAPES:
        kept, ev = torch.randn(1, h, k, d, generator=g), torch.randn(1, h, e, d, generator=g)
        times = {"block": [], "tiled": []}
        piv = {}
        for _ in range(args.repeats):
            for name, fn in search.items():
                t = time.perf_counter()      # each timed as _best_match runs it: the kept keys normalized too
                kn = torch.nn.functional.normalize(kept.float(), dim=-1).transpose(-1, -2)
                piv[name] = fn(kn, ev)[1]
                times[name].append(time.perf_counter() - t)
        a, b = statistics.median(times["block"]), statistics.median(times["tiled"])
        same = int((piv["block"] == piv["tiled"]).sum())
        print(f"| {h} | {k} | {e} | {d} | {1000 * a:.0f} | {1000 * b:.0f} | {a / b:.2f}x | {same} of {piv['block'].numel()} |")


if __name__ == "__main__":
    main()
