"""Visual-token presses side by side at equal token budgets: tokens kept, encode (with the press),
prefill time and peak memory, against the uncompressed input.

Model: Qwen2-VL with a Qwen2-0.5B-shaped random decoder (`--shape 0.5b`) and the tiny vision tower
(112 px frames, 16 tokens per 2-frame slot), so only costs are meaningful, not answers. Video: a
synthetic needle video at 112 px (noisy background, wandering distractors, one coloured shape).
Equal budgets: PVC runs first; EVS and random keep then run at the fraction PVC actually kept,
2x2 pooling keeps 25% by construction. Every measurement runs in a fresh process (so peak memory
is that run's own), recipes alternate within each repeat, and the table gives medians and the
ratio to `none` measured in the same repeat.

    python benchmarks/vision.py                                  # 64, 128, 256 frames, 0.5B decoder
    python benchmarks/vision.py --frames 64 --shape tiny --repeats 1   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def worker(model: str, recipe: str, frames: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    import numpy as np

    import mmkv
    from mmkv.synthetic import Needle, render

    rng = np.random.default_rng(7)
    needle = Needle(start=frames // 3, length=6, color="red", shape="circle", x=40, y=60, size=12)
    video = render(frames, [needle], rng, size=112)                   # 16 tokens per 2-frame slot
    pipe = mmkv.load(model, recipe=recipe)
    pipe.generate(video[:8], "What?", max_new_tokens=1)                 # warm-up
    res = pipe.generate(video, "What color is the shape that appears in the video?", max_new_tokens=1)
    s = res.stats
    return {"recipe": recipe, "frames": frames, "visual_in": s.visual_tokens_in, "visual_kept": s.visual_tokens_kept,
            "encode_s": s.encode_s, "prefill_s": s.prefill_s, "peak_mib": s.peak_memory_bytes / 2**20,
            "kv_bytes": s.kv_bytes}


def run(model, recipe, frames, threads) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--recipe", recipe, "--frames", str(frames)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--recipe", default="none")
    ap.add_argument("--frames", default="64,128,256")
    ap.add_argument("--shape", default="0.5b", choices=["tiny", "0.5b"])
    ap.add_argument("--pvc", default="pvc:4", help="the PVC recipe whose kept fraction sets the budget")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.model, a.recipe, int(a.frames), a.threads)))
        return 0
    from mmkv.models.tiny import build_tiny

    model = a.model or build_tiny("qwen2_vl", os.path.join(tempfile.mkdtemp(), "m"), shape=a.shape)
    print(f"model {model} (qwen2_vl, {a.shape} decoder, random weights); repeats {a.repeats}; threads {a.threads}")
    print("| recipe | frames | visual tokens kept | encode s | prefill s | prefill vs none | peak RSS MiB "
          "| peak vs none |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for frames in [int(x) for x in a.frames.split(",")]:
        res: dict[str, list[dict]] = {}
        for _ in range(a.repeats):
            base = run(model, "none", frames, a.threads)
            pvc = run(model, a.pvc, frames, a.threads)
            frac = pvc["visual_kept"] / pvc["visual_in"]
            recipes = [f"evs:{frac:.4f}", f"random:{frac:.4f}", "pool"]
            got = [base, pvc] + [run(model, r, frames, a.threads) for r in recipes]
            for g in got:
                name = g["recipe"].split(":")[0] if g["recipe"] not in ("none", a.pvc) else g["recipe"]
                g["prefill_ratio"] = g["prefill_s"] / base["prefill_s"]
                g["peak_ratio"] = g["peak_mib"] / base["peak_mib"]
                res.setdefault(name, []).append(g)
        for name, gs in res.items():
            med = lambda k: statistics.median(g[k] for g in gs)  # noqa: E731
            g0 = gs[0]
            row = {"recipe": g0["recipe"], "frames": frames, "visual_in": g0["visual_in"],
                   "visual_kept": g0["visual_kept"], **{k: med(k) for k in
                                                         ("encode_s", "prefill_s", "prefill_ratio", "peak_mib",
                                                          "peak_ratio")}}
            rows.append(row)
            print(f"| `{row['recipe']}` | {frames} | {row['visual_kept']} / {row['visual_in']} "
                  f"({100 * row['visual_kept'] / row['visual_in']:.1f}%) | {row['encode_s']:.2f} | "
                  f"{row['prefill_s']:.2f} | {row['prefill_ratio']:.2f} | {row['peak_mib']:.0f} | "
                  f"{row['peak_ratio']:.2f} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
