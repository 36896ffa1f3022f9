"""`mmkv bench quality --task image`: accuracy against visual-token compression on the
high-resolution image task (mmkv.synthetic.hires), three open questions per image, paired 95%
intervals over images.

A 252 px image is a thumbnail plus 3 x 3 AnyRes crops for the bundled `mmkv-hires`
(LLaVA-OneVision, 84 px views: 36 thumbnail + 324 crop tokens + 18 newlines). The needle is one
crop token. The table compares, at the same budget of visual tokens:
- GlobalCom² (`globalcom2`, thumbnail-guided per-crop budgets, arXiv 2501.05179);
- uniform per-crop retention (`globalcom2:allocation=uniform`: GlobalCom²'s own token scores, the
  same fraction kept in every crop), which isolates the thumbnail-guided allocation;
- spatial pooling (`pool:images=true`: 2 x 2 blocks for 25%, 3 x 3 for 1/9), every view;
- random keep (`random:...,images=true`), the floor an informed press must beat.
Budgets: 25% and 1/9 (the fractions pooling can give on a 6 x 6 view). Pooling, random keep and
the uniform allocation keep exactly the same number of tokens; GlobalCom² keeps at most that many
(each crop rounds its budget down); `visual_kept_fraction` says how many each row kept.

Protocols, records, resuming and statistics are those of the long task (mmkv.bench.long): each
image's three questions are asked over one encoding (`encode`, the default), after each question's
prefill (`ask`), or as one conversation (`multiturn`); answers are greedy and scored by exact
match; a recipe's difference from the uncompressed model uses a paired bootstrap over images. The
JSON objects carry the same keys as the long task's, with `task: "image"` and `frames: 1`, plus
`needle_kept` (the fraction of images whose needle token is kept unmerged) and, for GlobalCom²,
`needle_crop_ratio` (the mean fraction kept in the needle's crop).
"""
from __future__ import annotations

import json
import os
import time

from .long import PROTOCOLS, _record, skip_reason, summarize

RECIPES: list[tuple[str, str]] = [
    ("none", "uncompressed"),
    ("globalcom2:0.25", "GlobalCom² 25%"),
    ("globalcom2:0.25,allocation=uniform", "uniform per-crop 25% (GlobalCom² scores)"),
    ("pool:images=true", "2x2 pooling (25%)"),
    ("random:0.25,images=true", "random keep 25%"),
    ("globalcom2:0.1112", "GlobalCom² 1/9"),
    ("globalcom2:0.1112,allocation=uniform", "uniform per-crop 1/9 (GlobalCom² scores)"),
    ("pool:size=3,images=true", "3x3 pooling (1/9)"),
    ("random:0.1112,images=true", "random keep 1/9"),
]
HELD_OUT_SEED = 1_000_000
MAX_NEW_TOKENS = 8
DEFAULT_MODEL = "mmkv-hires"


def dataset(data_dir: str, n: int, seed: int) -> list[list[dict]]:
    """Held-out images (PNG + three question rows each), written once and reused."""
    from ..synthetic.hires import write_hires_dataset

    path = os.path.join(data_dir, "questions.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    want = [f"hires_{seed + i}" for i in range(n)]
    if not set(want) <= {r["imageID"] for r in rows}:
        write_hires_dataset(data_dir, n, seed)
        rows = json.load(open(path))
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["imageID"], []).append(r)
    return [sorted(by_image[i], key=lambda r: r["turn"]) for i in want]


def needle_cell(rows: list[dict]) -> tuple[int, int]:
    """(row, column) of the needle's token in the full-resolution grid of crop tokens."""
    from ..synthetic.hires import CELL

    (n,) = [it for it in rows[0]["items"] if it["role"] == "needle"]
    return n["y"] // CELL, n["x"] // CELL


