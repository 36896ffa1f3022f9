"""The page's HTML: the stats cards (visual tokens, KV memory, per layer, time), the status box
and the full stats table. Every value shown is escaped."""
from __future__ import annotations

from .config import human_bytes


def _bar(name: str, frac: float, color: str, label: str) -> str:
    """One labelled horizontal bar, `frac` of the full width."""
    import html

    frac = 0.0 if not frac == frac else max(0.0, min(1.0, frac))
    return (f'<div class="mmkv-row"><span class="mmkv-name">{html.escape(name)}</span><div class="mmkv-track">'
            f'<div class="mmkv-fill" style="width:{100 * frac:.2f}%;background:{color}"></div></div>'
            f'<span class="mmkv-val">{html.escape(label)}</span></div>')


def _section(title: str, body: str, elem: str) -> str:
    import html

    return f'<div class="mmkv-card" id="{elem}"><div class="mmkv-title">{html.escape(title)}</div>{body}</div>'


CSS = """
.mmkv-card{font-family:ui-sans-serif,system-ui,sans-serif;font-size:13px;margin:4px 0 10px 0;min-width:0}
.mmkv-title{font-weight:600;margin-bottom:4px}
.mmkv-sub{color:#6b7280;font-size:12px;margin:6px 0 2px 0}
.mmkv-row{display:flex;flex-wrap:wrap;align-items:center;column-gap:8px;margin:2px 0}
.mmkv-name{flex:0 0 9.5em;max-width:100%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.mmkv-track{flex:1 1 60px;height:14px;background:rgba(128,128,128,.18);border-radius:3px;overflow:hidden;min-width:40px}
.mmkv-fill{height:100%}
.mmkv-val{flex:0 1 auto;min-width:0;white-space:nowrap;font-variant-numeric:tabular-nums}
.mmkv-cols{display:flex;align-items:flex-end;gap:1px;height:70px;border-bottom:1px solid rgba(128,128,128,.5)}
.mmkv-col{flex:1;background:#3b82f6;min-width:1px}
.mmkv-note{color:#6b7280;font-size:12px}
.mmkv-error{color:#b91c1c;background:#fef2f2;border:1px solid #fca5a5;border-radius:6px;padding:8px 10px;font-size:14px}
.mmkv-ok{color:#065f46;background:#ecfdf5;border:1px solid #6ee7b7;border-radius:6px;padding:8px 10px;font-size:14px}
.mmkv-tables{overflow-x:auto;font-size:13px}
.mmkv-table{border-collapse:collapse;margin:4px 0 12px 0;width:100%}
.mmkv-table th,.mmkv-table td{text-align:left;vertical-align:top;padding:3px 8px;
  border-bottom:1px solid rgba(128,128,128,.25)}
.mmkv-table th,.mmkv-table td:nth-child(-n+2){white-space:nowrap}
#mmkv-model-note{border-left:4px solid #f59e0b;padding:4px 10px;background:rgba(245,158,11,.08)}
"""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x == x else "n/a"


def tokens_html(stats, enc=None) -> str:
    """Visual tokens before/after each vision stage, and kept tokens per temporal slot (a frame,
    or a pair of frames for Qwen2-VL), with the same counts the status line gives."""
    from .thumbs import slot_words, slots_phrase

    rows = []
    for stage, before, after in stats.visual_tokens:
        frac = after / before if before else float("nan")
        rows.append(_bar(stage, frac, "#3b82f6", f"{before} → {after} ({_pct(frac)})"))
    body = "".join(rows) or '<div class="mmkv-note">no visual tokens</div>'
    if enc is not None and enc.visual.grid[0] > 1:
        import html

        vt = enc.visual
        one, _ = slot_words(enc)
        counts = vt.per_slot_counts().cpu().tolist()
        full = max(1, vt.grid[1] * vt.grid[2])
        cols = "".join(f'<div class="mmkv-col" title="{one} {t + 1}: {c}/{full} tokens kept" '
                       f'style="height:{100 * c / full:.1f}%"></div>' for t, c in enumerate(counts))
        body += (f'<div class="mmkv-note">kept tokens per {html.escape(one)} ({html.escape(slots_phrase(enc))})'
                 f'</div><div class="mmkv-cols">{cols}</div>')
    return _section("Visual tokens", body, "mmkv-tokens")


def uncompressed_bytes(stats) -> float:
    """The model's own uncompressed KV cache of this prompt (`Stats.kv_bytes_uncompressed`, the
    baseline `Stats.kv_ratio` is measured against); NaN when unknown."""
    return float(stats.kv_bytes_uncompressed) if stats.kv_bytes_uncompressed else float("nan")


