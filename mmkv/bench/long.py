"""`mmkv bench quality --task long`: accuracy against compression on task v2 (mmkv.synthetic.long),
three open questions per video, under one of three protocols, with paired 95% intervals.

Protocols (every result says which):
- `encode`: the video's cache is compressed before any question (`compress_at="encode"`); the
  three questions are then asked, one at a time, over that one compressed encoding ("encode
  once, ask many"). A recipe with a stage that needs the question (a query-aware press, VidKV's
  STP, a query-aware vision press or prefill policy) cannot run here: it is reported as skipped.
- `ask`: each question is prefilled after the video, then the cache is compressed (the papers'
  setting, `compress_at="ask"`); the multi-token answer is generated over the compressed cache.
- `multiturn`: one conversation (`Pipeline.chat`): question 1, its answer, question 2, ...; the
  cache compressed after question 1's prefill serves questions 2 and 3.

Every answer is generated greedily and scored by exact match. The first answer token of `ask`
comes from the uncompressed prefill, so there a press can only change the later tokens; under
`encode` and for questions 2 and 3 of `multiturn` it changes every token.

Statistics: each recipe's accuracy, and its difference from the uncompressed model on the same
questions with a paired bootstrap interval over videos (mmkv.bench.stats). Results are appended
per (video, recipe) to a JSON-lines file next to --json (or in the data folder), so an interrupted
run resumes where it stopped; the summary is rebuilt from that file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time

from .stats import interval, paired_interval

PROTOCOLS = ("encode", "ask", "multiturn")
# The headline table: uncompressed, the presets, and one setting of each method. (recipe, label)
RECIPES: list[tuple[str, str]] = [
    ("none", "uncompressed"),
    ("fast", "preset fast"),
    ("balanced", "preset balanced"),
    ("extreme", "preset extreme"),
    ("pvc:ratio=0.25", "PVC <= 25% of the video"),
    ("evs:0.25", "EVS 25%"),
    ("pool", "2x2 pooling (25%)"),
    ("random:0.25", "random keep 25%"),
    ("zipvl:kv=none", "ZipVL sparse prefill only"),
    ("streaming:recent=1024", "StreamingLLM 4+1024"),
    ("elastic:0.75", "Elastic Cache 75% evicted"),
    ("observed:0.75,share=1,probes=16,merge=mass", "observed attention 75% evicted (probe rows, one ranking, "
                                                   "evicted entries merged by mass)"),
    ("snapkv:0.75", "SnapKV 75% evicted"),
    ("observed:0.75,share=1,probes=16,merge=mass+kivi:2,salient=0.05",
     "observed attention 75% evicted + KIVI 2-bit, 5% salient entries exact"),
    ("bilevel", "Video-XL-2 bi-level KV (about 10% on the device)"),
    ("lookm", "LOOK-M 10%+10%"),
    ("kivi:2", "KIVI 2-bit"),
    ("kivi:2,salient=0.05", "KIVI 2-bit, 5% salient entries exact"),
    ("vidkv:stp=0", "VidKV 1.5/1.58"),
    ("vidkv", "VidKV 1.5/1.58 + STP"),
]
HELD_OUT_SEED = 1_000_000
MAX_NEW_TOKENS = 12
DEFAULT_MODEL = "mmkv-long"
FPS = 2.0


def dataset(data_dir: str, n: int, frames: int, seed: int) -> list[list[dict]]:
    """Held-out videos (mp4 + three question rows each), written once and reused."""
    from ..synthetic.long import write_long_dataset

    path = os.path.join(data_dir, "questions.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    have = {r["videoID"] for r in rows}
    want = [f"long_{frames}_{seed + i}" for i in range(n)]
    if not set(want) <= have or any(r["num_frames"] != frames for r in rows):
        write_long_dataset(data_dir, n, frames, seed)
        rows = json.load(open(path))
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["videoID"], []).append(r)
    return [sorted(by_video[v], key=lambda r: r["turn"]) for v in want]


def skip_reason(pipe, protocol: str) -> str | None:
    """Why a recipe cannot run under `protocol` (None if it can)."""
    if protocol != "encode":
        return None
    need = [p.name for p in pipe.kv_ask]
    if pipe.defer_prefill:
        need += [s.name for s in pipe.recipe.stages if getattr(s, "query_aware", False) and s.kind != "kv"]
    if need:
        return f"needs the question before it compresses: {', '.join(dict.fromkeys(need))}"
    return None


def _stored_elements(stats, adapter) -> int:
    return 2 * sum(stats.kv_len_per_layer) * adapter.num_kv_heads * adapter.head_dim


def _record(row, res, adapter) -> dict:
    s = res.stats
    return {"question_id": row["question_id"], "turn": row["turn"], "kind": row["task_type"],
            "answer": row["answer"], "output": res.text, "correct": int(res.text.strip() == row["answer"]),
            "visual_in": s.visual_tokens_in, "visual_kept": s.visual_tokens_kept,
            # device-resident bytes (bi-level: plus its relevance summaries); its offloaded level apart
            "kv_bytes": s.kv_bytes + s.extra.get("bilevel_summary_bytes", 0),
            "offloaded_bytes": s.extra.get("bilevel_offloaded_bytes", 0),
            "kv_bytes_uncompressed": s.kv_bytes_uncompressed,
            # the elements those bytes hold (bi-level: its summaries' too, so bits/element stays per element)
            "stored_elements": _stored_elements(s, adapter) + s.extra.get("bilevel_summary_elements", 0),
            "prefill_s": s.prefill_s, "decode_s": s.decode_s, "new_tokens": s.new_tokens}


def run_video(pipe, rows: list[dict], frames, protocol: str, visual_cache: dict | None = None) -> dict:
    """The three questions of one video under `protocol`; returns the video's record. The vision
    tower's output is shared through `visual_cache` by every recipe run on the video (its time is
    then reported once, by the first recipe)."""
    from ..io import load_media

    media = load_media(frames, video_fps=FPS)
    t0 = time.perf_counter()
    enc = pipe.encode(media, visual_cache=visual_cache)
    encode_s = enc.stats.encode_s
    prefix_prefill = enc.stats.prefill_s
    out = []
    if protocol == "multiturn":
        conv = pipe.chat(enc)
        for row in rows:
            out.append(_record(row, conv.ask(row["question"], max_new_tokens=MAX_NEW_TOKENS), pipe.adapter))
    else:
        for row in rows:
            out.append(_record(row, pipe.ask(enc, row["question"], max_new_tokens=MAX_NEW_TOKENS), pipe.adapter))
    for i, r in enumerate(out):  # a first turn's stats include the prefix prefill: count it once per video
        if protocol != "multiturn" or i == 0:
            r["prefill_s"] -= prefix_prefill
    return {"videoID": rows[0]["videoID"], "questions": out, "encode_s": encode_s,
            "prefix_prefill_s": prefix_prefill, "wall_s": time.perf_counter() - t0}


def summarize(spec: str, label: str, videos: list[dict] | None, base: list[dict] | None, protocol: str,
              frames: int, skipped: str | None = None) -> dict:
    """One recipe's JSON object (the `mmkv bench quality --json` contract)."""
    out = {"recipe": spec, "label": label, "protocol": protocol, "task": "long", "frames": frames, "n": 0,
           "videos": 0, "accuracy": None, "delta": None, "ci_low": None, "ci_high": None,
           "visual_kept_fraction": None, "kv_bytes_ratio": None, "offloaded_bytes_ratio": None, "bits_per_element": None,
           "prefill_s": None, "decode_s": None, "skipped": skipped, "answers_equal": None, "gained": None,
           "lost": None, "prefill_speedup": None}
    if skipped or not videos:
        return out
    qs = [q for v in videos for q in v["questions"]]
    outcome = {v["videoID"]: [q["correct"] for q in v["questions"]] for v in videos}
    acc, acc_lo, acc_hi = interval(outcome)
    out.update(n=len(qs), videos=len(videos), accuracy=acc / 100, accuracy_ci=[acc_lo / 100, acc_hi / 100])
    if base:
        b = {v["videoID"]: [q["correct"] for q in v["questions"]] for v in base}
        d, lo, hi = paired_interval(outcome, b)
        out.update(delta=d, ci_low=lo, ci_high=hi, paired_videos=len(set(outcome) & set(b)))
        out.update(_against_base(videos, base))
    first = [v["questions"][0] for v in videos]   # bytes and prefill at the first answer (after compression)
    out["visual_kept_fraction"] = sum(q["visual_kept"] for q in first) / max(1, sum(q["visual_in"] for q in first))
    out["kv_bytes_ratio"] = sum(q["kv_bytes"] for q in first) / max(1, sum(q["kv_bytes_uncompressed"] for q in first))
    out["offloaded_bytes_ratio"] = sum(q.get("offloaded_bytes", 0) for q in first) / \
        max(1, sum(q["kv_bytes_uncompressed"] for q in first))
    out["bits_per_element"] = 8 * sum(q["kv_bytes"] for q in first) / max(1, sum(q["stored_elements"] for q in first))
    out["prefill_s"] = sum(_prefill(v) for v in videos) / len(videos)
    out["decode_s"] = sum(q["decode_s"] for q in qs) / len(qs)
    out["encode_s"] = sum(v["encode_s"] for v in videos) / len(videos)
    kinds: dict[str, list[int]] = {}
    for q in qs:
        kinds.setdefault(q["kind"], []).append(q["correct"])
        kinds.setdefault(f"turn{q['turn'] + 1}", []).append(q["correct"])
    out["by_kind"] = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
    return out