def run_image(pipe, rows: list[dict], media, protocol: str) -> dict:
    """The three questions of one image under `protocol`; returns the image's record."""
    t0 = time.perf_counter()
    enc = pipe.encode(media)
    prefix_prefill = enc.stats.prefill_s
    if protocol == "multiturn":
        conv = pipe.chat(enc)
        out = [_record(r, conv.ask(r["question"], max_new_tokens=MAX_NEW_TOKENS), pipe.adapter) for r in rows]
    else:
        out = [_record(r, pipe.ask(enc, r["question"], max_new_tokens=MAX_NEW_TOKENS), pipe.adapter) for r in rows]
    for i, r in enumerate(out):   # a first turn's stats include the prefix prefill: count it once per image
        if protocol != "multiturn" or i == 0:
            r["prefill_s"] -= prefix_prefill
    vis = enc.visual
    h, w = needle_cell(rows)
    kept = vis.is_patch & (vis.coords[:, 0] == 1) & (vis.coords[:, 1] == h) & (vis.coords[:, 2] == w) & \
        (vis.weight == 1)
    ratios = enc.stats.extra.get("globalcom2_crop_ratios") or None
    nph, npw = vis.meta.get("crop_grid", (0, 0))
    side = vis.meta.get("base_grid", (1, 1))[0]
    crop_ratio = ratios[min(h // side, nph - 1) * npw + min(w // side, npw - 1)] if ratios else None
    return {"imageID": rows[0]["imageID"], "questions": out, "encode_s": enc.stats.encode_s,
            "prefix_prefill_s": prefix_prefill, "wall_s": time.perf_counter() - t0,
            "needle_kept": int(bool(kept.any())), "needle_crop_ratio": crop_ratio}


def run(model: str, recipes: list[tuple[str, str]], images: list[list[dict]], data_dir: str, protocol: str,
        records: str, progress: bool = True, limit_s: float = 0) -> list[dict]:
    """Every recipe on every image (images outer, so a cut-short run covers every recipe), resuming
    from `records` (JSON lines) as the long task does: of the same model and checkpoint
    (`long.model_ident`), by the recipe each name resolves to (a preset's records resume only while
    it means the same) and only while that recipe's parameters, defaults included, read the same.
    Returns the summaries in the order of `recipes`."""
    import mmkv
    from ..io import load_media
    from .long import load_records, model_ident

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    base = mmkv.load(model, compress_at="encode" if protocol == "encode" else "ask")
    ident = model_ident(base.adapter)
    pipes = {spec: base.with_recipe(spec) for spec, _ in recipes}
    resolved = {spec: p.recipe.spec() for spec, p in pipes.items()}
    done = load_records(records, "imageID", protocol=protocol, model=model, task="image", model_ident=ident)
    skipped = {spec: skip_reason(p, protocol) for spec, p in pipes.items()}
    t0 = time.perf_counter()
    with open(records, "a") as log:
        for i, rows in enumerate(images):
            iid = rows[0]["imageID"]
            todo = [s for s, _ in recipes if not skipped[s] and (resolved[s], iid) not in done]
            if not todo:
                continue
            if limit_s and time.perf_counter() - t0 > limit_s:
                print(f"\ntime limit: stopped before image {i + 1}/{len(images)}", flush=True)
                break
            media = load_media(os.path.join(data_dir, f"{iid}.png"))
            for spec in todo:
                if (resolved[spec], iid) in done:                    # another name for a recipe just run
                    continue
                rec = run_image(pipes[spec], rows, media, protocol)
                rec.update(recipe=spec, spec=resolved[spec], params=pipes[spec].recipe.spec(full=True),
                           protocol=protocol, task="image", model=model, model_ident=ident)
                done[(resolved[spec], iid)] = rec
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if progress:
                print(f"\r  image {i + 1}/{len(images)} ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    if progress:
        print(flush=True)
    ids = [rows[0]["imageID"] for rows in images]
    per = {s: [_as_video(done[(resolved[s], i)]) for i in ids if (resolved[s], i) in done] for s, _ in recipes}
    base_spec = next((s for s, _ in recipes if pipes[s].recipe.empty), None)
    out = []
    for s, label in recipes:
        r = summarize(s, label, per[s], per.get(base_spec) if base_spec else None, protocol, 1, skipped[s])
        r.update(task="image", images=r.pop("videos"))
        if "paired_videos" in r:
            r["paired_images"] = r.pop("paired_videos")
        r["spec"] = resolved[s]
        recs = [done[(resolved[s], i)] for i in ids if (resolved[s], i) in done]
        r["needle_kept"] = sum(x["needle_kept"] for x in recs) / len(recs) if recs else None
        cr = [x["needle_crop_ratio"] for x in recs if x.get("needle_crop_ratio") is not None]
        r["needle_crop_ratio"] = sum(cr) / len(cr) if cr else None
        out.append(r)
    return out


def _as_video(rec: dict) -> dict:
    """An image record in the shape mmkv.bench.long.summarize reads (keyed by videoID)."""
    return dict(rec, videoID=rec["imageID"])


def table(results: list[dict]) -> str:
    """Markdown: accuracy, Δ with its paired 95% interval, per kind, tokens kept, needle kept, times."""
    lines = ["| recipe | protocol | n | accuracy | Δ vs uncompressed [95% CI] (pts) | locate / describe / count | "
             "visual kept | needle token kept | KV bytes vs uncompressed | prefill s | decode ms/q |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        label = f"`{r['recipe']}`" + (f" ({r['label']})" if r.get("label") and r["label"] != r["recipe"] else "")
        if r["skipped"]:
            lines.append(f"| {label} | {r['protocol']} | - | skipped: {r['skipped']} | | | | | | | |")
            continue
        if not r["n"]:
            lines.append(f"| {label} | {r['protocol']} | 0 | | | | | | | | |")
            continue
        k = r.get("by_kind", {})
        kinds = " / ".join(f"{100 * k[x]:.0f}" for x in ("locate", "describe", "count") if x in k)
        delta = "" if r["delta"] is None else f"{r['delta']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"
        lines.append(f"| {label} | {r['protocol']} | {r['n']} | {100 * r['accuracy']:.1f}% | {delta} | {kinds} | "
                     f"{100 * r['visual_kept_fraction']:.1f}% | {100 * r['needle_kept']:.0f}% | "
                     f"{100 * r['kv_bytes_ratio']:.1f}% | {r['prefill_s']:.3f} | {1000 * r['decode_s']:.0f} |")
    return "\n".join(lines)


def main(args, protocol: str) -> int:
    """The `--task image` branch of `mmkv bench quality` (arguments as parsed there)."""
    from ..errors import InputError
    from ..models.loading import CACHE_DIR
    from ..synthetic.hires import VERSION

    if args.frames not in (None, 1):
        raise InputError("--frames is for videos; the image task has one image per question set (leave it out)")
    n, model = args.n or 100, args.model or DEFAULT_MODEL
    recipes = RECIPES if not args.recipes else [(r.strip(), r.strip()) for r in args.recipes.split(";") if r.strip()]
    from .quality import check_before_data
    check_before_data(model, recipes)
    data_dir = args.data_dir or os.path.join(CACHE_DIR, f"hires_v{VERSION}_heldout_{args.seed}")
    images = dataset(data_dir, n, args.seed)
    records = (args.json + ".records.jsonl") if args.json else os.path.join(data_dir, f"records_{protocol}.jsonl")
    print(f"model {model}; {len(images)} held-out images, {3 * len(images)} questions (seed {args.seed}); "
          f"protocol {protocol}; data {data_dir}; records {records}")
    t0 = time.perf_counter()
    results = run(model, recipes, images, data_dir, protocol, records, progress=args.progress,
                  limit_s=60 * args.time_limit)
    print(table(results))
    print(f"wall time {time.perf_counter() - t0:.0f} s (this invocation)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
