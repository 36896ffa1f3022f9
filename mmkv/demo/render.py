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
.mmkv-card{font-family:ui-sans-serif,system-ui,sans-serif;font-size:13px;margin:4px 0 10px 0}
.mmkv-title{font-weight:600;margin-bottom:4px}
.mmkv-row{display:flex;align-items:center;gap:8px;margin:2px 0}
.mmkv-name{width:11em;flex:none;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.mmkv-track{flex:1;height:14px;background:rgba(128,128,128,.18);border-radius:3px;overflow:hidden;min-width:60px}
.mmkv-fill{height:100%}
.mmkv-val{flex:none;min-width:12em;font-variant-numeric:tabular-nums}
.mmkv-cols{display:flex;align-items:flex-end;gap:1px;height:70px;border-bottom:1px solid rgba(128,128,128,.5)}
.mmkv-col{flex:1;background:#3b82f6;min-width:1px}
.mmkv-note{color:#6b7280;font-size:12px}
.mmkv-error{color:#b91c1c;background:#fef2f2;border:1px solid #fca5a5;border-radius:6px;padding:8px 10px;font-size:14px}
.mmkv-ok{color:#065f46;background:#ecfdf5;border:1px solid #6ee7b7;border-radius:6px;padding:8px 10px;font-size:14px}
"""


def tokens_html(stats, enc=None) -> str:
    """Visual tokens before/after each vision stage, and kept tokens per frame (all slots)."""
    rows = []
    for stage, before, after in stats.visual_tokens:
        frac = after / before if before else float("nan")
        rows.append(_bar(stage, frac, "#3b82f6", f"{before} → {after} ({100 * frac:.1f}%)"))
    body = "".join(rows) or '<div class="mmkv-note">no visual tokens</div>'
    if enc is not None and enc.visual.grid[0] > 1:
        vt = enc.visual
        counts = vt.per_slot_counts().cpu().tolist()
        full = max(1, vt.grid[1] * vt.grid[2])
        cols = "".join(f'<div class="mmkv-col" title="slot {t}: {c}/{full}" style="height:{100 * c / full:.1f}%">'
                       "</div>" for t, c in enumerate(counts))
        body += (f'<div class="mmkv-note">kept tokens per frame ({len(counts)} frames, {full} tokens each)</div>'
                 f'<div class="mmkv-cols">{cols}</div>')
    return _section("Visual tokens", body, "mmkv-tokens")


def memory_html(stats) -> str:
    """KV cache bytes: the uncompressed (fp16) size against what is stored, and by class."""
    full, kept = stats.kv_bytes_fp16, stats.kv_bytes
    top = max(full, kept, 1)
    rows = [_bar("full (fp16)", full / top, "#9ca3af", human_bytes(full)),
            _bar("stored", kept / top, "#10b981",
                       f"{human_bytes(kept)} ({100 * kept / full:.1f}%)" if full else human_bytes(kept))]
    colors = ["#f59e0b", "#8b5cf6", "#ef4444", "#0ea5e9", "#84cc16"]
    for i, (k, v) in enumerate(sorted((stats.kv_bytes_by_class or {}).items())):
        if len(stats.kv_bytes_by_class) > 1:
            rows.append(_bar(f"  {k}", v / top, colors[i % len(colors)], human_bytes(v)))
    if stats.kv_index_bytes:
        rows.append(f'<div class="mmkv-note">+ {human_bytes(stats.kv_index_bytes)} of position indices</div>')
    bits = f"{stats.bits_per_element:.2f}" if full else "n/a"
    rows.append(f'<div class="mmkv-note">{bits} bits per element of the uncompressed cache; '
                f'{stats.prompt_tokens} prompt tokens</div>')
    return _section("KV cache memory: full (fp16) vs stored by this recipe", "".join(rows), "mmkv-memory")


def _per_layer_series(stats) -> list[tuple[str, list[float]]]:
    """Per-layer series: KV entries kept / prompt tokens, plus any per-layer list a method put in
    stats.extra (a list of numbers, one per layer)."""
    out = []
    lens = list(stats.kv_len_per_layer or [])
    n = len(lens)
    if n and stats.prompt_tokens:
        out.append(("KV entries kept / prompt tokens", [x / stats.prompt_tokens for x in lens]))
    for k, v in (stats.extra or {}).items():
        if isinstance(v, (list, tuple)) and n and len(v) == n and all(isinstance(x, (int, float)) for x in v):
            out.append((str(k), [float(x) for x in v]))
    return out


def layers_html(stats) -> str:
    """Ratios per layer: one bar per layer for every per-layer series."""
    import html

    series = _per_layer_series(stats)
    if not series:
        return _section("Per-layer ratios", '<div class="mmkv-note">no per-layer figures for this run</div>',
                        "mmkv-layers")
    parts = []
    for name, vals in series:
        top = max([abs(v) for v in vals] + [1e-12])
        scale = 1.0 if top <= 1.0 else top
        if len(set(vals)) == 1:
            parts.append(f'<div class="mmkv-note">{html.escape(name)}: {vals[0]:.3g} in every one of the '
                         f'{len(vals)} layers</div>')
            continue
        parts.append(f'<div class="mmkv-note">{html.escape(name)}</div>')
        parts.extend(_bar(f"layer {i}", v / scale, "#6366f1", f"{v:.3g}") for i, v in enumerate(vals))
    return _section("Per-layer ratios", "".join(parts), "mmkv-layers")


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
    """The full stats table as [name, value] rows."""
    rows = []
    for line in stats.table().splitlines():
        parts = line.split("  ", 1)
        rows.append([parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""])
    return rows