def _record_spec(r: dict) -> str | None:
    """The resolved recipe a record was computed with, or None when it cannot be reused. Records
    written before "spec" was stored count as their recipe string's reading today, except a
    preset's (its meaning may have changed since; "none" cannot). A record that stored every
    parameter ("params", defaults included) counts only while its recipe still reads the same:
    a default changed since, or a stage gone, makes it stale."""
    from ..recipe import PRESETS, Recipe, RecipeError

    if "spec" in r:
        spec = r["spec"]
    elif r["recipe"].strip().lower() in set(PRESETS) - {"none"}:
        return None
    else:
        try:
            spec = Recipe.parse(r["recipe"]).spec()
        except RecipeError:
            return None
    if "params" in r and _full_spec(spec) != r["params"]:
        return None
    return spec


def load_records(path: str, key: str, **match) -> dict[tuple[str, str], dict]:
    """The reusable records of the JSON-lines file `path` (none if it does not exist), by (resolved
    recipe, record[key]): those whose fields equal every `match` value (a record without "dtype"
    is from a float32 run) and whose recipe still reads the same (`_record_spec`). A later line
    replaces an earlier one. The long and the image task both resume through this."""
    done: dict[tuple[str, str], dict] = {}
    if not os.path.exists(path):
        return done
    for line in open(path):
        r = json.loads(line)
        if all(r.get(k, "float32" if k == "dtype" else None) == v for k, v in match.items()):
            spec = _record_spec(r)
            if spec is not None:
                done[(spec, r[key])] = r
    return done


