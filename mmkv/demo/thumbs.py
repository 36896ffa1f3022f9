"""The pictures of an encoding: one thumbnail per temporal slot with the kept-token grid drawn
on it (cells of dropped tokens darkened), and the words for a slot.

A temporal slot is what the vision encoder turns into one grid of tokens: one frame for
LLaVA-OneVision, a pair of consecutive frames for Qwen2-VL / Qwen2.5-VL (temporal patch 2).
"""
from __future__ import annotations

import os


def frames_per_slot(enc) -> int:
    """Sampled frames per temporal slot of an encoding (2 for Qwen2-VL videos, 1 otherwise)."""
    t = enc.visual.grid[0]
    return max(1, -(-enc.media.num_frames // t)) if t > 0 and enc.media.kind != "image" else 1


def slot_words(enc) -> tuple[str, str]:
    """(singular, plural) of what one temporal slot is: "frame pair(s)", "frame(s)", "group(s) of k frames"."""
    k = frames_per_slot(enc)
    if k == 1:
        return "frame", "frames"
    if k == 2:
        return "frame pair", "frame pairs"
    return f"group of {k} frames", f"groups of {k} frames"


def slots_phrase(enc) -> str:
    """e.g. "16 sampled frames = 8 frame pairs of 4 tokens each" (what the status and the token
    card both say, so their counts agree)."""
    T, H, W = enc.visual.grid
    one, many = slot_words(enc)
    n = enc.media.num_frames
    frames = f"{n} sampled frame{'s' if n != 1 else ''}"
    if frames_per_slot(enc) == 1:
        return f"{frames}, {H * W} tokens each"
    return f"{frames} = {T} {one if T == 1 else many} of {H * W} tokens each"


def _slot_frames(enc, slots: list[int]):
    """RGB frames ([H, W, 3] uint8) shown for temporal slots `slots` of an encoded video: the
    sampled frame nearest each slot's timestamp (a slot is one frame, or Qwen's pair of frames)."""
    import numpy as np

    media, vt = enc.media, enc.visual
    if media.kind == "image":
        return [np.asarray(media.image().convert("RGB"))]
    ts_slot = vt.timestamps.double().cpu().numpy() if vt.timestamps is not None and len(vt.timestamps) else None
    picks = []
    for t in slots:
        if ts_slot is not None and len(ts_slot) == vt.grid[0]:
            i = int(np.argmin(np.abs(media.timestamps - ts_slot[t])))
        else:
            i = min(media.num_frames - 1, int(round(t * media.num_frames / max(vt.grid[0], 1))))
        picks.append(i)
    src = getattr(media, "_src", None)  # decode just these frames, not the whole video
    if src is not None:
        return list(src.get(media.indices[picks]))
    frames = media.frames()
    return [frames[i] for i in picks]


def overlay(frame, grid_hw: tuple[int, int], kept_hw, *, width: int = 224, dim: float = 0.28):
    """A thumbnail of `frame` ([H, W, 3] uint8) with the token grid drawn on it: cells of kept
    tokens keep their colours, cells of dropped tokens are darkened to `dim` and tinted.
    `kept_hw`: [K, 2] (row, col) of kept tokens in a grid of `grid_hw` cells."""
    import numpy as np
    from PIL import Image, ImageDraw

    gh, gw = grid_hw
    img = Image.fromarray(np.ascontiguousarray(frame)).convert("RGB")
    height = max(1, round(width * img.height / max(img.width, 1)))
    arr = np.asarray(img.resize((width, height), Image.BILINEAR)).astype(np.float32)
    kept = np.zeros((gh, gw), dtype=bool)
    kh = np.asarray(kept_hw, dtype=np.int64).reshape(-1, 2)
    ok = (kh[:, 0] >= 0) & (kh[:, 0] < gh) & (kh[:, 1] >= 0) & (kh[:, 1] < gw)
    kept[kh[ok, 0], kh[ok, 1]] = True
    ys = np.minimum((np.arange(height) * gh) // height, gh - 1)
    xs = np.minimum((np.arange(width) * gw) // width, gw - 1)
    mask = kept[ys][:, xs]                                            # [height, width] pixel -> kept
    tint = np.array([40.0, 0.0, 0.0], dtype=np.float32)
    arr[~mask] = arr[~mask] * dim + tint
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    if gw <= 64 and gh <= 64:  # faint grid lines where they stay readable
        for c in range(1, gw):
            x = c * width // gw
            draw.line([(x, 0), (x, height - 1)], fill=(255, 255, 255), width=1)
        for r in range(1, gh):
            y = r * height // gh
            draw.line([(0, y), (width - 1, y)], fill=(255, 255, 255), width=1)
    return out


def thumbnails(enc, n: int = 12, width: int = 224) -> list[tuple[object, str]]:
    """[(PIL image, caption)] for up to `n` temporal slots spread over the video, each with the
    kept-token overlay of that slot."""
    import numpy as np

    vt = enc.visual
    T, H, W = vt.grid
    if T <= 0 or H <= 0 or W <= 0:
        return []
    slots = sorted(set(np.round(np.linspace(0, T - 1, min(n, T))).astype(int).tolist()))
    coords = vt.coords[vt.is_patch].cpu().numpy()
    frames = _slot_frames(enc, slots)
    out = []
    ts = vt.timestamps.double().cpu().numpy() if vt.timestamps is not None and len(vt.timestamps) == T else None
    for t, frame in zip(slots, frames):
        kept = coords[coords[:, 0] == t][:, 1:]
        when = f"t={ts[t]:.1f}s · " if ts is not None else ""
        out.append((overlay(frame, (H, W), kept, width=width), f"{when}kept {len(kept)}/{H * W}"))
    return out



def save_thumbnails(items: list[tuple[object, str]], folder: str, prefix: str) -> list[tuple[str, str]]:
    """Write `thumbnails()` output as WebP files named `prefix`-k.webp into `folder` (created;
    earlier files there are deleted); returns [(path, caption)] for a Gradio Gallery."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    out = []
    for k, (img, caption) in enumerate(items):
        path = os.path.join(folder, f"{prefix}-{k:03d}.webp")
        img.save(path, "WEBP", quality=85)
        out.append((path, caption))
    return out
