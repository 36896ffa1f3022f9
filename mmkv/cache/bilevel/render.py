"""Which chunks a question brought back: a strip over the video's time line, one cell per chunk,
darker where more layers reloaded the chunk's dense level (chunks are chosen per layer).

    res = pipe.ask(enc, "What happens at the end?")
    html = chunks_html(res)          # an HTML fragment (e.g. for gradio.HTML)
    img = chunks_image(res)          # a PIL image
"""
from __future__ import annotations

import html as _html


def _extra(obj) -> dict:
    """The stats extras of a Result, a Stats or a dict."""
    stats = getattr(obj, "stats", obj)
    return getattr(stats, "extra", stats) or {}


def chunk_usage(obj) -> list[dict]:
    """Per chunk: {"chunk", "start_s", "end_s", "layers" (that brought it back), "fraction"}."""
    ex = _extra(obj)
    spans = ex.get("bilevel_chunk_spans")
    if spans is None:
        raise ValueError("no bi-level statistics here: answer with a 'bilevel' recipe first")
    chosen = ex.get("bilevel_chosen") or []
    n_layers = max(1, len(chosen))
    counts = [0] * len(spans)
    for layer in chosen:
        for c in layer:
            counts[c] += 1
    return [{"chunk": c, "start_s": float(t0), "end_s": float(t1), "layers": counts[c],
             "fraction": counts[c] / n_layers} for c, (t0, t1) in enumerate(spans)]


def _fmt(t: float) -> str:
    m, s = divmod(max(0.0, t), 60)
    return f"{int(m)}:{s:04.1f}"


def chunks_html(obj, height: int = 28) -> str:
    """An HTML strip of the chunks (see module docstring); hover a cell for its time span."""
    rows = chunk_usage(obj)
    if not rows:
        return '<div class="mmkv-bilevel" style="font:12px sans-serif">no chunks (an image stays whole)</div>'
    total = max(1e-9, sum(max(r["end_s"] - r["start_s"], 1e-9) for r in rows))
    cells = []
    for r in rows:
        w = 100 * max(r["end_s"] - r["start_s"], 1e-9) / total
        a = 0.12 + 0.88 * r["fraction"] if r["layers"] else 0.0
        bg = f"rgba(25,118,210,{a:.3f})" if r["layers"] else "#eceff1"
        tip = (f"chunk {r['chunk']}: {_fmt(r['start_s'])}-{_fmt(r['end_s'])}, "
               f"dense in {r['layers']} layer(s) ({100 * r['fraction']:.0f}%)")
        cells.append(f'<div title="{_html.escape(tip)}" style="width:{w:.4f}%;height:{height}px;background:{bg};'
                     f'border-right:1px solid #fff;box-sizing:border-box"></div>')
    start, end = _fmt(rows[0]["start_s"]), _fmt(rows[-1]["end_s"])
    picked = sum(1 for r in rows if r["layers"])
    return ('<div class="mmkv-bilevel" style="font:12px sans-serif">'
            f'<div style="display:flex;width:100%">{"".join(cells)}</div>'
            f'<div style="display:flex;justify-content:space-between;color:#555"><span>{start}</span>'
            f'<span>{picked} of {len(rows)} chunks brought back dense (darker: more layers)</span>'
            f'<span>{end}</span></div></div>')


def chunks_image(obj, width: int = 800, height: int = 40):
    """The same strip as a PIL image (RGB)."""
    from PIL import Image, ImageDraw

    rows = chunk_usage(obj)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if not rows:
        return img
    t0, t1 = rows[0]["start_s"], rows[-1]["end_s"]
    span = max(1e-9, t1 - t0)
    for r in rows:
        x0 = int((r["start_s"] - t0) / span * width)
        x1 = max(x0 + 1, int((r["end_s"] - t0) / span * width) - 1)
        if r["layers"]:
            a = 0.12 + 0.88 * r["fraction"]
            color = tuple(int(255 - a * (255 - c)) for c in (25, 118, 210))
        else:
            color = (236, 239, 241)
        draw.rectangle([x0, 0, x1, height - 1], fill=color)
    return img