@functools.lru_cache(maxsize=None)
def _full_spec(spec: str) -> str | None:
    """Every parameter `spec` reads as today (None: it no longer parses), once per recipe."""
    from ..recipe import Recipe, RecipeError

    try:
        return Recipe.parse(spec).spec(full=True)
    except RecipeError:
        return None


def _prefill(v: dict) -> float:
    """A video's prefill: the prefix prefill and the first question's (vision tower excluded)."""
    return v["prefix_prefill_s"] + v["questions"][0]["prefill_s"]


def _against_base(videos: list[dict], base: list[dict]) -> dict:
    """Per question against uncompressed on the same videos: answers equal, answers that became
    right or wrong; the median over videos of uncompressed's prefill time over this recipe's."""
    by = {v["videoID"]: v for v in base}
    pairs = [(by[v["videoID"]], v) for v in videos if v["videoID"] in by]
    qs = [(a, b) for va, vb in pairs for a, b in zip(va["questions"], vb["questions"])]
    return {"answers_equal": sum(a["output"] == b["output"] for a, b in qs),
            "gained": sum(b["correct"] > a["correct"] for a, b in qs),
            "lost": sum(b["correct"] < a["correct"] for a, b in qs),
            "prefill_speedup": statistics.median(_prefill(a) / max(_prefill(b), 1e-9) for a, b in pairs)}


def model_ident(adapter) -> str:
    """What a resumed record must have been computed with besides its model name: the checkpoint's
    files (names, sizes, modification times) and, for Qwen, the M-RoPE layout it is read in. A
    model retrained into the same folder, or read in another layout, starts afresh."""
    path = getattr(adapter, "path", None)
    files = []
    if path and os.path.isdir(path):
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            if e.is_file():
                st = e.stat()
                files.append((e.name, st.st_size, int(st.st_mtime)))
    return hashlib.sha1(json.dumps([files, getattr(adapter, "rope_layout", None)]).encode()).hexdigest()[:16]


