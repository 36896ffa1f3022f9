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

`--random SHAPE --tokens T` times instead a random-weight checkpoint of a real model's decoder
shape (`mmkv.models.tiny` shapes, e.g. `0.5b`: Qwen2-VL-2B's hidden 1,536 is `2b`), `--layers` of
it, on random 112 px frames giving T visual tokens, `--n` repeats: at the bundled model's 536-token
prompts the per-layer Python work of any press is a large share of a 24 ms prefill, which says
little about a real prompt. The answers are meaningless there; the work is real.

    python benchmarks/encode_prefill.py --random 0.5b --layers 2 --tokens 4096 --n 3 --recipes 'none;snapkv:0.75'

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
    ap.add_argument("--random", default="", metavar="SHAPE", help="a random checkpoint of this decoder shape")
    ap.add_argument("--layers", type=int, default=2, help="with --random: decoder layers")
    ap.add_argument("--tokens", type=int, default=4096, help="with --random: visual tokens per prompt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mmkv
    from mmkv.bench import quality as Q
    from mmkv.evaluation.prompts import videomme_prompt
    from mmkv.io import load_media
    from mmkv.models.loading import CACHE_DIR
    from mmkv.pipeline import Pipeline

    specs = [r.strip() for r in args.recipes.split(";") if r.strip()]
    if args.random:
        import tempfile

        import numpy as np

        from mmkv.models.tiny import build_tiny

        side = 112  # 16 visual tokens per frame pair (patch 14, 2x2 merge)
        path = os.path.join(tempfile.gettempdir(), f"mmkv_encode_prefill_{args.random}_{args.layers}")
        if not os.path.exists(os.path.join(path, "config.json")):
            build_tiny("qwen2_vl", path, shape=args.random, text_overrides={"num_hidden_layers": args.layers},
                       max_pixels=side * side, min_pixels=side * side)
        frames = 2 * max(1, args.tokens // 16)
        rng = np.random.default_rng(0)
        media = [load_media(rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8), video_fps=2.0)
                 for _ in range(args.n)]
        rows = [{"question": "What happens in the video?", "options": ["A. a", "B. b", "C. c", "D. d"]}] * args.n
        model, what = path, f"random {args.random}-shaped Qwen2-VL, {args.layers} layers, {args.tokens} visual tokens"
    else:
        data = os.path.join(CACHE_DIR, f"needle_heldout_{args.frames}_{Q.HELD_OUT_SEED}")
        rows = Q.dataset(data, args.n, args.frames, Q.HELD_OUT_SEED)
        media = [load_media(os.path.join(data, f"{r['videoID']}.mp4"), frames=r["num_frames"]) for r in rows]
        model, what = "mmkv-tiny", f"{len(rows)} held-out videos of {args.frames} frames"
    base = mmkv.load(model, compress_at="encode")
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
    print(f"{what}; {len(rows)} questions; prefill CPU ms per question, {args.threads} thread(s)")
    cols = [c for c in ("none", TWO_PASS) if c in med]
    print("| recipe | prefill CPU ms (median) | " + " | ".join(f"vs `{c}`" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for k, v in med.items():
        print(f"| `{k}` | {v:.1f} | " + " | ".join(f"{100 * (v / med[c] - 1):+.0f}%" for c in cols) + " |")


if __name__ == "__main__":
    main()
