"""Adapter for LLaVA-NeXT (LLaVA-1.6): CLIP with a [CLS] token, AnyRes images.

Images only (LLaVA-NeXT-Video is a different family). The image is a 336² thumbnail (the base
view) plus nph x npw crops of the best-fitting grid pinpoint; the model's own
`get_image_features` projects them, drops the [CLS] feature ("default" strategy), unpads the crop
grid and appends an `image_newline` after every row of it. Each token gets coordinates: t=0 for
the thumbnail (h, w in its grid), t=1 for the crop grid (h, w in the grid of all crops before
unpadding), separators h = w = -1; found by packing coordinates through the model's own packing
code, so they match whatever the installed transformers does.

For GlobalCom² the adapter also records, per view, the [CLS] query's pre-softmax attention logits
in the vision tower's LAST layer, averaged over heads (`meta["view_scores"]`), as the official
GlobalCom² code computes them (see vit_scores.py). Positions are 1-D.
"""
from __future__ import annotations

import torch

from ..errors import InputError, ModelError
from .base import Adapter, build_tokens, register_adapter
from .vit_scores import capture_last_attention_input, query_scores


@register_adapter
class LlavaNextAdapter(Adapter):
    model_types = ("llava_next",)
    family = "llava-next"
    pos_dims = 1
    temporal_patch = 1
    placeholder = {"image": "<image>"}
    video_error = "LLaVA-NeXT takes images only; for videos use LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL"
    image_view_scores = True

    def __init__(self, model, processor):
        super().__init__(model, processor)
        strategy = model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ModelError(f"llava-next: vision_feature_select_strategy={strategy!r} is not supported "
                             "(mmkv supports 'default', which drops the [CLS] feature, as every LLaVA-NeXT checkpoint)")

    def _feature_kwargs(self):
        c = self.model.config
        return {"vision_feature_layer": c.vision_feature_layer,
                "vision_feature_select_strategy": c.vision_feature_select_strategy}

    # ------------------------------------------------------------------ video: not this family
    def encode_chunk(self, frames, timestamps, slot0, index0):
        raise InputError(self.video_error)

    def finish_video(self, parts, media):  # pragma: no cover - encode_chunk raises first
        raise InputError("LLaVA-NeXT takes images only")

    # ------------------------------------------------------------------ image
    @torch.inference_mode()
    def encode_image(self, image):
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        pix = out["pixel_values"].to(self.device, self.model.dtype)    # [1, V, 3, S, S]
        sizes = out["image_sizes"]
        with capture_last_attention_input(self.model.model.vision_tower) as cap:
            emb = self.model.model.get_image_features(pix, sizes.to(self.device), return_dict=True,
                                                      **self._feature_kwargs()).pooler_output[0]
        view_scores = query_scores(cap["attn"], cap["hidden"], "cls").cpu()   # [V, side * side]
        n_views = int(view_scores.shape[0])
        coords = self._image_coords(n_views, sizes)
        if coords.shape[0] != emb.shape[0]:
            raise RuntimeError(f"image layout has {coords.shape[0]} tokens but the model produced {emb.shape[0]}")
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        rows = int(coords[:, 1].max()) + 1
        cols = int(coords[:, 2].max()) + 1
        return build_tokens(emb.to(self.dtype), coords, 0, (1, rows, cols), [0.0], "image",
                            is_patch=coords[:, 1] >= 0,
                            meta={"base_grid": (side, side), "num_crops": n_views - 1,
                                  "crop_grid": self._crop_grid(n_views, sizes),
                                  "image_size": tuple(int(x) for x in sizes[0]),
                                  "view_scores": view_scores, "score_query": "cls"})

    def _crop_grid(self, n_views: int, image_sizes) -> tuple[int, int]:
        if n_views <= 1:
            return (0, 0)
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
        nph, npw = get_anyres_image_grid_shape(image_sizes[0].tolist(), self.model.config.image_grid_pinpoints,
                                               self.model.config.vision_config.image_size)
        if nph * npw != n_views - 1:
            raise RuntimeError(f"{nph} x {npw} crops expected, the processor made {n_views - 1}")
        return (int(nph), int(npw))

    def _image_coords(self, n_views: int, image_sizes) -> torch.Tensor:
        """(t, h, w) of every token `pack_image_features` emits (see the module docstring)."""
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        nph, npw = self._crop_grid(n_views, image_sizes)
        feats = torch.zeros(n_views, side * side, 3, dtype=torch.float64)
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        feats[0, :, 1], feats[0, :, 2] = r.flatten(), c.flatten()
        for p in range(n_views - 1):
            pr, pc = divmod(p, npw)
            feats[p + 1, :, 0] = 1
            feats[p + 1, :, 1] = (pr * side + r).flatten()
            feats[p + 1, :, 2] = (pc * side + c).flatten()
        newline = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
        packed, _ = self.model.model.pack_image_features([feats], image_sizes,
                                                         self.model.config.vision_feature_select_strategy,
                                                         image_newline=newline)
        coords = packed[0].round().long()
        if n_views == 1:
            coords[:, 0] = 0
        return coords
