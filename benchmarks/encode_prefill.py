"""What KV compression at encode adds to the prefill, side by side with the uncompressed prefill.

On the held-out needle videos of `mmkv bench quality` (bundled trained model), every recipe runs
with compress_at="encode" on the same decoded frames, recipes interleaved video by video so that
machine drift hits all alike. For each question it records the process CPU time (one thread)
spent in the prefill: the prefix prefill with the presses' `observe` hooks, the proxy rows,
every `compress`, and the question's prefill over the compressed cache; not the vision tower,
not decoding. Two uncompressed baselines:

- `none`: one pass over video + question (what `generate` does without an encode-time press);
- `none (2 passes)`: the prefix prefilled at encode and the question at ask, no press (the
  encode-once-ask-many path every encode-time press uses, with nothing compressed).

    python benchmarks/encode_prefill.py                                  # the default recipes, 40 videos
    python benchmarks/encode_prefill.py --n 10 --recipes 'none;elastic:0.5'

Prints the median per question over the videos and the ratio of medians against each baseline.
CPU time with one thread is the work done, far steadier than wall time on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

RECIPES = ["none", "observed:0.9,share=1,probes=16", "observed:0.9,share=1", "observed:0.9", "snapkv:0.9",
           "expected:0.9", "elastic:0.5", "elastic:0.5+kivi:2", "kivi:2"]
TWO_PASS = "none (2 passes)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="held-out videos")
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--recipes", default=";".join(RECIPES), help="';' between recipes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mmkv
    from mmkv.bench import quality as Q
    from mmkv.evaluation.prompts import videomme_prompt
    from mmkv.io import load_media
    from mmkv.models.loading import CACHE_DIR
    from mmkv.pipeline import Pipeline

    data = os.path.join(CACHE_DIR, f"needle_heldout_{args.frames}_{Q.HELD_OUT_SEED}")
    rows = Q.dataset(data, args.n, args.frames, Q.HELD_OUT_SEED)
    media = [load_media(os.path.join(data, f"{r['videoID']}.mp4"), frames=r["num_frames"]) for r in rows]
    specs = [r.strip() for r in args.recipes.split(";") if r.strip()]
    base = mmkv.load("mmkv-tiny", compress_at="encode")
    pipes = {s: base.with_recipe(s) for s in specs}
    if "none" in specs:
        pipes[TWO_PASS] = base.with_recipe("none")
    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.thread_time() - t
        return wrapper

    for pipe in pipes.values():  # the prefill section: prefill passes, proxy rows, compress
        pipe._prefill = timed(pipe._prefill)
        if hasattr(pipe, "_proxy"):
            pipe._proxy = timed(pipe._proxy)
        for p in pipe.recipe.kv:
            p.compress = timed(p.compress)
    assert isinstance(base, Pipeline)
    ms: dict[str, list[float]] = {name: [] for name in pipes}
    for m, r in zip(media, rows):
        q = videomme_prompt(r["question"], r["options"])
        for name, pipe in pipes.items():
            spent[0] = 0.0
            if name == TWO_PASS:
                pipe.ask(pipe.encode(m), q, max_new_tokens=1, reuse=False)
            else:
                pipe.generate(m, q, max_new_tokens=1)
            ms[name].append(1000 * spent[0])
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"{len(rows)} held-out videos of {args.frames} frames; prefill CPU ms per question, {args.threads} thread(s)")
    cols = [c for c in ("none", TWO_PASS) if c in med]
    print("| recipe | prefill CPU ms (median) | " + " | ".join(f"vs `{c}`" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for k, v in med.items():
        print(f"| `{k}` | {v:.1f} | " + " | ".join(f"{100 * (v / med[c] - 1):+.0f}%" for c in cols) + " |")


if __name__ == "__main__":
    main()
