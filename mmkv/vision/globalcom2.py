"""GlobalCom²: thumbnail-guided compression of the crops of an AnyRes image.

Paper: Liu et al., "Compression with Global Guidance: Towards Training-free High-Resolution
MLLMs Acceleration" (GlobalCom²), AAAI 2026, arXiv 2501.05179; official code
github.com/xuyang-liu16/GlobalCom2 (`llava/model/llava_arch.py`), read at 96b2d00.

AnyRes models (LLaVA-NeXT, LLaVA-OneVision) encode an image as a low-resolution thumbnail (the
base view) plus N = nph x npw high-resolution crops. With s^g the thumbnail's patch scores and
l^i crop i's own patch scores (the vision tower's last-layer [CLS] attention logits, head-mean;
see mmkv/models/vit_scores.py, which also defines the substitute used for SigLIP):
1. Thumbnail: keep the floor(n_base * R) patches with the highest s^g.
2. Crop budgets: S_i = sum of s^g over the part of the thumbnail grid that crop i covers (blocks of
   floor(side / nph) x floor(side / npw), the last block taking the remainder);
   sigma = softmax(S / T), T = 10; r_i = min(1, R * (1 + sigma_i - 1/N)). Before clipping the r_i
   average to R exactly; clipping at 1 only lowers the total.
3. Within crop i: the thumbnail scores are upsampled (bilinear, align_corners=False) to the
   unpadded high-resolution grid and crop i's part g^i is cut out; each patch scores
   l^i/||l^i|| + g^i/||g^i|| (L2 over the crop's valid, i.e. non-padding, patches), and the
   floor(n_i * r_i) best are kept.
4. The image_newline separators are all kept.

Defaults (the paper's): retention R=0.25, temperature T=10, allocation="thumbnail".

`allocation="uniform"` (an ablation, not in the paper) skips step 2: every crop keeps the same
fraction r_i = R, so only the thumbnail-guided allocation differs from GlobalCom²'s default;
the thumbnail and the within-crop scoring (steps 1 and 3) are unchanged.

Deviations from the official code, and why:
- Kept thumbnail tokens stay in raster order at their original positions; the official code
  emits them in descending-score order, which scrambles their 1-D positions. mmkv keeps every
  token's original position (DESIGN invariant 2), so the order cannot change.
- Crop tokens keep their original positions too; the official code re-packs the kept tokens into
  a shorter sequence (positions 0..L'-1). Both keep spatial order.
- The official code compresses only multi-view images (a single view passes through untouched).
  Here an image with only a base view is compressed like the thumbnail, to R, so that the
  budget holds; an image with ONE crop (N = 1) gets sigma = 1, r_1 = R, as the formula gives.
- The official mean of sigma is computed (sum(sigma) = 1 - 1e-8 there); here it is 1/N, the formula.
- Scores for LLaVA-OneVision come from the substitute query (mean token), since SigLIP has no [CLS].
Videos are rejected with a clear error (GlobalCom² is an image method; use pvc/evs/pool for video).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..stages import check, register
from .base import VisionContext, VisionPress, VisualTokens


def region_sums(sg: torch.Tensor, nph: int, npw: int) -> torch.Tensor:
    """S_i: the thumbnail scores sg [side_h, side_w] summed over crop i's block (row-major, [nph * npw])."""
    side_h, side_w = sg.shape
    bh, bw = max(side_h // nph, 1), max(side_w // npw, 1)
    r = (torch.arange(side_h) // bh).clamp(max=nph - 1)
    c = (torch.arange(side_w) // bw).clamp(max=npw - 1)
    region = (r[:, None] * npw + c[None, :]).flatten()
    return torch.zeros(nph * npw, dtype=torch.float64).index_add_(0, region, sg.flatten().double().cpu())


def crop_ratios(S: torch.Tensor, retention: float, temperature: float = 10.0) -> torch.Tensor:
    """r_i = min(1, R * (1 + softmax(S / T)_i - 1/N)), float64 [N]."""
    S = S.double()
    sigma = torch.softmax(S / temperature, 0)
    return (retention * (1.0 + sigma - 1.0 / S.numel())).clamp(max=1.0)


@register
@dataclass
class GlobalCom2(VisionPress):
    """GlobalCom²: thumbnail-guided compression of AnyRes image crops (arXiv 2501.05179)."""

    name: ClassVar[str] = "globalcom2"
    aliases: ClassVar[tuple[str, ...]] = ("globalcom",)
    main: ClassVar[str] = "retention"

    retention: float = 0.25
    temperature: float = 10.0
    allocation: str = "thumbnail"

    ALLOCATIONS: ClassVar[tuple[str, ...]] = ("thumbnail", "uniform")

    def validate(self):
        check(isinstance(self.retention, (int, float)) and not isinstance(self.retention, bool)
              and 0.0 < self.retention <= 1.0,
              f"globalcom2: retention (fraction of image tokens kept) must be in (0, 1], got {self.retention!r}")
        check(isinstance(self.temperature, (int, float)) and self.temperature > 0,
              f"globalcom2: temperature must be positive, got {self.temperature!r}")
        check(self.allocation in self.ALLOCATIONS,
              f"globalcom2: allocation must be one of {', '.join(self.ALLOCATIONS)} (thumbnail: the paper's "
              f"per-crop budgets; uniform: the same fraction in every crop), got {self.allocation!r}")

    def check_input(self, kind: str, adapter) -> None:
        """Refuse a video, or a family whose adapter gives no per-view scores (before any work)."""
        if kind != "image":
            raise InputError("globalcom2 compresses AnyRes images (thumbnail + crops); this input is a video. "
                             "Use pvc, evs, pool or random for videos")
        if not getattr(adapter, "image_view_scores", False):
            fam = getattr(adapter, "family", "") or "this model"
            raise InputError(f"globalcom2 needs per-view attention scores of an AnyRes image, which the {fam} "
                             "adapter does not provide; supported families: llava_next, llava_onevision")

    def compress(self, tokens: VisualTokens, ctx: VisionContext) -> VisualTokens:
        self.check_input(tokens.kind, getattr(ctx, "adapter", None))
        meta = tokens.meta
        if "view_scores" not in meta:
            raise InputError("globalcom2 needs per-view attention scores of an AnyRes image; this image has none")
        scores = meta["view_scores"].float().cpu()                 # [V, side_h * side_w]
        side_h, side_w = meta["base_grid"]
        nph, npw = meta.get("crop_grid", (0, 0))
        if scores.shape[1] != side_h * side_w:
            raise RuntimeError(f"view scores have {scores.shape[1]} patches, expected {side_h} x {side_w}")
        R = float(self.retention)
        rows = tokens.is_patch.nonzero().squeeze(1)
        c = tokens.coords[rows].cpu()
        sg = scores[0].view(side_h, side_w)
        keep = []
        # 1. thumbnail
        base = c[:, 0] == 0
        b_rows, bc = rows[base], c[base]
        s_base = sg[bc[:, 1], bc[:, 2]]
        keep.append(b_rows[torch.topk(s_base, int(b_rows.numel() * R)).indices.to(rows.device)])
        crop = c[:, 0] == 1
        if nph * npw == 0 or not bool(crop.any()):
            ctx.stats["globalcom2_crop_ratios"] = []
            return tokens.subset(torch.cat(keep).sort().values)
        # 2. per-crop budgets from the thumbnail
        if self.allocation == "uniform":
            ratios = torch.full((nph * npw,), R, dtype=torch.float64)
        else:
            ratios = crop_ratios(region_sums(sg, nph, npw), R, self.temperature)
        ctx.stats["globalcom2_crop_ratios"] = [round(float(r), 4) for r in ratios]
        # 3. within-crop scores: own scores + upsampled thumbnail scores over the unpadded grid
        c_rows, cc = rows[crop], c[crop]
        h, w = cc[:, 1], cc[:, 2]
        h0, w0 = int(h.min()), int(w.min())
        up = F.interpolate(sg[None, None], size=(int(h.max()) - h0 + 1, int(w.max()) - w0 + 1), mode="bilinear",
                           align_corners=False)[0, 0]
        g = up[h - h0, w - w0]
        crop_id = (h // side_h).clamp(max=nph - 1) * npw + (w // side_w).clamp(max=npw - 1)
        local = scores[1 + crop_id, (h % side_h) * side_w + (w % side_w)]
        for i in range(nph * npw):
            m = crop_id == i
            n_i = int(m.sum())
            if n_i == 0:
                continue
            comb = F.normalize(local[m], dim=0) + F.normalize(g[m], dim=0)
            k_i = int(n_i * float(ratios[i]))
            keep.append(c_rows[m.to(c_rows.device)][torch.topk(comb, k_i).indices.to(rows.device)])
        return tokens.subset(torch.cat(keep).sort().values)
