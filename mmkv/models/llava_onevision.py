"""Adapter for LLaVA-OneVision.

Video: SigLIP encodes each frame independently, the projector maps it to the LLM, and 2x2
bilinear pooling shrinks each frame's grid; one `image_newline` token closes the whole video.
Chunked encoding therefore equals whole-video encoding. Images: AnyRes (a base view plus crops,
unpadded, a newline per row), through the model's own `get_image_features`.
Positions are 1-D; kept tokens keep their index in the uncompressed prompt.
"""
from __future__ import annotations

import torch

from ..vision.base import VisualTokens
from .base import Adapter, build_tokens, grid_coords, register_adapter
from .vit_scores import capture_last_attention_input, query_scores


@register_adapter
class LlavaOnevisionAdapter(Adapter):
    model_types = ("llava_onevision",)
    family = "llava-onevision"
    pos_dims = 1
    temporal_patch = 1
    placeholder = {"video": "<video>", "image": "<image>"}
    image_view_scores = True

    def _feature_kwargs(self):
        c = self.model.config
        return {"vision_feature_layer": c.vision_feature_layer,
                "vision_feature_select_strategy": c.vision_feature_select_strategy}

    # ------------------------------------------------------------------ video
    @torch.inference_mode()
    def encode_chunk(self, frames, timestamps, slot0, index0):
        out = self.processor.video_processor(videos=[frames], return_tensors="pt")
        pix = out["pixel_values_videos"].to(self.device, self.model.dtype)
        feats = self.model.model.get_video_features(pix, return_dict=True, **self._feature_kwargs()).pooler_output
        n = pix.shape[1]
        vc = self.model.config.vision_config
        side = -(-(vc.image_size // vc.patch_size) // 2)  # 2x2 bilinear pooling, rounded up
        emb = feats[0]
        if emb.shape[0] == n * side * side + 1:  # transformers >= 5.2x appends the newline here
            emb = emb[:-1]                        # it is added once, in finish_video
        if emb.shape[0] != n * side * side:
            raise RuntimeError(f"expected {n * side * side} video tokens, the model produced {emb.shape[0]}")
        return build_tokens(emb.to(self.dtype), grid_coords(slot0, n, side, side), index0, (n, side, side),
                            timestamps, "video")

    def finish_video(self, parts, media):
        n = sum(p.grid[0] for p in parts)
        _, h, w = parts[0].grid
        newline = self.model.model.image_newline.detach().to(self.dtype)[None]
        sep = build_tokens(newline, torch.tensor([[n, -1, -1]]), n * h * w, (n, h, w), [], "video",
                           is_patch=torch.zeros(1, dtype=torch.bool))
        ts = torch.cat([p.timestamps for p in parts])
        return VisualTokens.cat(parts + [sep], n_total=n * h * w + 1, grid=(n, h, w), timestamps=ts, meta={})

    # ------------------------------------------------------------------ image
    @torch.inference_mode()
    def encode_image(self, image):
        ip = self.processor.image_processor
        out = ip(images=[image], return_tensors="pt")
        pix = out["pixel_values"].to(self.device, self.model.dtype)
        sizes = out["image_sizes"]
        with capture_last_attention_input(self.model.model.vision_tower) as cap:
            emb = self.model.model.get_image_features(pix, sizes.to(self.device), return_dict=True,
                                                      **self._feature_kwargs()).pooler_output[0]
        # per-view patch scores for GlobalCom²: SigLIP has no [CLS], so the mean token is the query
        view_scores = query_scores(cap["attn"], cap["hidden"], "mean").cpu()
        coords = self._image_coords(pix.shape[1], sizes)
        if coords.shape[0] != emb.shape[0]:
            raise RuntimeError(f"image layout has {coords.shape[0]} tokens but the model produced {emb.shape[0]}")
        is_patch = coords[:, 1] >= 0
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        rows = int(coords[:, 1].max()) + 1
        cols = int(coords[:, 2].max()) + 1
        return build_tokens(emb.to(self.dtype), coords, 0, (1, rows, cols), [0.0], "image", is_patch=is_patch,
                            meta={"base_grid": (side, side), "num_crops": pix.shape[1] - 1,
                                  "image_size": tuple(int(x) for x in sizes[0]),
                                  "view_scores": view_scores, "score_query": "mean",
                                  "crop_grid": self._crop_grid(pix.shape[1], sizes)})

    def _crop_grid(self, num_patches: int, image_sizes) -> tuple[int, int]:
        """(rows, columns) of the AnyRes crops; (0, 0) for a single view."""
        if num_patches <= 1:
            return (0, 0)
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape
        vc = self.model.config.vision_config
        nph, npw = get_anyres_image_grid_shape(image_sizes[0].tolist(), self.model.config.image_grid_pinpoints,
                                               vc.image_size)
        if nph * npw != num_patches - 1:
            raise RuntimeError(f"{nph} x {npw} crops expected, the processor made {num_patches - 1}")
        return (int(nph), int(npw))

    def _image_coords(self, num_patches: int, image_sizes) -> torch.Tensor:
        """(t, h, w) of every token `pack_image_features` emits, found by packing coordinates
        through the model's own packing code: t=0 base view, t=1 high-resolution grid (h, w in the
        grid of all crops before unpadding), separators h = w = -1."""
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        # patch p of the high-res grid (row-major over crops) gets its global grid coordinates
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape
        feats = torch.zeros(num_patches, side * side, 3, dtype=torch.float64)
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        feats[0, :, 1], feats[0, :, 2] = r.flatten(), c.flatten()
        if num_patches > 1:
            nph, npw = get_anyres_image_grid_shape(image_sizes[0].tolist(), self.model.config.image_grid_pinpoints,
                                                   vc.image_size)
            for p in range(num_patches - 1):
                pr, pc = divmod(p, npw)
                feats[p + 1, :, 0] = 1
                feats[p + 1, :, 1] = (pr * side + r).flatten()
                feats[p + 1, :, 2] = (pc * side + c).flatten()
        newline = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
        packed, _ = self.model.model.pack_image_features([feats], image_sizes, image_newline=newline,
                                                         vision_aspect_ratio=getattr(self.model.config,
                                                                                     "vision_aspect_ratio",
                                                                                     "anyres_max_9"))
        coords = packed[0].round().long()
        if num_patches == 1:  # single view: base tokens then one newline
            coords[:, 0] = 0
        return coords
