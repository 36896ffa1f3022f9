"""Adapter for Qwen2-VL and Qwen2.5-VL.

Vision: the processor's video processor turns each chunk of frames into patches (every chunk
resized the same way: `cap_pixels_per_frame=False`, so the per-frame size does not depend on
the chunk length), and the model's own vision tower encodes them. Qwen's vision attention never
crosses temporal slots (two frames), so encoding chunk by chunk equals encoding the whole video.
Positions: the model's `get_rope_index` over the full, uncompressed prompt (3-D M-RoPE; Qwen2.5-VL
spaces temporal positions by real seconds through `second_per_grid_ts`), in the layout the
checkpoints were trained with (`rope_layout`, below): the text after a video continues after the
video's largest position.
"""
from __future__ import annotations

import numpy as np
import torch

from ..vision.base import VisualTokens
from .base import Adapter, build_tokens, grid_coords, register_adapter

ROPE_LAYOUTS = ("released", "transformers")


def released_layout(pos: torch.Tensor, mm_token_type_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Move the text after each image or video of `pos` ([3, B, L], as `get_rope_index` gives it)
    to the released Qwen2-VL layout: the first text token after a visual span sits at the largest
    position before it + 1, and everything after moves with it. In place; returns `pos`.

    Why: Qwen's own code (`get_rope_index` of the Qwen2-VL / Qwen2.5-VL releases, transformers 4.x,
    vLLM) starts the text after a visual span at that span's largest position + 1. transformers
    5.x starts it at the span's start + max(h, w) / merge, which equals the same for an image but
    for a video of more temporal slots than that places the question inside the video's temporal
    range (at 1,024 frames of 8x8 patches: 4 after the video's start instead of 512), and
    `generate`'s rope_deltas then jumps the answer to after the video's largest position. The
    checkpoints were trained on the former; the latter is a layout none of them saw."""
    for b in range(pos.shape[1]):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(mm_token_type_ids[b], dtype=torch.bool)
        idx = keep.nonzero()[:, 0]
        m = mm_token_type_ids[b, idx]
        p = pos[:, b, idx]
        for s in (((m[1:] == 0) & (m[:-1] != 0)).nonzero()[:, 0] + 1).tolist():
            p[:, s:] += p[:, :s].max() + 1 - p[0, s]
        pos[:, b, idx] = p
    return pos


def rope_index(model, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, *,
               attention_mask: torch.Tensor | None = None, layout: str = "released", **grids) -> torch.Tensor:
    """The M-RoPE positions [3, B, L] of a Qwen2-VL / Qwen2.5-VL prompt: the model's own
    `get_rope_index` (`grids`: video_grid_thw / image_grid_thw / second_per_grid_ts), in `layout`:
    "released" (the layout the checkpoints were trained with, `released_layout`) or "transformers"
    (the installed transformers' as it is)."""
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    pos, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                        attention_mask=attention_mask, **grids)
    return released_layout(pos, mm_token_type_ids, attention_mask) if layout == "released" else pos


def use_released_layout(model):
    """Make a plain transformers Qwen2-VL / Qwen2.5-VL model (its forward and `generate`) use the
    released layout (`released_layout`): mmkv's positions, so that `model.generate` and mmkv agree
    token for token on long videos too. Patches this instance's `get_rope_index` (idempotent;
    other model types are left as they are); returns the model."""
    if model.config.model_type not in QwenVLAdapter.model_types:
        return model
    inner = model.model
    if getattr(inner.get_rope_index, "_mmkv_released", False):
        return model
    original = inner.get_rope_index

    def get_rope_index(input_ids, mm_token_type_ids, *args, attention_mask=None, **kwargs):
        pos, _ = original(input_ids, mm_token_type_ids, *args, attention_mask=attention_mask, **kwargs)
        pos = released_layout(pos, mm_token_type_ids, attention_mask)
        keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        deltas = torch.stack([pos[:, b, keep[b]].max() + 1 - keep[b].sum() for b in range(pos.shape[1])])
        return pos, deltas.unsqueeze(1)

    get_rope_index._mmkv_released = True
    inner.get_rope_index = get_rope_index
    return model


@register_adapter
class QwenVLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    family = "qwen2-vl"
    pos_dims = 3
    temporal_patch = 2
    placeholder = {"video": "<|video_pad|>", "image": "<|image_pad|>"}
    # "released": text after a video continues after the video's largest position, as Qwen's own
    # code, vLLM and transformers 4.x place it and the checkpoints were trained; "transformers": the
    # installed transformers' get_rope_index as it is (5.x places it inside a long video's temporal
    # range; set it to reproduce `model.generate` of transformers 5 token for token).
    rope_layout = "released"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.family = "qwen2.5-vl" if model.config.model_type == "qwen2_5_vl" else "qwen2-vl"
        vc = model.config.vision_config
        self.temporal_patch = int(getattr(vc, "temporal_patch_size", 2))
        self.merge = int(getattr(vc, "spatial_merge_size", 2))

    # ------------------------------------------------------------------ vision
    @torch.inference_mode()
    def encode_chunk(self, frames, timestamps, slot0, index0):
        vp = self.processor.video_processor
        out = vp(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
        pix = out["pixel_values_videos"].to(self.device, self.model.model.visual.dtype)
        thw = out["video_grid_thw"].to(self.device)
        emb = self.model.model.get_video_features(pix, thw, return_dict=True).pooler_output[0]
        t, h, w = (int(x) for x in thw[0])
        h, w = h // self.merge, w // self.merge
        ts = np.asarray(timestamps, dtype=np.float64)[:: self.temporal_patch][:t]
        return build_tokens(emb.to(self.dtype), grid_coords(slot0, t, h, w), index0, (t, h, w), ts, "video",
                            meta={"patch_grid": (int(thw[0, 1]), int(thw[0, 2]))})

    def finish_video(self, parts, media):
        grid_t = sum(p.grid[0] for p in parts)
        _, h, w = parts[0].grid
        ph, pw = parts[0].meta["patch_grid"]
        meta = {"grid_thw": torch.tensor([[grid_t, ph, pw]]),
                "second_per_grid_ts": torch.tensor([self.temporal_patch / media.sampled_fps])}
        ts = torch.cat([p.timestamps for p in parts])
        return VisualTokens.cat(parts, n_total=grid_t * h * w, grid=(grid_t, h, w), timestamps=ts, meta=meta)

    @torch.inference_mode()
    def encode_image(self, image):
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        pix = out["pixel_values"].to(self.device, self.model.model.visual.dtype)
        thw = out["image_grid_thw"].to(self.device)
        emb = self.model.model.get_image_features(pix, thw, return_dict=True).pooler_output[0]
        t, h, w = (int(x) for x in thw[0])
        h, w = h // self.merge, w // self.merge
        vt = build_tokens(emb.to(self.dtype), grid_coords(0, t, h, w), 0, (t, h, w), [0.0], "image",
                          meta={"grid_thw": thw.cpu()})
        return vt

    # ------------------------------------------------------------------ positions
    def _positions(self, ids, vt):
        kind_id = 2 if vt.kind == "video" else 1
        tok = self.tokenizer.convert_tokens_to_ids(self.placeholder[vt.kind])
        mm = torch.where(ids == tok, kind_id, 0).to(torch.int32)
        kw = {"video_grid_thw": vt.meta["grid_thw"]} if vt.kind == "video" else {"image_grid_thw": vt.meta["grid_thw"]}
        if self.model.config.model_type == "qwen2_5_vl" and vt.kind == "video":
            kw["second_per_grid_ts"] = vt.meta["second_per_grid_ts"]
        return rope_index(self.model, ids[None], mm[None], layout=self.rope_layout, **kw)[:, 0].cpu()  # [3, L]