def memory_html(stats) -> str:
    """KV cache bytes: the uncompressed cache against what this recipe stores, and by class."""
    kept, full = stats.kv_bytes, uncompressed_bytes(stats)
    known = full == full
    top = max(full if known else 0, kept, 1)
    rows = []
    if known:
        rows.append(_bar("uncompressed", full / top, "#9ca3af", human_bytes(full)))
    rows.append(_bar("stored", kept / top, "#10b981",
                     f"{human_bytes(kept)} ({_pct(stats.kv_ratio)} of uncompressed)" if known else human_bytes(kept)))
    colors = ["#f59e0b", "#8b5cf6", "#ef4444", "#0ea5e9", "#84cc16"]
    for i, (k, v) in enumerate(sorted((stats.kv_bytes_by_class or {}).items())):
        if len(stats.kv_bytes_by_class) > 1:
            rows.append(_bar(f"  {k}", v / top, colors[i % len(colors)], human_bytes(v)))
    if stats.kv_index_bytes:
        rows.append(f'<div class="mmkv-note">+ {human_bytes(stats.kv_index_bytes)} of position indices</div>')
    bits = stats.bits_per_element
    rows.append(f'<div class="mmkv-note">{f"{bits:.2f}" if bits == bits else "n/a"} bits stored per element of '
                f'the uncompressed cache; {stats.prompt_tokens} prompt tokens</div>')
    return _section("KV cache memory: uncompressed vs stored by this recipe", "".join(rows), "mmkv-memory")


def _per_layer_series(stats) -> list[tuple[str, list[float]]]:
    """Per-layer series as (label, values): KV entries kept as a share of the prompt, plus any
    per-layer list a method put in stats.extra (a list of numbers, one per layer)."""
    from .labels import label

    out = []
    lens = list(stats.kv_len_per_layer or [])
    n = len(lens)
    if n and stats.prompt_tokens:
        out.append(("KV entries kept, share of the prompt's tokens", [x / stats.prompt_tokens for x in lens]))
    for k, v in (stats.extra or {}).items():
        if isinstance(v, (list, tuple)) and n and len(v) == n and all(isinstance(x, (int, float)) for x in v):
            out.append((label(k), [float(x) for x in v]))
    return out


def _bilevel_chunks(stats) -> str:
    """Bi-level KV (Video-XL-2): which chunks, with their times, the last answer brought back
    dense (a strip over the video's time line; empty for other recipes)."""
    ex = getattr(stats, "extra", None) or {}
    if ex.get("bilevel_chunk_spans") is None:
        return ""
    from ..cache.bilevel.render import chunks_html

    return '<div class="mmkv-sub">chunks brought back dense for this answer</div>' + chunks_html(stats)


def layers_html(stats) -> str:
    """Figures per layer: one bar per layer for every per-layer series; shares in percent,
    counts as counts."""
    import html

    from .labels import fmt, kind

    series = _per_layer_series(stats)
    chunks = _bilevel_chunks(stats)
    if not series:
        return _section("Per layer", chunks + '<div class="mmkv-note">no per-layer figures for this run</div>',
                        "mmkv-layers")
    parts = [chunks]
    for name, vals in series:
        how = kind(vals)
        top = max([abs(v) for v in vals] + [1e-12])
        scale = 1.0 if how == "share" else top
        if len(set(vals)) == 1:
            parts.append(f'<div class="mmkv-sub">{html.escape(name)}: {fmt(vals[0], how)} in every one of the '
                         f'{len(vals)} layers</div>')
            continue
        parts.append(f'<div class="mmkv-sub">{html.escape(name)}</div>')
        parts.extend(_bar(f"layer {i}", v / scale, "#6366f1", fmt(v, how)) for i, v in enumerate(vals))
    return _section("Per layer", "".join(parts), "mmkv-layers")


def timing_html(stats, encode_s: float | None = None) -> str:
    """Encode (once per video), prefill and decode time of the last answer."""
    enc_s = stats.encode_s if encode_s is None else encode_s
    vals = [("encode (once)", enc_s), ("prefill", stats.prefill_s), ("decode", stats.decode_s)]
    top = max([v for _, v in vals] + [1e-9])
    colors = {"encode (once)": "#9ca3af", "prefill": "#f59e0b", "decode": "#10b981"}
    rows = [_bar(k, v / top, colors[k], f"{v:.3f} s") for k, v in vals]
    tps = stats.tokens_per_s
    rows.append(f'<div class="mmkv-note">{stats.new_tokens} new tokens'
                + (f", {tps:.1f} tokens/s" if tps == tps else "") + "</div>")
    return _section("Time", "".join(rows), "mmkv-time")


def status_html(text: str, error: bool = False) -> str:
    import html

    cls = "mmkv-error" if error else "mmkv-ok"
    icon = "⚠ Error: " if error else ""
    return f'<div class="{cls}" role="{"alert" if error else "status"}">{icon}{html.escape(text)}</div>'


