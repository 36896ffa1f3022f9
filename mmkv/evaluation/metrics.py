"""Metrics over the per-sample records: accuracy overall and per group, errors, efficiency.

Accuracies are percentages, as lmms-eval reports them. Samples that failed (bad data, runtime
error) are not scored: `accuracy` is over the answered samples, `accuracy_errors_as_wrong`
counts failures as wrong answers, and `errors` lists them by reason.

Video-MME: `accuracy` over all answered questions, per duration / domain / sub_category /
task_type, and `stderr_clustered`, the standard error clustered by video (Miller 2024,
arXiv 2411.00640, eq. 4; what lmms-eval computes with `cluster_key: videoID`).
MVBench: per task, `accuracy` counts only non-empty responses (lmms-eval's denominator) and
`accuracy_all` counts every answered sample; the headline `accuracy` is the mean over tasks.
Efficiency: means per answered sample of visual tokens in/kept, LLM prompt tokens, KV bytes
stored and the model's own uncompressed cache of the prompt, prefill and decode seconds; per video, the encode seconds;
the largest peak memory.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict

ORDER = {"duration": ["short", "medium", "long"]}


def _pct(num: float, den: float) -> float | None:
    return 100.0 * num / den if den else None


def clustered_stderr(scores: list[float], clusters: list) -> float:
    """Standard error of the mean of `scores` with samples correlated within `clusters`:
    sqrt(var/n + (1/n^2) sum_c sum_{i != j in c} d_i d_j), d = score - mean (NaN if n < 2)."""
    n = len(scores)
    if n < 2:
        return float("nan")
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    by: dict = defaultdict(list)
    for s, c in zip(scores, clusters):
        by[c].append(s - mean)
    cross = sum(sum(d) ** 2 - sum(x * x for x in d) for d in by.values())
    return math.sqrt(max(0.0, var / n + cross / (n * n)))


def _ordered(key: str, values) -> list:
    pref = ORDER.get(key, [])
    return [v for v in pref if v in values] + sorted(v for v in values if v not in pref)


def _efficiency(ok: list[dict]) -> dict:
    def mean(field):
        vals = [r["stats"][field] for r in ok if isinstance(r.get("stats", {}).get(field), (int, float))]
        return sum(vals) / len(vals) if vals else None

    enc = [r["stats"]["encode_s"] for r in ok if not r.get("shared_encode") and
           isinstance(r.get("stats", {}).get("encode_s"), (int, float))]
    peaks = [r["stats"]["peak_memory_bytes"] for r in ok if r.get("stats", {}).get("peak_memory_bytes")]
    kinds = {r["stats"].get("peak_memory_kind") for r in ok if r.get("stats")}
    out = {f"{k}_mean": mean(k) for k in ("frames", "visual_tokens_in", "visual_tokens_kept", "prompt_tokens",
                                          "kv_bytes", "kv_bytes_uncompressed", "prefill_s", "decode_s", "new_tokens")}
    out["encode_s_per_video_mean"] = sum(enc) / len(enc) if enc else None
    out["peak_memory_bytes_max"] = max(peaks) if peaks else None
    out["peak_memory_kind"] = ", ".join(sorted(k for k in kinds if k)) or None
    kv, full = out["kv_bytes_mean"], out["kv_bytes_uncompressed_mean"]
    out["kv_ratio"] = kv / full if kv is not None and full else None
    vin, vkept = out["visual_tokens_in_mean"], out["visual_tokens_kept_mean"]
    out["visual_kept_ratio"] = vkept / vin if vin else None
    return out


def summarize(records: list[dict], config: dict, expected: int | None = None) -> dict:
    """The summary of a run from its records (one per sample) and its run.json settings."""
    task = config.get("task", "")
    ok = [r for r in records if r.get("status") == "ok"]
    err = [r for r in records if r.get("status") != "ok"]
    correct = sum(int(r["correct"]) for r in ok)
    n_expected = len(records) if expected is None else expected
    s = {"task": task, "model": config.get("model"), "recipe": config.get("recipe"),
         "convention": config.get("convention"), "convention_note": config.get("convention_note"),
         "settings": {k: v for k, v in config.items() if k not in ("task", "model", "recipe", "convention",
                                                                   "convention_note")},
         "n": n_expected, "records": len(records), "missing": max(0, n_expected - len(records)),
         "complete": len(records) >= n_expected, "answered": len(ok), "correct": correct,
         "errors": {"count": len(err), "by_reason": dict(Counter(str(r.get("reason")) for r in err)),
                    "by_kind": dict(Counter(str(r.get("error_kind")) for r in err))}}
    s["accuracy_errors_as_wrong"] = _pct(correct, len(ok) + len(err) + s["missing"])
    if task == "mvbench":
        per = {}
        for t in config.get("tasks") or sorted({r["group"].get("task") for r in records}):
            rs = [r for r in ok if r["group"].get("task") == t]
            nonempty = [r for r in rs if r.get("response")]
            c = sum(int(r["correct"]) for r in nonempty)
            per[t] = {"n": len(rs), "answered_nonempty": len(nonempty), "correct": c,
                      "accuracy": _pct(c, len(nonempty)), "accuracy_all": _pct(sum(int(r["correct"]) for r in rs),
                                                                              len(rs)),
                      "errors": sum(1 for r in err if r["group"].get("task") == t)}
        accs = [v["accuracy"] for v in per.values() if v["accuracy"] is not None]
        nonempty_all = [r for r in ok if r.get("response")]
        s["accuracy"] = sum(accs) / len(accs) if accs else None
        s["accuracy_note"] = (f"mean of {len(accs)} per-task accuracies" +
                              ("" if len(accs) == 20 else " (not all 20 MVBench tasks)"))
        s["accuracy_micro"] = _pct(sum(int(r["correct"]) for r in nonempty_all), len(nonempty_all))
        s["accuracy_all"] = _pct(correct, len(ok))
        s["groups"] = {"task": per}
    else:
        s["accuracy"] = _pct(correct, len(ok))
        se = clustered_stderr([float(r["correct"]) for r in ok], [r.get("video_id") or r["key"] for r in ok])
        s["stderr_clustered"] = None if math.isnan(se) else 100.0 * se
        groups = {}
        for key in ("duration", "domain", "sub_category", "task_type"):
            vals = {r["group"].get(key, "") for r in records}
            groups[key] = {}
            for v in _ordered(key, vals):
                rs = [r for r in ok if r["group"].get(key, "") == v]
                c = sum(int(r["correct"]) for r in rs)
                groups[key][v] = {"n": len(rs), "correct": c, "accuracy": _pct(c, len(rs)),
                                  "errors": sum(1 for r in err if r["group"].get(key, "") == v)}
        s["groups"] = groups
    s["efficiency"] = _efficiency(ok)
    return s


# ----------------------------------------------------------------------------- printing
def fmt_pct(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_bytes(v) -> str:
    if v is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} B"


def fmt_num(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:.0f}"


def format_table(s: dict) -> str:
    """The summary as markdown tables: headline, groups, errors, efficiency."""
    head = f"{s['task']}  model={s['model']}  recipe={s['recipe']}"
    if s.get("convention_note"):
        head += f"\nconvention: {s['convention_note']}"
    lines = [head, ""]
    acc = f"{fmt_pct(s['accuracy'])}%"
    if s.get("stderr_clustered") is not None:
        acc += f" ± {s['stderr_clustered']:.1f}"
    lines += ["| metric | value |", "|---|---|", f"| accuracy | {acc} |"]
    if s["task"] == "mvbench":
        lines.append(f"| accuracy over all questions (micro) | {fmt_pct(s.get('accuracy_micro'))}% |")
    lines += [f"| accuracy, errors counted wrong | {fmt_pct(s['accuracy_errors_as_wrong'])}% |",
              f"| answered / planned | {s['answered']} / {s['n']}" + ("" if s["complete"] else
                                                                       f" (INCOMPLETE: {s['missing']} missing)") + " |",
              f"| errors | {s['errors']['count']}" + (" (" + ", ".join(f"{k}: {v}" for k, v in
                                                                   s['errors']['by_reason'].items()) + ")"
                                                      if s['errors']['count'] else "") + " |"]
    for key, vals in s["groups"].items():
        if not vals or set(vals) == {""}:  # the rows have no such field
            continue
        lines += ["", f"| {key} | n | accuracy | errors |", "|---|---|---|---|"]
        for v, d in vals.items():
            lines.append(f"| {v or '(none)'} | {d['n']} | {fmt_pct(d['accuracy'])} | {d['errors']} |")
    e = s["efficiency"]
    lines += ["", "| efficiency (mean per answered sample) | value |", "|---|---|",
              f"| frames | {fmt_num(e['frames_mean'], 1)} |",
              f"| visual tokens in -> kept | {fmt_num(e['visual_tokens_in_mean'], 1)} -> "
              f"{fmt_num(e['visual_tokens_kept_mean'], 1)} |",
              f"| LLM prompt tokens | {fmt_num(e['prompt_tokens_mean'], 1)} |",
              f"| KV bytes (stored / uncompressed) | {fmt_bytes(e['kv_bytes_mean'])} / "
              f"{fmt_bytes(e['kv_bytes_uncompressed_mean'])}"
              + (f" ({100 * e['kv_ratio']:.1f}%)" if e["kv_ratio"] is not None else "") + " |",
              f"| encode s (per video) | {fmt_num(e['encode_s_per_video_mean'])} |",
              f"| prefill s | {fmt_num(e['prefill_s_mean'])} |",
              f"| decode s | {fmt_num(e['decode_s_mean'])} |",
              f"| peak memory ({e['peak_memory_kind'] or '-'}) | {fmt_bytes(e['peak_memory_bytes_max'])} |"]
    return "\n".join(lines)
