"""ZipVL's break-even kept ratio: above which fraction of kept keys is a layer's sparse attention
slower than running it dense? (sets the `dense_above` default of `mmkv/prefill/zipvl.py`)

One layer's prefill attention, Qwen2-0.5B-shaped by default (14 query heads, 2 KV heads, head dim
64), random q/k/v: dense causal SDPA against ZipVL's sparse attention on a kept set of p = r * L
keys (`mmkv.kernels.sparse_prefill.sparse_attention`, the path the pipeline runs), for both ways
of treating the unimportant query rows: `keys` (every row attends to the kept keys, the default)
and `zero` (only the kept rows attend, among themselves). The probes are not timed: they run
before the ratio is known, so they are paid on either side of the decision. Each cell is the
median, over repeats in alternating order, of process CPU time (1 thread by default: other jobs
on a shared machine disturb it far less than wall time) divided by the dense time of the same
repeat. The break-even is where the ratio crosses 1, interpolated linearly.

`--bundled N` times instead the whole prefill of one held-out needle video (256 frames, 536
prompt tokens) on the bundled trained model, N repeats alternating dense, ZipVL with the
fallback (the default) and ZipVL with it off (`dense_above=1`), and prints the median per-repeat
speed relative to dense and the per-layer ratios ZipVL found.

    python benchmarks/zipvl_breakeven.py                                  # 1K, 4K, 8K tokens
    python benchmarks/zipvl_breakeven.py --lengths 512 --repeats 1         # quick check
    python benchmarks/zipvl_breakeven.py --bundled 41                      # the bundled model
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def layer_times(length: int, ratios, repeats: int, hq: int, hk: int, d: int) -> dict:
    """{(mode, ratio): median CPU-time ratio to dense} for one layer's attention at `length`."""
    from mmkv.kernels.sparse_prefill import sparse_attention

    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, hq, length, d, generator=g)
    k = torch.randn(1, hk, length, d, generator=g)
    v = torch.randn(1, hk, length, d, generator=g)
    sc = d ** -0.5
    rows = torch.arange(length)
    runs = {"dense": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc,
                                                                               enable_gqa=True)}
    for r in ratios:
        keep = torch.randperm(length, generator=g)[:max(1, round(r * length))].sort().values
        runs[("keys", r)] = (lambda keep=keep: sparse_attention(q, k, v, rows, keep, sc))
        runs[("zero", r)] = (lambda keep=keep: sparse_attention(q, k, v, keep, keep, sc))
    for fn in runs.values():  # warm-up
        fn()
    times = {n: [] for n in runs}
    items = list(runs.items())
    for i in range(repeats):
        got = {}
        for n, fn in (items if i % 2 == 0 else items[::-1]):
            c = time.process_time()
            fn()
            got[n] = time.process_time() - c
        for n in runs:
            times[n].append(got[n] / got["dense"])
    return {n: statistics.median(v) for n, v in times.items() if n != "dense"}


def crossing(ratios, rel) -> float | None:
    """First ratio where rel crosses 1 (linear interpolation); None if it never does."""
    if rel[0] >= 1:
        return ratios[0]
    for (r0, a), (r1, b) in zip(zip(ratios, rel), zip(ratios[1:], rel[1:])):
        if a < 1 <= b:
            return r0 + (1 - a) * (r1 - r0) / (b - a)
    return None


def bundled(repeats: int) -> None:
    """Prefill time of one held-out video on the bundled model: dense vs ZipVL with / without the fallback."""
    import json
    import os
    import tempfile

    import mmkv
    from mmkv.bench.quality import HELD_OUT_SEED
    from mmkv.evaluation.prompts import videomme_prompt
    from mmkv.synthetic import write_dataset

    data = tempfile.mkdtemp()
    write_dataset(data, 1, 256, HELD_OUT_SEED)
    row = json.load(open(os.path.join(data, "videomme.json")))[0]
    media = mmkv.io.load_media(os.path.join(data, f"{row['videoID']}.mp4"), frames=row["num_frames"])
    question = videomme_prompt(row["question"], row["options"])
    base = mmkv.load("mmkv-tiny")
    specs = ["none", "zipvl:kv=none", "zipvl:kv=none,dense_above=1"]
    pipes = {sp: base.with_recipe(sp) for sp in specs}
    times, last = {sp: [] for sp in specs}, {}
    for i in range(repeats):
        for sp in (specs if i % 2 == 0 else specs[::-1]):
            res = pipes[sp].generate(media, question, max_new_tokens=1)
            times[sp].append(res.stats.prefill_s)
            last[sp] = res.stats
    warm = slice(min(3, repeats - 1), None)
    print(f"bundled model, {last['none'].prompt_tokens}-token prompt, {repeats} repeats "
          f"(first {warm.start} dropped), threads={torch.get_num_threads()}")
    print("| recipe | prefill ms (median) | speed vs dense (median per repeat) | kept ratio per layer | "
          "budget ratio per layer | attn FLOPs saved |")
    print("|---|---|---|---|---|---|")
    for sp in specs:
        rel = statistics.median(d / t for d, t in zip(times["none"][warm], times[sp][warm]))
        ex = last[sp].extra
        cells = ["", "", ""]
        if "zipvl_ratio_per_layer" in ex:
            cells = [str(ex["zipvl_ratio_per_layer"]), str(ex["zipvl_budget_ratio_per_layer"]),
                     f"{100 * ex['zipvl_attn_flops_saved']:.1f}%"]
        print(f"| `{sp}` | {1000 * statistics.median(times[sp][warm]):.1f} | {rel:.3f} | " + " | ".join(cells) + " |")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--ratios", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads", default="14,2,64", help="query heads, KV heads, head dim")
    ap.add_argument("--bundled", type=int, default=0, metavar="N",
                    help="time the bundled model's prefill instead, N repeats")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.bundled:
        print(f"machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}")
        with torch.inference_mode():
            bundled(args.bundled)
        return
    hq, hk, d = (int(x) for x in args.heads.split(","))
    ratios = [float(x) for x in args.ratios.split(",")]
    print(f"machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}; layer: {hq} heads, {hk} KV heads, head dim {d}, fp32; "
          f"median of {args.repeats} (process CPU time, sparse / dense)")
    print("\n| tokens | rows | " + " | ".join(f"r={r:g}" for r in ratios) + " | break-even r |")
    print("|---|---|" + "---|" * len(ratios) + "---|")
    with torch.inference_mode():
        for length in [int(x) for x in args.lengths.split(",")]:
            rel = layer_times(length, ratios, args.repeats, hq, hk, d)
            for mode in ("keys", "zero"):
                row = [rel[(mode, r)] for r in ratios]
                be = crossing(ratios, row)
                print(f"| {length} | {mode} | " + " | ".join(f"{x:.2f}" for x in row)
                      + f" | {'none (<1 everywhere)' if be is None else f'{be:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
