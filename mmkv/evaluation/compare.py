"""Two runs side by side (e.g. the uncompressed baseline against a recipe).

    mmkv eval compare runs/base runs/kivi2

Prints accuracy overall and per group for both runs with the difference, efficiency figures with
their ratio, and a paired count over the questions both runs answered (both right, only one right,
both wrong, same predicted letter), which shows how many answers a recipe actually changed.
"""
from __future__ import annotations

import json
import os

from ..errors import InputError
from .metrics import fmt_bytes, fmt_num, fmt_pct
from .runner import read_records


def load_run(path: str) -> tuple[dict, list[dict]]:
    """(summary, records) of an output folder (or of its summary.json)."""
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    sp = os.path.join(folder, "summary.json")
    if not os.path.exists(sp):
        raise InputError(f"{folder!r} has no summary.json (run `mmkv eval merge {folder}` if the run was sharded)")
    with open(sp, encoding="utf-8") as f:
        summary = json.load(f)
    return summary, read_records(os.path.join(folder, "samples.jsonl"))


def _delta(a, b) -> str:
    return "-" if a is None or b is None else f"{b - a:+.1f}"


def _ratio(a, b) -> str:
    return "-" if not a or b is None else f"{b / a:.2f}x"


def paired(ra: list[dict], rb: list[dict]) -> dict:
    """Counts over the keys both runs answered."""
    a = {r["key"]: r for r in ra if r.get("status") == "ok"}
    b = {r["key"]: r for r in rb if r.get("status") == "ok"}
    common = [k for k in a if k in b]
    out = {"common": len(common), "both_right": 0, "only_a": 0, "only_b": 0, "both_wrong": 0, "same_pred": 0}
    for k in common:
        ca, cb = bool(a[k]["correct"]), bool(b[k]["correct"])
        out["both_right" if ca and cb else "only_a" if ca else "only_b" if cb else "both_wrong"] += 1
        out["same_pred"] += int(a[k].get("pred") == b[k].get("pred"))
    return out


def compare(path_a: str, path_b: str, labels: tuple[str, str] | None = None) -> str:
    """A markdown report comparing run `path_a` (A) with run `path_b` (B)."""
    sa, ra = load_run(path_a)
    sb, rb = load_run(path_b)
    la, lb = labels or (f"A: {sa.get('recipe')}", f"B: {sb.get('recipe')}")
    notes = []
    if sa["task"] != sb["task"]:
        notes.append(f"WARNING: different tasks ({sa['task']} vs {sb['task']})")
    if sa.get("convention") != sb.get("convention"):
        notes.append(f"WARNING: different lmms-eval conventions ({sa.get('convention')} vs {sb.get('convention')})")
    if sa["n"] != sb["n"] or not (sa["complete"] and sb["complete"]):
        notes.append(f"note: planned samples {sa['n']} vs {sb['n']}; complete: {sa['complete']} vs {sb['complete']}")
    lines = [f"{sa['task']}: {la} ({path_a})  vs  {lb} ({path_b})", *notes, "",
             f"| | {la} | {lb} | B - A |", "|---|---|---|---|",
             f"| accuracy | {fmt_pct(sa['accuracy'])} | {fmt_pct(sb['accuracy'])} | "
             f"{_delta(sa['accuracy'], sb['accuracy'])} |",
             f"| answered / errors | {sa['answered']} / {sa['errors']['count']} | "
             f"{sb['answered']} / {sb['errors']['count']} | |"]
    for key in list(dict.fromkeys([*sa.get("groups", {}), *sb.get("groups", {})])):
        ga, gb = sa["groups"].get(key, {}), sb["groups"].get(key, {})
        vals = list(dict.fromkeys([*ga, *gb]))
        if set(vals) <= {""}:
            continue
        for v in vals:
            xa, xb = ga.get(v, {}).get("accuracy"), gb.get(v, {}).get("accuracy")
            lines.append(f"| {key}: {v} | {fmt_pct(xa)} | {fmt_pct(xb)} | {_delta(xa, xb)} |")
    ea, eb = sa["efficiency"], sb["efficiency"]
    lines += ["", f"| efficiency (mean per sample) | {la} | {lb} | B / A |", "|---|---|---|---|"]
    for name, field, fmt in (("visual tokens kept", "visual_tokens_kept_mean", lambda v: fmt_num(v, 1)),
                             ("LLM prompt tokens", "prompt_tokens_mean", lambda v: fmt_num(v, 1)),
                             ("KV bytes stored", "kv_bytes_mean", fmt_bytes),
                             ("encode s per video", "encode_s_per_video_mean", fmt_num),
                             ("prefill s", "prefill_s_mean", fmt_num),
                             ("decode s", "decode_s_mean", fmt_num),
                             ("peak memory", "peak_memory_bytes_max", fmt_bytes)):
        lines.append(f"| {name} | {fmt(ea.get(field))} | {fmt(eb.get(field))} | {_ratio(ea.get(field), eb.get(field))} |")
    p = paired(ra, rb)
    if p["common"]:
        lines += ["", f"paired over {p['common']} questions answered by both: both right {p['both_right']}, "
                      f"only A right {p['only_a']}, only B right {p['only_b']}, both wrong {p['both_wrong']}; "
                      f"same predicted answer {p['same_pred']} ({100 * p['same_pred'] / p['common']:.1f}%)"]
    return "\n".join(lines)