def stats_rows(stats) -> list[list[str]]:
    """Every figure of the last answer as [label, value] rows (human labels, no raw keys)."""
    import dataclasses

    from .labels import label

    mib = 1 / 2**20
    rows = [["recipe", stats.recipe], ["model", stats.model], ["device", stats.device],
            ["sampled frames", str(stats.frames)]]
    for stage, before, after in stats.visual_tokens:
        frac = after / before if before else float("nan")
        rows.append([f"visual tokens, {stage}", f"{before} → {after} ({_pct(frac)})"])
    rows.append(["prompt tokens (LLM input)", str(stats.prompt_tokens)])
    if stats.kv_len_per_layer:
        lens = stats.kv_len_per_layer
        same = len(set(lens)) == 1
        rows.append(["KV entries per layer", str(lens[0]) if same else f"{min(lens)}..{max(lens)} {lens}"])
    full = uncompressed_bytes(stats)
    rows.append(["KV cache stored", f"{stats.kv_bytes * mib:.3f} MiB"])
    if full == full:
        rows.append(["KV cache uncompressed", f"{full * mib:.3f} MiB"])
    rows.append(["KV stored, share of uncompressed", _pct(stats.kv_ratio)])
    bits = stats.bits_per_element
    rows.append(["KV bits stored per element", f"{bits:.2f}" if bits == bits else "n/a"])
    if len(stats.kv_bytes_by_class or {}) > 1:
        rows.append(["KV bytes by class",
                     ", ".join(f"{k}: {v * mib:.3f} MiB" for k, v in stats.kv_bytes_by_class.items())])
    if stats.kv_index_bytes:
        rows.append(["KV position indices", f"{stats.kv_index_bytes * mib:.3f} MiB"])
    rows.append(["encode / prefill / decode",
                 f"{stats.encode_s:.3f} s / {stats.prefill_s:.3f} s / {stats.decode_s:.3f} s"])
    tps = stats.tokens_per_s
    rows.append(["new tokens", f"{stats.new_tokens}" + (f" ({tps:.1f} tokens/s)" if tps == tps else "")])
    rows.append([f"peak memory ({stats.peak_memory_kind or 'unknown'})", f"{stats.peak_memory_bytes * mib:.1f} MiB"])
    shown = {"recipe", "model", "device", "frames", "visual_tokens", "prompt_tokens", "kv_len_per_layer", "kv_bytes",
             "kv_bytes_uncompressed", "kv_bytes_after_vision", "kv_dtype", "kv_bytes_by_class", "kv_index_bytes", "encode_s", "prefill_s", "decode_s",
             "new_tokens", "peak_memory_bytes", "peak_memory_kind", "extra"}
    for f in dataclasses.fields(stats):  # figures added to Stats later still show, labelled
        if f.name not in shown:
            rows.append([label(f.name), _value(getattr(stats, f.name))])
    for k, v in (stats.extra or {}).items():
        rows.append([label(k), _value(v)])
    return rows


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, float) for x in v):
        return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
    return str(v)


def _code(text: str) -> str:
    """Escaped text with `backticks` shown as code."""
    import html
    import re

    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def recipes_html(presets: list[tuple[str, str, str]], stages: list[tuple[str, str, str]]) -> str:
    """The presets and the registered stages as two tables, every column headed."""
    def table(head, rows):
        th = "".join(f"<th>{h}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
        return f'<table class="mmkv-table"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'

    p = table(["preset", "recipe", "what it does"], [[_code(f"`{n}`"), _code(f"`{spec}`"), _code(doc)]
                                                   for n, spec, doc in presets])
    s = table(["kind", "stage", "what it does"], [[_code(kind), _code(f"`{name}`"), _code(doc)]
                                                 for kind, name, doc in stages])
    return (f'<div class="mmkv-tables" id="mmkv-recipes">{p}<p>Any recipe string also works, e.g. <code>kivi:2</code> '
            f"or <code>streaming:recent=256+kivi:4</code>. Stages:</p>{s}</div>")


def encoded_text(enc, name: str, seconds: float, note: str = "") -> str:
    """The status line once a video is encoded; its frame counts are the token card's."""
    from .thumbs import slots_phrase

    msg = (f"Encoded {name}: {slots_phrase(enc)} → {enc.visual.num}/{enc.visual.n_total} visual tokens kept, "
           f"in {seconds:.1f} s.")
    return f"{msg} {note}" if note else msg


def answered_text(res, name: str) -> str:
    """The status line after an answer: the KV cache against the model's uncompressed cache."""
    s = res.stats
    msg = (f"Answered about {name} with recipe {s.recipe}: KV cache {human_bytes(s.kv_bytes)} stored, "
           f"{_pct(s.kv_ratio)} of uncompressed; prefill {s.prefill_s:.2f} s, decode {s.decode_s:.2f} s.")
    return f"{msg} {res.note}" if res.note else msg