def run(model: str, recipes: list[tuple[str, str]], videos: list[list[dict]], data_dir: str, protocol: str,
        frames: int, records: str, progress: bool = True, limit_s: float = 0, dtype: str = "auto") -> list[dict]:
    """Every recipe on every video (videos outer, so a cut-short run covers every recipe), resuming
    from `records` (JSON lines) of the same model, checkpoint and dtype (`dtype`: as mmkv.load's;
    a record without one is from a float32 run). Returns the summaries, the uncompressed row first
    if present."""
    import mmkv
    from ..io import load_media

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    base = mmkv.load(model, compress_at="encode" if protocol == "encode" else "ask", dtype=dtype)
    ident = model_ident(base.adapter)
    dt = str(base.adapter.dtype).replace("torch.", "")
    pipes = {spec: base.with_recipe(spec) for spec, _ in recipes}
    # what each recipe resolves to: records are reused by it, so a preset's records resume only while
    # the preset means the same, and a preset reuses those of the recipe it names
    resolved = {spec: p.recipe.spec() for spec, p in pipes.items()}
    done = load_records(records, "videoID", protocol=protocol, frames=frames, model=model, model_ident=ident,
                        dtype=dt)
    skipped = {spec: skip_reason(p, protocol) for spec, p in pipes.items()}
    t0 = time.perf_counter()
    with open(records, "a") as log:
        for i, rows in enumerate(videos):
            todo = [s for s, _ in recipes if not skipped[s] and (resolved[s], rows[0]["videoID"]) not in done]
            if not todo:
                continue
            if limit_s and time.perf_counter() - t0 > limit_s:
                print(f"\ntime limit: stopped before video {i + 1}/{len(videos)}", flush=True)
                break
            frames_arr = load_media(os.path.join(data_dir, f"{rows[0]['videoID']}.mp4"), frames=frames).frames()
            visual: dict = {}
            for spec in todo:
                if (resolved[spec], rows[0]["videoID"]) in done:     # another name for a recipe just run
                    continue
                rec = run_video(pipes[spec], rows, frames_arr, protocol, visual)
                rec.update(recipe=spec, spec=resolved[spec], params=pipes[spec].recipe.spec(full=True),
                           protocol=protocol, frames=frames, model=model, model_ident=ident, dtype=dt)
                done[(resolved[spec], rec["videoID"])] = rec
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if progress:
                print(f"\r  video {i + 1}/{len(videos)} ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    if progress:
        print(flush=True)
    vids = [rows[0]["videoID"] for rows in videos]
    per = {s: [done[(resolved[s], v)] for v in vids if (resolved[s], v) in done] for s, _ in recipes}
    base_spec = next((s for s, _ in recipes if pipes[s].recipe.empty), None)
    return [dict(summarize(s, label, per[s], per.get(base_spec) if base_spec else None, protocol, frames, skipped[s]),
                 spec=resolved[s]) for s, label in recipes]


def table(results: list[dict]) -> str:
    """Markdown: accuracy, Δ with its paired 95% interval, the answers equal to uncompressed's (and
    how many became right / wrong), per kind and per turn, bytes, times and the prefill speed-up."""
    lines = ["| recipe | protocol | n | accuracy | Δ vs uncompressed [95% CI] (pts) | answers equal (+right / -wrong) | "
             "order / count / identify | turn 1 / 2 / 3 | visual kept | KV bytes vs uncompressed | bits/elem stored | "
             "prefill s | prefill speed-up (median) | decode ms/q |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        label = f"`{r['recipe']}`" + (f" ({r['label']})" if r.get("label") and r["label"] != r["recipe"] else "")
        if r["skipped"]:
            lines.append(f"| {label} | {r['protocol']} | - | skipped: {r['skipped']} |" + " |" * 10)
            continue
        k = r.get("by_kind", {})
        kinds = " / ".join(f"{100 * k[x]:.0f}" for x in ("order", "count", "identify") if x in k)
        turns = " / ".join(f"{100 * k[x]:.0f}" for x in ("turn1", "turn2", "turn3") if x in k)
        delta = "" if r["delta"] is None else f"{r['delta']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"
        equal = "" if r.get("answers_equal") is None else f"{r['answers_equal']} (+{r['gained']} / -{r['lost']})"
        speed = "" if r.get("prefill_speedup") is None else f"{r['prefill_speedup']:.2f}x"
        lines.append(f"| {label} | {r['protocol']} | {r['n']} | {100 * r['accuracy']:.1f}% | {delta} | {equal} | "
                     f"{kinds} | {turns} | {100 * r['visual_kept_fraction']:.1f}% | {100 * r['kv_bytes_ratio']:.1f}% | "
                     f"{r['bits_per_element']:.2f} | {r['prefill_s']:.2f} | {speed} | {1000 * r['decode_s']:.0f} |")
    return "\n".join(lines)
