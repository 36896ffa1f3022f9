"""mmkv's overhead with the empty recipe against plain transformers `generate`, side by side.

Both paths start from the same raw frames and question and do the same work (processor, vision
tower, prefill, greedy decode) on two copies of the same random-init checkpoint; runs alternate
so that machine noise hits both alike. Prints the median of each and the median over repeats of
the ratio of back-to-back runs (the CPU's speed drifts by about 10% over minutes).

    python benchmarks/overhead.py                      # Qwen2-0.5B-shaped decoder, ~2K visual tokens
    python benchmarks/overhead.py --frames 64 --repeats 2 --shape tiny   # quick check
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b", choices=["tiny", "0.5b"])
    ap.add_argument("--frames", type=int, default=256, help="112x112 frames; 16 visual tokens per 2 frames")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mmkv
    from mmkv.models.tiny import build_tiny
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.video_utils import VideoMetadata

    path = build_tiny("qwen2_vl", os.path.join(tempfile.mkdtemp(), "m"), shape=args.shape)
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, 112, 112, 3), dtype=np.uint8)
    question = "What is happening in this video?"

    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(path)
    pipe = mmkv.load(path)

    def run_hf():
        msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        meta = VideoMetadata(total_num_frames=len(frames), fps=1.0, frames_indices=list(range(len(frames))))
        inputs = proc(text=[text], videos=[frames], return_tensors="pt", do_sample_frames=False,
                      video_metadata=[meta], cap_pixels_per_frame=False)
        with torch.inference_mode():
            out = hf.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False)
        return out.shape[1] - inputs["input_ids"].shape[1], inputs["input_ids"].shape[1]

    def run_mmkv():
        # no stop token either: both decode exactly --new-tokens tokens
        stop = pipe.adapter.stop_ids
        pipe.adapter.stop_ids = lambda: set()
        try:
            r = pipe.generate(frames, question, max_new_tokens=args.new_tokens)
        finally:
            pipe.adapter.stop_ids = stop
        return len(r.tokens), r.stats.prompt_tokens

    run_hf(), run_mmkv()  # warm-up
    times = {"hf": [], "mmkv": []}
    for i in range(args.repeats):
        order = (("hf", run_hf), ("mmkv", run_mmkv))
        for name, fn in (order if i % 2 == 0 else order[::-1]):  # ABBA: drift hits both alike
            t = time.perf_counter()
            n_new, n_prompt = fn()
            times[name].append(time.perf_counter() - t)
            assert n_new == args.new_tokens, (name, n_new)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: Qwen2-VL, {args.shape}-shaped decoder, random init, fp32, CPU threads={torch.get_num_threads()}")
    print(f"prompt tokens: {n_prompt} ({args.frames} frames), new tokens: {args.new_tokens}, repeats: {args.repeats}")
    print(f"{'path':<22}{'median s':>10}{'min s':>10}{'max s':>10}")
    for k, label in (("hf", "transformers generate"), ("mmkv", "mmkv recipe=none")):
        print(f"{label:<22}{med[k]:>10.3f}{min(times[k]):>10.3f}{max(times[k]):>10.3f}")
    # this CPU's speed drifts by +-10% over minutes: compare each pair of back-to-back runs
    pair = sorted(m / h for m, h in zip(times["mmkv"], times["hf"]))
    ratio = statistics.median(pair)
    print(f"mmkv / transformers, per back-to-back pair: median {ratio:.3f} ({100 * (ratio - 1):+.1f}%), "
          f"range {pair[0]:.3f}..{pair[-1]:.3f}; ratio of medians {med['mmkv'] / med['hf']:.3f}")


if __name__ == "__main__":
    main()
