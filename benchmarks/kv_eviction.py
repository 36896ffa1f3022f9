"""KV eviction / merging presses (LOOK-M, Elastic Cache, and with KIVI after them) against the
uncompressed cache, side by side in one run: KV bytes stored, entries per layer, decode time per
token, and the prefill cost of gathering attention statistics.

One model is loaded once; for each recipe the video is encoded (prefix prefill, with the press's
`observe` hooks) and then asked the same question `--repeats` times, recipes interleaved so that
machine drift hits all alike. Exactly `--new-tokens` tokens are decoded (no stop token). Random
weights: the answers are meaningless, the bytes and times are real.

    python benchmarks/kv_eviction.py --layers 4 --threads 1       # 0.5B attention shape, 4 layers, 4K prompt
    python benchmarks/kv_eviction.py --shape tiny --frames 64     # quick check

Decode time is the process CPU time between the first and the last generated token (per step,
the median over repeats): on a shared machine it is far steadier than wall time. Use
`--threads 1` with it (CPU time then equals the work done).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

RECIPES = ["none", "lookm", "elastic", "kivi:2", "lookm+kivi:2", "elastic+kivi:2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b", choices=["tiny", "0.5b"])
    ap.add_argument("--frames", type=int, default=512, help="112x112 frames; 16 visual tokens per 2 frames")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mmkv
    from mmkv.models.tiny import build_tiny
    from mmkv.recipe import Recipe

    over = {"num_hidden_layers": args.layers} if args.layers else None
    path = build_tiny("qwen2_vl", os.path.join(tempfile.mkdtemp(), "m"), shape=args.shape, text_overrides=over)
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, 112, 112, 3), dtype=np.uint8)
    question = "What is happening in this video?"
    pipe = mmkv.load(path, dtype=args.dtype)
    pipe.adapter.stop_ids = lambda: set()  # decode exactly --new-tokens tokens
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]

    def use(spec):
        pipe.recipe = Recipe.parse(spec)
        pipe._split_stages()

    enc = {}
    for spec in recipes:  # one encoding per recipe: the presses observe the prefix prefill
        use(spec)
        enc[spec] = pipe.encode(frames)
        print(f"encoded for {spec}: prefix prefill {enc[spec].stats.prefill_s:.1f} s", file=sys.stderr, flush=True)
    runs: dict[str, list] = {s: [] for s in recipes}
    for i in range(args.repeats):
        order = recipes if i % 2 == 0 else recipes[::-1]
        for spec in order:
            use(spec)
            marks: list = []

            def progress(stage, done, total):
                if stage == "decode" and done in (1, total):
                    marks.append(time.process_time())

            res = pipe.ask(enc[spec], question, max_new_tokens=args.new_tokens, progress=progress)
            assert res.stats.new_tokens == args.new_tokens and len(marks) == 2
            runs[spec].append((res.stats, (marks[1] - marks[0]) / (args.new_tokens - 1)))
            print(f"repeat {i + 1} {spec}: decode {runs[spec][-1][1] * 1000:.1f} ms/step (CPU)", file=sys.stderr,
                  flush=True)

    base = runs[recipes[0]][0][0]
    base_dec = statistics.median(c for _, c in runs[recipes[0]])
    layers = pipe.adapter.num_layers
    print(f"model: Qwen2-VL, {args.shape}-shaped decoder ({layers} layers), random init, {args.dtype}, CPU threads="
          f"{torch.get_num_threads()}; prompt {base.prompt_tokens} tokens ({args.frames} frames), "
          f"{args.new_tokens} new tokens, {args.repeats} repeats (median)")
    hdr = (f"| {'recipe':<16} | {'entries/layer':>13} | {'KV bytes':>10} | {'vs none':>8} | {'after decode':>12} | "
           f"{'decode CPU ms/step':>18} | {'vs none':>7} | {'question+compress s':>19} | {'prefix prefill s':>16} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c) + 0) for c in hdr.split("|")[1:-1]) + "|")
    for spec in recipes:
        st = [s for s, _ in runs[spec]]
        s0 = st[0]
        dec = statistics.median(c for _, c in runs[spec])
        ask_s = statistics.median(s.prefill_s - enc[spec].stats.prefill_s for s in st)
        lens = sorted(set(s0.kv_len_per_layer))
        ent = str(lens[0]) if len(lens) == 1 else f"{lens[0]}-{lens[-1]}"
        print(f"| {spec:<16} | {ent:>13} | {s0.kv_bytes:>10,} | {base.kv_bytes / s0.kv_bytes:>7.2f}x | "
              f"{int(s0.extra['kv_bytes_final']):>12,} | {1000 * dec:>18.1f} | {base_dec / dec:>6.2f}x | "
              f"{ask_s:>19.2f} | {enc[spec].stats.prefill_s:>16.1f} |")


if __name__ == "__main__":
    main()
