"""Long-video streaming: peak memory against video length, one fresh process per measurement.

A synthetic 1-fps video (10-minute scenes of the needle generator: noisy background, wandering
distractor squares, one coloured shape per scene) is written to an mp4 frame block by frame block,
so no process ever holds it decoded. Each measurement runs `mmkv.generate`-equivalent work
(decode -> encode -> vision presses -> prefill -> 1 new token) in a NEW Python process, so runs
cannot pollute each other. The figure that matters is the peak resident set during the run
ABOVE the resident set right before it, after the model is loaded and a short warm-up run on the
same video has brought the process to its steady state (`peak_above_base_mib`): what the video
itself costs. The encode phase (decode -> vision tower -> presses) and the prefill of the kept
prompt are measured apart.

    python -m mmkv.bench.longvideo --frames 450,900,1800,3600 --recipes pvc,none
    python -m mmkv.bench.longvideo --worker VIDEO --model DIR --recipe pvc     # one measurement, JSON
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SCENE = 600  # frames per synthetic scene (10 minutes at 1 fps)


def write_long_video(path: str, frames: int, size: int = 112, seed: int = 0, scene: int = SCENE) -> str:
    """A `frames`-frame 1-fps mp4 of `scene`-frame needle scenes, written block by block."""
    import cv2

    from ..synthetic import COLORS, SHAPES, Needle, render

    vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 1.0, (size, size))
    if not vw.isOpened():
        raise RuntimeError(f"cannot open a video writer for {path!r}")
    names = list(COLORS)
    for b, s in enumerate(range(0, frames, scene)):
        n = min(scene, frames - s)
        rng = np.random.default_rng(seed + b)
        start = int(rng.integers(0, max(1, n - 8)))
        needle = Needle(start=start, length=min(6, n - start), color=names[b % len(names)],
                        shape=SHAPES[b % len(SHAPES)], x=size // 2, y=size // 2, size=12)
        for f in render(n, [needle], rng, size):
            vw.write(np.ascontiguousarray(f[:, :, ::-1]))
    vw.release()
    return path


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where there is none."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _settled_rss() -> int:
    """The resident set after handing the heap's free pages back to the OS (glibc's malloc_trim,
    where there is one): what is live, not what the allocator keeps cached after a chunk's
    temporaries are freed, whose amount depends on timing and machine load."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return _rss_now()


def worker(video: str, model: str, recipe: str, chunk_frames: int, threads: int | None,
           warmup_frames: int | None = None) -> dict:
    """One measurement in this process: returns peak memory and what was kept.

    A warm-up run over `warmup_frames` frames (default 8 chunks) of the same video first brings the process to its
    steady state (allocator pools, processor buffers, lazily built kernels); the figure reported is
    the resident set sampled every 20 ms during the measured run, minus the resident set right
    before it; the trace after each chunk (`chunk_rss_mib`) is read with the heap's free pages
    handed back first (`_settled_rss`), so it shows what stays live as the video goes on."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    import mmkv
    from ..stats import peak_memory

    pipe = mmkv.load(model, recipe=recipe, chunk_frames=chunk_frames)
    question = "What color is the shape that appears in the video?"
    pipe.generate(video, question, fps=1.0, max_frames=warmup_frames or 8 * pipe.chunk_frames, max_new_tokens=1)
    base = _settled_rss()
    trace: list[float] = []  # resident set above base after each encoded chunk

    def progress(stage, done, total):
        if stage == "encode":
            trace.append((_settled_rss() - base) / 2**20)

    t0 = time.perf_counter()
    # what generate() does, with the two phases measured apart
    with peak_memory("cpu") as peak_enc:   # decode -> vision tower -> presses, chunk by chunk
        enc = pipe.encode(video, fps=1.0, prefill=False, progress=progress)
    with peak_memory("cpu") as peak_ask:   # prefill of the kept prompt -> 1 token
        res = pipe.ask(enc, question, max_new_tokens=1, reuse=False)
    wall = time.perf_counter() - t0
    s = res.stats
    peak = max(peak_enc["bytes"], peak_ask["bytes"])
    return {"recipe": recipe, "frames": s.frames, "chunk_frames": pipe.chunk_frames,
            "visual_in": s.visual_tokens_in, "visual_kept": s.visual_tokens_kept,
            "prompt_tokens": s.prompt_tokens, "kv_bytes": s.kv_bytes, "base_rss_mib": base / 2**20,
            "peak_rss_mib": peak / 2**20, "peak_above_base_mib": (peak - base) / 2**20,
            "encode_peak_above_base_mib": (peak_enc["bytes"] - base) / 2**20,
            "prefill_peak_above_base_mib": (peak_ask["bytes"] - base) / 2**20,
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "encode_s": s.encode_s, "prefill_s": s.prefill_s, "wall_s": wall, "chunk_rss_mib": trace}


def measure(video: str, model: str, recipe: str, chunk_frames: int = 32, threads: int | None = None,
            warmup_frames: int | None = None, timeout: float | None = None) -> dict:
    """Run `worker` in a fresh Python process and return its result."""
    cmd = [sys.executable, "-m", "mmkv.bench.longvideo", "--worker", video, "--model", model, "--recipe", recipe,
           "--chunk-frames", str(chunk_frames)] + (["--threads", str(threads)] if threads else []) + \
        (["--warmup-frames", str(warmup_frames)] if warmup_frames else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", metavar="VIDEO", default=None, help="measure one run on VIDEO and print JSON")
    p.add_argument("--model", default=None, help="model folder (default: a tiny Qwen2-VL built here)")
    p.add_argument("--recipe", default="pvc")
    p.add_argument("--recipes", default="pvc,none", help="comma-separated, for the table")
    p.add_argument("--frames", default="450,900,1800,3600", help="comma-separated video lengths (1 fps)")
    p.add_argument("--chunk-frames", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup-frames", type=int, default=None, help="frames of the warm-up run (default 8 chunks)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.recipe, a.chunk_frames, a.threads, a.warmup_frames)))
        return 0
    from ..models.tiny import build_tiny

    root = tempfile.mkdtemp(prefix="mmkv_long_")
    model = a.model or build_tiny("qwen2_vl", os.path.join(root, "tiny-qwen2vl"))
    lengths = [int(x) for x in a.frames.split(",")]
    rows = []
    print(f"model {model}; chunk_frames {a.chunk_frames}; videos in {root}")
    print("| recipe | frames | raw frames MiB | visual tokens in -> kept | encode peak above base MiB "
          "| prefill peak above base MiB | peak RSS MiB | encode s | prefill s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in lengths:
        video = write_long_video(os.path.join(root, f"long_{n}.mp4"), n)
        for recipe in a.recipes.split(","):
            r = measure(video, model, recipe.strip(), a.chunk_frames, a.threads)
            r["raw_frames_mib"] = n * 112 * 112 * 3 / 2**20
            rows.append(r)
            print(f"| `{r['recipe']}` | {n} | {r['raw_frames_mib']:.0f} | {r['visual_in']} -> {r['visual_kept']} | "
                  f"{r['encode_peak_above_base_mib']:.1f} | {r['prefill_peak_above_base_mib']:.1f} | "
                  f"{r['peak_rss_mib']:.0f} | {r['encode_s']:.1f} | {r['prefill_s']:.2f} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
