"""Adapter for Qwen2-VL and Qwen2.5-VL.

Vision: the processor's video processor turns each chunk of frames into patches (every chunk
resized the same way: `cap_pixels_per_frame=False`, so the per-frame size does not depend on
the chunk length), and the model's own vision tower encodes them. Qwen's vision attention never
crosses temporal slots (two frames), so encoding chunk by chunk equals encoding the whole video.
Positions: the model's `get_rope_index` over the full, uncompressed prompt (3-D M-RoPE; Qwen2.5-VL
spaces temporal positions by real seconds through `second_per_grid_ts`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..vision.base import VisualTokens
from .base import Adapter, build_tokens, grid_coords, register_adapter


@register_adapter
class QwenVLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    family = "qwen2-vl"
    pos_dims = 3
    temporal_patch = 2
    placeholder = {"video": "<|video_pad|>", "image": "<|image_pad|>"}

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
        pos, _ = self.model.model.get_rope_index(ids[None], mm_token_type_ids=mm[None], **kw)
        return pos[:, 0].cpu()  # [3, L]
