"""Quality benchmark: accuracy against compression on held-out synthetic needle videos.

Three tasks (`--task`):
- `needle` (default, the quick one): the multiple-choice needle task (mmkv.synthetic), 56 px
  videos of 256 frames, the bundled `mmkv-tiny`; described below.
- `long`: task v2 (mmkv.synthetic.long), 112 px videos of 256-2,048+ frames (8K+ visual
  tokens at 1,024), three open questions per video, protocols `encode`, `ask` and `multiturn`,
  paired 95% intervals; the bundled `mmkv-long` (mmkv/bench/long.py).
- `image`: the high-resolution AnyRes image task (mmkv.synthetic.hires), 252 px images in a
  thumbnail and 3x3 crops, for GlobalCom² against pooling, random keep and uniform per-crop
  retention at the same budget; the bundled `mmkv-hires` (mmkv/bench/image.py).

    mmkv bench quality --task long --frames 1024 --protocol encode --n 200 --recipes 'none;kivi:2' --json out.json

`--json FILE` writes a JSON list with one object per recipe: `recipe`, `protocol`, `task`,
`frames`, `n` (questions), `accuracy`, `delta` (points against the uncompressed row, on the same
questions), `ci_low` / `ci_high` (its paired 95% bootstrap interval over videos),
`visual_kept_fraction`, `kv_bytes_ratio` (stored bytes over the model's own uncompressed cache of
the same prompt, vision pruning included), `bits_per_element` (stored bits per element held),
`prefill_s`, `decode_s`, and `skipped` (why a recipe cannot run under the protocol, else null).

One run, one table: for the uncompressed model and every recipe below, the accuracy on the
same held-out videos, next to the visual tokens kept, the KV bytes stored (and bits per element),
and prefill / decode time, all measured on the same run.

    mmkv bench quality                          # bundled model, 256-frame held-out set
    mmkv bench quality --frames 512 --n 50      # generalisation to longer videos
    mmkv bench quality --recipes 'none;kivi:2'  # a subset (';' between recipes)

Adding a recipe to the table is one line in RECIPES.

KV presses and the answer. The answers are one letter, and the first generated token comes from
the prefill itself: a KV press that compresses after the whole prompt is prefilled (the papers'
setting, `compress_at="ask"`) cannot change it. So the table runs with `compress_at="encode"`:
query-agnostic KV presses (StreamingLLM, KIVI, Elastic Cache, LOOK-M before the question, the
eviction presses of docs/kv_agnostic.md) compress the video's cache before the question is
prefilled, and the question and the answer are computed over the compressed cache (kvpress's
protocol). A press that needs the question (VidKV's STP) still compresses after it, so on this
task its accuracy equals the uncompressed model's by construction; its bytes are real.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from ..recipe import PRESETS

# (recipe string, label). Add a line to put a method in the table.
RECIPES: list[tuple[str, str]] = [
    ("none", "uncompressed"),
    # presets
    ("fast", "preset: " + PRESETS["fast"]),
    ("balanced", "preset: " + PRESETS["balanced"]),
    ("extreme", "preset: " + PRESETS["extreme"]),
    # visual tokens: equal budgets, then each method's curve against the kept ratio
    ("pvc", "PVC training-free, default (<= 64 tokens/slot, novelty > 0.1)"),
    ("pvc:ratio=0.5", "PVC <= 50% of the video"),
    ("pvc:ratio=0.25", "PVC <= 25% of the video"),
    ("pvc:ratio=0.25,merge=false", "PVC <= 25% of the video, no merging"),
    ("pvc:ratio=0.125", "PVC <= 12.5% of the video"),
    ("evs:0.5", "EVS (vLLM) 50%"),
    ("evs:0.25", "EVS (vLLM) 25%"),
    ("evs:0.125", "EVS (vLLM) 12.5%"),
    ("pool", "2x2 spatial pooling (25%)"),
    ("random:0.5", "random keep 50%"),
    ("random:0.25", "random keep 25%"),
    ("random:0.125", "random keep 12.5%"),
    # prefill
    ("zipvl", "ZipVL v1: adaptive sparse prefill + 4/2-bit KV"),
    ("zipvl:kv=evict", "ZipVL v2: adaptive sparse prefill + eviction"),
    ("zipvl:kv=none", "ZipVL sparse prefill only"),
    ("zipvl:kv=none,ratio=0.4", "ZipVL fixed 40% ratio (ablation)"),
    ("zipvl:kv=none,ratio=0.1", "ZipVL fixed 10% ratio (ablation)"),
    # KV eviction / merging, against the entries kept
    ("streaming:recent=256", "StreamingLLM 4+256"),
    ("streaming:recent=64", "StreamingLLM 4+64"),
    ("lookm:hh_ratio=0.25,recent_ratio=0.25", "LOOK-M pivotal 25%+25%"),
    ("lookm", "LOOK-M pivotal 10%+10%"),
    ("lookm:hh_ratio=0.05,recent_ratio=0.05", "LOOK-M pivotal 5%+5%"),
    ("lookm:averaged", "LOOK-M averaged 10%+10%"),
    ("lookm:weighted", "LOOK-M weighted 10%+10%"),
    ("lookm:none", "LOOK-M 10%+10%, no merging"),
    ("elastic", "Elastic Cache 20% evicted"),
    ("elastic:0.5", "Elastic Cache 50% evicted"),
    ("elastic:0.8", "Elastic Cache 80% evicted"),
    # query-agnostic KV eviction before the question (50 / 75 / 90% of the prefix evicted)
    ("streaming:ratio=0.5", "StreamingLLM, 50% evicted"),
    ("streaming:ratio=0.75", "StreamingLLM, 75% evicted"),
    ("streaming:ratio=0.9", "StreamingLLM, 90% evicted"),
    ("elastic:0.75", "Elastic Cache, 75% evicted (paper: attention sum over all rows)"),
    ("elastic:0.9", "Elastic Cache, 90% evicted (paper: attention sum over all rows)"),
    ("elastic:0.5,score=observed", "Elastic Cache, 50% evicted, count-normalized observed attention"),
    ("elastic:0.75,score=observed", "Elastic Cache, 75% evicted, count-normalized observed attention"),
    ("elastic:0.9,score=observed", "Elastic Cache, 90% evicted, count-normalized observed attention"),
    ("lookm:ratio=0.5", "LOOK-M before the question, 50% evicted (observed attention: no text after the video)"),
    ("lookm:ratio=0.75", "LOOK-M before the question, 75% evicted (observed attention: no text after the video)"),
    ("lookm:ratio=0.9", "LOOK-M before the question, 90% evicted (observed attention: no text after the video)"),
    ("observed:0.5", "observed attention (H2O + ZipVL Eq. 7), 50% evicted"),
    ("observed:0.75", "observed attention (H2O + ZipVL Eq. 7), 75% evicted"),
    ("observed:0.9", "observed attention (H2O + ZipVL Eq. 7), 90% evicted"),
    ("observed:0.5,budget=layer", "observed attention, ZipVL mass-rule layer budgets, 50% evicted"),
    ("observed:0.75,budget=layer", "observed attention, ZipVL mass-rule layer budgets, 75% evicted"),
    ("observed:0.9,budget=layer", "observed attention, ZipVL mass-rule layer budgets, 90% evicted"),
    ("observed:0.5,budget=head", "observed attention, AdaKV head budgets, 50% evicted"),
    ("observed:0.75,budget=head", "observed attention, AdaKV head budgets, 75% evicted"),
    ("observed:0.9,budget=head", "observed attention, AdaKV head budgets, 90% evicted"),
    ("observed:0.5,share=1", "observed attention shared across layers, 50% evicted"),
    ("observed:0.75,share=1", "observed attention shared across layers, 75% evicted"),
    ("observed:0.9,share=1", "observed attention shared across layers, 90% evicted"),
    ("observed:0.5,share=1,probes=16", "observed attention shared across layers, 16+16 probe rows, 50% evicted"),
    ("observed:0.75,share=1,probes=16", "observed attention shared across layers, 16+16 probe rows, 75% evicted"),
    ("observed:0.9,share=1,probes=16", "observed attention shared across layers, 16+16 probe rows, 90% evicted"),
    ("snapkv:0.5", "SnapKV (last 32 prefix rows), 50% evicted"),
    ("snapkv:0.75", "SnapKV (last 32 prefix rows), 75% evicted"),
    ("snapkv:0.9", "SnapKV (last 32 prefix rows), 90% evicted"),
    ("snapkv:0.5,proxy=tail", "SnapKV over the chat template assistant header (proxy), 50% evicted"),
    ("snapkv:0.75,proxy=tail", "SnapKV over the chat template assistant header (proxy), 75% evicted"),
    ("snapkv:0.9,proxy=tail", "SnapKV over the chat template assistant header (proxy), 90% evicted"),
    ("adakv:0.5", "Ada-SnapKV (AdaKV head budgets), 50% evicted"),
    ("adakv:0.75", "Ada-SnapKV (AdaKV head budgets), 75% evicted"),
    ("adakv:0.9", "Ada-SnapKV (AdaKV head budgets), 90% evicted"),
    ("expected:0.5", "Expected Attention, 50% evicted"),
    ("expected:0.75", "Expected Attention, 75% evicted"),
    ("expected:0.9", "Expected Attention, 90% evicted"),
    ("expected:0.5,share=1", "Expected Attention shared across layers, 50% evicted"),
    ("expected:0.75,share=1", "Expected Attention shared across layers, 75% evicted"),
    ("expected:0.9,share=1", "Expected Attention shared across layers, 90% evicted"),
    ("observed:0.5,share=1,probes=16+kivi:2", "observed shared, 16+16 probes, 50% evicted + KIVI 2-bit"),
    ("observed:0.75,share=1,probes=16+kivi:2", "observed shared, 16+16 probes, 75% evicted + KIVI 2-bit"),
    ("observed:0.9,share=1,probes=16+kivi:2", "observed shared, 16+16 probes, 90% evicted + KIVI 2-bit"),
    ("observed:0.5,share=1,probes=16+kivi:2,residual=32", "observed shared, 16+16 probes, 50% evicted + KIVI 2-bit, 32-token window"),
    ("observed:0.75,share=1,probes=16+kivi:2,residual=32", "observed shared, 16+16 probes, 75% evicted + KIVI 2-bit, 32-token window"),
    ("observed:0.9,share=1,probes=16+kivi:2,residual=32", "observed shared, 16+16 probes, 90% evicted + KIVI 2-bit, 32-token window"),
    ("snapkv:0.75+kivi:2", "SnapKV 75% evicted + KIVI 2-bit"),
    # KV quantization, against the bits per element
    ("kivi:4", "KIVI 4-bit"),
    ("kivi:2", "KIVI 2-bit"),
    ("kivi:2,stats=8", "KIVI 2-bit, 8-bit key statistics"),
    ("vidkv", "VidKV 1.5/1.58 + STP 20%"),
    ("vidkv:stp=0", "VidKV 1.5/1.58, no STP"),
    ("vidkv:stp=0,stats=16", "VidKV 1.5/1.58, no STP, fp16 statistics (the paper's format)"),
    ("vidkv:stp=0,value_bits=2", "VidKV 1.5/2, no STP"),
    ("vidkv:value_bits=2", "VidKV 1.5/2"),
    ("vidkv:1.25", "VidKV 1.25/1.58 + STP 20%"),
    ("vidkv:group=64", "VidKV 1.5/1.58 + STP 20%, groups of 64"),
    ("vidkv:channels=head", "VidKV 1.5/1.58 + STP, per-head channels"),
    ("kivi:2,residual=32", "KIVI 2-bit, 32-token window"),
    ("vidkv:residual=32", "VidKV, 32-token window"),
    # compositions
    ("lookm+kivi:2", "LOOK-M + KIVI 2-bit"),
    ("elastic+kivi:2", "Elastic Cache + KIVI 2-bit"),
    ("lookm+vidkv", "LOOK-M + VidKV"),
    ("pvc:ratio=0.25+vidkv", "PVC 25% + VidKV"),
    ("pvc:ratio=0.25+vidkv:residual=32", "PVC 25% + VidKV, 32-token window"),
    ("pvc:ratio=0.25+kivi:2,residual=32", "PVC 25% + KIVI 2-bit, 32-token window"),
]

HELD_OUT_SEED = 1_000_000  # training uses seeds below this


def dataset(data_dir: str, n: int, frames: int, seed: int) -> list[dict]:
    """Held-out examples as mp4 + Video-MME rows (written once, then reused)."""
    from ..synthetic import write_dataset

    path = os.path.join(data_dir, "videomme.json")
    if os.path.exists(path):
        rows = json.load(open(path))
        if len(rows) >= n and rows[0]["num_frames"] == frames and rows[0]["seed"] == seed:
            return rows[:n]
    write_dataset(data_dir, n, frames, seed)
    return json.load(open(path))


def run(model: str, recipes: list[tuple[str, str]], rows: list[dict], data_dir: str, progress=True,
        compress_at: str = "encode") -> list[dict]:
    """The needle task: every recipe on the same held-out rows (one question per video)."""
    import mmkv
    from ..evaluation.answers import extract
    from ..evaluation.prompts import videomme_prompt

    out = []
    base = mmkv.load(model, compress_at=compress_at)  # loaded once; every recipe shares it
    for spec, label in recipes:
        pipe = base.with_recipe(spec)
        correct, kept, total_vis, kv, full, after, pre, dec, extra = 0, 0, 0, 0, 0, 0, 0.0, 0.0, {}
        dtype_bits = 0
        by_task: dict[str, list[int]] = {}
        outcomes: list[int] = []
        t0 = time.perf_counter()
        for i, row in enumerate(rows):
            video = os.path.join(data_dir, f"{row['videoID']}.mp4")
            res = pipe.generate(video, videomme_prompt(row["question"], row["options"]), frames=row["num_frames"],
                                max_new_tokens=4)
            ok = int(extract(res.text) == row["answer"])
            correct += ok
            outcomes.append(ok)
            by_task.setdefault(row["task_type"], []).append(ok)
            s = res.stats
            kept += s.visual_tokens_kept
            total_vis += s.visual_tokens_in
            kv += s.kv_bytes
            full += s.kv_bytes_uncompressed    # the model's own cache of the prompt before vision presses
            after += s.kv_bytes_after_vision   # ... of the prompt the LLM reads
            dtype_bits = s.kv_dtype_bits
            pre += s.prefill_s
            dec += s.decode_s
            for k, v in s.extra.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    extra[k] = extra.get(k, 0) + v / len(rows)
                elif isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
                    acc = extra.setdefault(k, [0.0] * len(v))   # per-layer lists: the mean per layer
                    if isinstance(acc, list) and len(acc) == len(v):
                        extra[k] = [a + x / len(rows) for a, x in zip(acc, v)]
            if progress:
                print(f"\r  {label}: {i + 1}/{len(rows)} acc {100 * correct / (i + 1):.1f}%", end="", flush=True)
        if progress:
            print(f"  ({time.perf_counter() - t0:.0f} s)")
        out.append({"recipe": spec, "label": label, "n": len(rows), "accuracy": correct / len(rows),
                    "by_task": {k: sum(v) / len(v) for k, v in by_task.items()},
                    "visual_kept": kept / max(total_vis, 1), "kv_ratio": kv / max(full, 1),
                    "bits_per_element": dtype_bits * kv / max(after, 1), "prefill_s": pre / len(rows),
                    "decode_s": dec / len(rows), "extra": extra, "outcomes": outcomes})
    return out


def contract(results: list[dict], rows: list[dict], frames: int, protocol: str) -> list[dict]:
    """The needle results as `--json` objects (the same keys as the long task)."""
    from .stats import interval, paired_interval

    vids = [r["videoID"] for r in rows]
    base = next((r for r in results if r["recipe"] == "none"), None)
    b = {v: [o] for v, o in zip(vids, base["outcomes"])} if base else None
    out = []
    for r in results:
        o = {v: [x] for v, x in zip(vids, r["outcomes"])}
        acc, lo_a, hi_a = interval(o)
        d, lo, hi = paired_interval(o, b) if b else (None, None, None)
        out.append({"recipe": r["recipe"], "label": r["label"], "protocol": protocol, "task": "needle",
                    "frames": frames, "n": r["n"], "videos": r["n"], "accuracy": r["accuracy"],
                    "accuracy_ci": [lo_a / 100, hi_a / 100], "delta": d, "ci_low": lo, "ci_high": hi,
                    "visual_kept_fraction": r["visual_kept"], "kv_bytes_ratio": r["kv_ratio"],
                    "bits_per_element": r["bits_per_element"], "prefill_s": r["prefill_s"],
                    "decode_s": r["decode_s"], "skipped": None, "by_kind": r["by_task"], "extra": r["extra"]})
    return out


def table(results: list[dict]) -> str:
    """The results as a markdown table; Δ is taken against the `none` row. KV bytes: stored over the
    model's own uncompressed cache of the same prompt (vision pruning included); bits/elem: per
    element of the prompt the LLM reads (Stats.bits_per_element)."""
    none = next((r for r in results if r["recipe"] == "none"), None)
    lines = ["| recipe | accuracy | Δ vs none (pts) | color / shape / order / count | visual tokens kept | "
             "KV bytes of uncompressed | bits/elem | prefill ms | decode ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        delta = f"{100 * (r['accuracy'] - none['accuracy']):+.1f}" if none else "n/a"
        kv = f"{100 * r['kv_ratio']:.1f}%"
        tasks = " / ".join(f"{100 * r['by_task'][t]:.0f}" for t in ("color", "shape", "order", "count")
                           if t in r["by_task"])
        label = f"`{r['recipe']}`" + (f" ({r['label']})" if r["label"] != r["recipe"] else "")
        lines.append(f"| {label} | {100 * r['accuracy']:.1f}% | {delta} | {tasks} | {100 * r['visual_kept']:.1f}% | "
                     f"{kv} | {r['bits_per_element']:.2f} | {1000 * r['prefill_s']:.1f} | {1000 * r['decode_s']:.1f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="needle", choices=["needle", "long", "image"],
                   help="needle: the quick multiple-choice task (default); long: task v2, three open questions "
                        "per video, 8K+ visual tokens at 1,024 frames")
    p.add_argument("--model", default=None, help="default: mmkv-tiny (needle), mmkv-long (long)")
    p.add_argument("--frames", type=int, default=None, help="frames per held-out video (default 256; long: 1024)")
    p.add_argument("--n", type=int, default=None, help="held-out videos (default 100; long: 200, 600 questions)")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="first held-out seed (any seed works)")
    p.add_argument("--recipes", default=None,
                   help="recipes separated by ';' (default: the built-in list), e.g. 'none;kivi:2;lookm+vidkv'")
    p.add_argument("--data-dir", default=None, help="where the held-out mp4s are cached")
    p.add_argument("--json", default=None, help="write the results here: a JSON list, one object per recipe")
    p.add_argument("--protocol", default=None, choices=["encode", "ask", "multiturn"],
                   help="encode: compress before any question; ask: compress after each question's prefill; "
                        "multiturn (long task): one conversation, compressed after question 1. Default: encode")
    p.add_argument("--compress-at", default=None, choices=["encode", "ask"], help=argparse.SUPPRESS)
    p.add_argument("--time-limit", type=float, default=0, help="long task: stop after this many minutes "
                   "(resume later with the same command)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="long task: the model's dtype (auto: the checkpoint's on GPU, float32 on CPU); the bytes "
                        "are against that dtype's own uncompressed cache, and records resume per dtype")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show per-recipe progress (--no-progress for logs)")


def check_before_data(model: str, recipes: list[tuple[str, str]]) -> None:
    """Before any held-out data is written or model loaded: a bundled model that is missing, a
    recipe that does not parse (raises ModelError / InputError)."""
    from ..models.loading import resolve_model
    from ..recipe import Recipe

    resolve_model(model)
    for spec, _ in recipes:
        Recipe.parse(spec)


def main(args) -> int:
    from ..errors import InputError
    from ..models.loading import CACHE_DIR

    protocol = args.protocol or args.compress_at or "encode"
    if args.task == "needle" and protocol == "multiturn":
        raise InputError("the needle task has one question per video; multiturn is for --task long")
    if args.task == "long":
        return _main_long(args, protocol)
    if args.task == "image":
        from .image import main as _main_image
        return _main_image(args, protocol)
    frames, n, model = args.frames or 256, args.n or 100, args.model or "mmkv-tiny"
    recipes = RECIPES if not args.recipes else [(r.strip(), r.strip()) for r in args.recipes.split(";") if r.strip()]
    check_before_data(model, recipes)
    data_dir = args.data_dir or os.path.join(CACHE_DIR, f"needle_heldout_{frames}_{args.seed}")
    rows = dataset(data_dir, n, frames, args.seed)
    print(f"model {model}; {len(rows)} held-out videos of {frames} frames (seed {args.seed}); data {data_dir}")
    results = run(model, recipes, rows, data_dir, progress=args.progress, compress_at=protocol)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(contract(results, rows, frames, protocol), f, indent=1)
    return 0


def _main_long(args, protocol: str) -> int:
    from ..models.loading import CACHE_DIR
    from . import long

    frames, n, model = args.frames or 1024, args.n or 200, args.model or long.DEFAULT_MODEL
    recipes = long.RECIPES if not args.recipes else [(r.strip(), r.strip()) for r in args.recipes.split(";")
                                                      if r.strip()]
    check_before_data(model, recipes)
    data_dir = args.data_dir or os.path.join(CACHE_DIR, f"long_heldout_{frames}_{args.seed}")
    videos = long.dataset(data_dir, n, frames, args.seed)
    records = (args.json + ".records.jsonl") if args.json else os.path.join(data_dir, f"records_{protocol}.jsonl")
    print(f"model {model}; {len(videos)} held-out videos of {frames} frames, {3 * len(videos)} questions "
          f"(seed {args.seed}); protocol {protocol}; dtype {args.dtype}; data {data_dir}; "
          f"records {records}")
    t0 = time.perf_counter()
    results = long.run(model, recipes, videos, data_dir, protocol, frames, records, progress=args.progress,
                       limit_s=60 * args.time_limit, dtype=args.dtype)
    print(long.table(results))
    print(f"wall time {time.perf_counter() - t0:.0f} s (this invocation)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
