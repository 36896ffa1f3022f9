"""PVC, training-free: progressive visual-token compression of a video, frame by frame.

Paper: Yang et al., "PVC: Progressive Visual Token Compression for Unified Image and Video
Processing in Large Vision-Language Models", CVPR 2025, arXiv 2412.09613. The published PVC is a
TRAINED InternVL2 variant (causal temporal attention and AdaLN inside the ViT, 64 tokens per
frame); its weights cannot be used with other models. This press implements the paper's principle
without training: each frame adds only what earlier frames did not already give.

Algorithm (per temporal slot t, in order; a slot is one frame, or Qwen's pair of frames):
1. Memory. For every spatial position j the state holds the content last accounted for at j
   (`ref_j`: the last token kept at j, or the last NEW token at j that the budget dropped and
   merged into a kept one) and the kept token that represents j to the language model
   (`ref_id_j`: that kept token, or the merge target) - one [H*W, D] table, like PVC's temporal
   attention, which looks at the same spatial position in earlier frames only.
2. Novelty. n_j = 1 - cos(x_tj, ref_j); positions with no representative yet (the first slot)
   have n_j = 2, the largest cosine distance. Comparing against what was accounted for and not
   against the previous frame (as EVS does) makes slow drift accumulate until it is kept: a token
   dropped as not new (n_j <= threshold) leaves the memory as it was.
3. Selection. Keep the tokens with n_j > `threshold`, at most `cap` per slot and at least
   `min_keep`, the most novel first; ties (the whole first slot) go to the tokens least similar
   to the slot's mean token (the distinctive ones). New tokens the cap drops are accounted for by
   their merge target (step 1), so static content costs nothing after its first appearance under
   every setting: a video of identical frames keeps tokens in its first slot only.
   Content that returns (A, then B, then A again at the same positions) is new against the
   memory, which holds B, and is kept again: the model's last view of those positions is B, and
   only a kept token can tell it that A is back (dropping it would say B persists).
4. Merging (`merge=True`). Every dropped token is averaged (weighted by the number of original
   tokens each stands for) into its nearest kept token: the most similar, by cosine, of (a) the
   representative of its own position (similarity to the content accounted for there) and (b)
   the tokens kept from its own slot. Merged embeddings are written once the video ends
   (`finish`); until then the state keeps running sums, so memory is the [H*W, D] table plus the
   kept tokens, never the whole video.
5. Kept tokens keep their original (t, h, w) positions (the pipeline's invariant).

Caps: `budget` tokens per slot (`first` for the first slot), or with `ratio` a fraction of the
tokens over the whole video: slot t may keep ceil(ratio x S_t) - K_(t-1) tokens, S_t the patch
tokens of slots 0..t and K_(t-1) the tokens kept before it. What a slot leaves unused (the
rounding remainder, and all of it while nothing changes) carries over to later slots, so the
video keeps at most ceil(ratio x its tokens) however small the grid, spent where frames change
(rounding up in every slot kept 25-33% of 3- and 4-token grids at ratio=0.125, while a
per-slot floor left the slot where a needle appears with no token at all). The first slot is
included unless `first` is given. Stats: `pvc_seen_tokens`, `pvc_dropped_tokens`, `pvc_kept_fraction` (kept / seen).

Defaults: budget=64 tokens per slot (the paper's 64 per frame); first=4*budget (PVC spends 4 x 64
tokens on a static image: the first slot of a video is the picture before anything changes);
ratio=None (e.g. `pvc:ratio=0.25`: a budget that means the same on every model, which the
presets use); threshold=0.1 (cosine similarity 0.9: a choice, the paper has no threshold; tune it
per model, see docs/vision.md); min_keep=0; merge=True. Images are one frame: left untouched
unless `images=True`, which compresses each view of the image on its own as a first slot.

Deviations from PVC (necessarily, as there is no training): no temporal attention or AdaLN in
the vision tower, no repetition of images into 4-frame static videos; the per-frame budget is an
upper bound reached only when that many tokens are new (PVC always emits exactly 64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..stages import check, register
from .base import VisionContext, VisionPress, VisualTokens

UNSEEN = 2.0  # novelty of a position with no representative yet (the largest cosine distance)
ROUNDING = 1e-6  # novelty below this is float32 rounding of identical vectors: 0 (so threshold=0 works)


class _Rows:
    """A growable [n, D] float32 tensor (capacity doubles), for running sums of kept tokens."""

    def __init__(self, dim: int, device):
        self.data = torch.zeros(64, dim, device=device)
        self.w = torch.zeros(64, device=device)
        self.n = 0

    def append(self, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        if self.n + n > self.data.shape[0]:
            cap = max(2 * self.data.shape[0], self.n + n)
            self.data = torch.cat([self.data, self.data.new_zeros(cap - self.data.shape[0], self.data.shape[1])])
            self.w = torch.cat([self.w, self.w.new_zeros(cap - self.w.shape[0])])
        ids = torch.arange(self.n, self.n + n, device=rows.device)
        self.data[self.n:self.n + n] = rows * w[:, None]
        self.w[self.n:self.n + n] = w
        self.n += n
        return ids

    def add(self, ids: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> None:
        self.data.index_add_(0, ids, rows * w[:, None])
        self.w.index_add_(0, ids, w)


@dataclass
class PVCState:
    ref: torch.Tensor | None = None       # [P, D] unit vectors of the content accounted for at each position
    ref_id: torch.Tensor | None = None    # [P] long, kept-token id representing each position (-1: none)
    sums: _Rows | None = None             # running weighted sums of the tokens merged into each kept token
    kept_index: list = field(default_factory=list)  # original indices of the kept tokens, per slot
    slots: int = 0                        # slots processed
    dropped: int = 0                      # tokens dropped (and merged into kept ones when merge=True)
    seen: int = 0                         # patch tokens seen
    ratio_seen: int = 0                   # patch tokens of the slots capped by `ratio`
    ratio_kept: int = 0                   # tokens kept in those slots
    passthrough: bool = False


def _slot_rows(tokens: VisualTokens) -> list[torch.Tensor]:
    """Row indices of the patch tokens of each temporal slot, in sequence order."""
    rows = tokens.is_patch.nonzero().squeeze(1)
    if rows.numel() == 0:
        return []
    t = tokens.coords[rows, 0]
    return [rows[t == s] for s in torch.unique_consecutive(t).tolist()]


@register
@dataclass
class PVC(VisionPress):
    """PVC (training-free): each frame keeps only what earlier frames did not give (arXiv 2412.09613)."""

    name: ClassVar[str] = "pvc"
    main: ClassVar[str] = "budget"
    streaming: ClassVar[bool] = True

    budget: int = 64
    first: int | None = None
    ratio: float | None = None
    threshold: float = 0.1
    min_keep: int = 0
    merge: bool = True
    images: bool = False

    def validate(self):
        check(isinstance(self.budget, int) and not isinstance(self.budget, bool) and self.budget >= 1,
              f"pvc: budget (tokens per frame) must be an integer >= 1, got {self.budget!r}")
        check(self.first is None or (isinstance(self.first, int) and self.first >= 1),
              f"pvc: first (tokens of the first frame) must be an integer >= 1 or none, got {self.first!r}")
        check(0.0 <= self.threshold < 2.0,
              f"pvc: threshold is a cosine distance and must be in [0, 2), got {self.threshold}")
        check(self.ratio is None or 0.0 < self.ratio <= 1.0,
              f"pvc: ratio (fraction of each slot's tokens kept at most) must be in (0, 1], got {self.ratio!r}")
        check(isinstance(self.min_keep, int) and 0 <= self.min_keep <= self.budget,
              f"pvc: min_keep must be an integer in [0, budget={self.budget}], got {self.min_keep!r}")

    @property
    def first_budget(self) -> int:
        return 4 * self.budget if self.first is None else self.first

    # ------------------------------------------------------------------ streaming
    def start(self, ctx: VisionContext) -> PVCState:
        return PVCState()

    def step(self, chunk: VisualTokens, state: PVCState, ctx: VisionContext) -> VisualTokens:
        if chunk.kind == "image" and not self.images:
            state.passthrough = True
            return chunk
        _, H, W = chunk.grid
        keep_rows = []
        for rows in _slot_rows(chunk):
            first = state.slots == 0
            if chunk.kind == "image":  # every view of an image is compressed on its own, as a first slot
                state.ref, first = None, True
            keep_rows.append(self._slot(chunk, rows, H, W, state, first))
        if not keep_rows:
            return chunk
        keep = torch.cat(keep_rows).sort().values
        return chunk.subset(keep)

    def finish(self, tokens: VisualTokens, state: PVCState, ctx: VisionContext) -> VisualTokens:
        if state.passthrough or state.sums is None:
            return tokens
        ctx.stats["pvc_dropped_tokens"] = ctx.stats.get("pvc_dropped_tokens", 0) + state.dropped
        seen = ctx.stats.get("pvc_seen_tokens", 0) + state.seen
        ctx.stats["pvc_seen_tokens"] = seen
        ctx.stats["pvc_kept_fraction"] = 1.0 - ctx.stats["pvc_dropped_tokens"] / max(seen, 1)
        if not self.merge:
            return tokens
        kept = torch.cat(state.kept_index)                          # [n_kept], increasing
        rows = tokens.is_patch.nonzero().squeeze(1)
        pos = torch.searchsorted(kept, tokens.index[rows])
        pos = pos.clamp(max=kept.numel() - 1)
        ours = kept[pos] == tokens.index[rows]       # rows PVC kept (all of them unless a later press dropped some)
        rows, pos = rows[ours], pos[ours]
        w = state.sums.w[pos]
        embeds = tokens.embeds.clone()
        weight = tokens.weight.clone()
        embeds[rows] = (state.sums.data[pos] / w[:, None]).to(embeds.dtype)
        weight[rows] = w.to(weight.dtype)
        return replace(tokens, embeds=embeds, weight=weight)

    # ------------------------------------------------------------------ one slot
    def _cap(self, n: int, first: bool, st: PVCState) -> int:
        """Most tokens a slot of `n` patch tokens may keep: `first` / `budget`, or with `ratio` what
        is left of ceil(ratio x the tokens so far) after the tokens kept before."""
        if first and self.first is not None:
            return self.first
        if self.ratio is None:
            return self.first_budget if first else self.budget
        st.ratio_seen += n
        return max(0, math.ceil(self.ratio * st.ratio_seen - 1e-9) - st.ratio_kept)

    def _slot(self, tok: VisualTokens, rows: torch.Tensor, H: int, W: int, st: PVCState, first: bool) -> torch.Tensor:
        """Choose the kept rows of one slot, update the memory and merge the dropped rows."""
        x = tok.embeds[rows].float()                                # [n, D]
        xn = F.normalize(x, dim=-1)
        w = tok.weight[rows].float()
        pos = tok.coords[rows, 1] * W + tok.coords[rows, 2]         # [n] spatial position
        if st.ref is None:
            st.ref = torch.zeros(H * W, x.shape[1], device=x.device)
            st.ref_id = torch.full((H * W,), -1, dtype=torch.long, device=x.device)
        if st.sums is None:
            st.sums = _Rows(x.shape[1], x.device)
        rid = st.ref_id[pos]
        has_ref = rid >= 0
        sim_ref = (xn * st.ref[pos]).sum(-1)
        nov = torch.where(has_ref, 1.0 - sim_ref, torch.full_like(sim_ref, UNSEEN))
        nov = nov.masked_fill(nov < ROUNDING, 0.0)
        # order: most novel first; ties to the most distinctive (least similar to the slot mean)
        distinct = 1.0 - xn @ F.normalize(x.mean(0), dim=0)
        order = torch.sort(distinct, descending=True, stable=True).indices
        order = order[torch.sort(nov[order], descending=True, stable=True).indices]
        cap = self._cap(len(rows), first, st)
        n_new = int((nov > self.threshold).sum())
        k = min(len(order), max(min(cap, n_new), self.min_keep))
        keep, drop = order[:k].sort().values, order[k:]
        if self.ratio is not None and not (first and self.first is not None):
            st.ratio_kept += k
        st.slots += 1
        st.seen += len(rows)
        st.kept_index.append(tok.index[rows[keep]])
        ids = st.sums.append(x[keep], w[keep])
        if drop.numel():
            st.dropped += int(drop.numel())
            # nearest kept token: the representative of its position, or a token kept from this slot
            best_ref = torch.where(has_ref[drop], sim_ref[drop], torch.full_like(sim_ref[drop], -2.0))
            if k:
                sim_keep = xn[drop] @ xn[keep].T                    # [n_drop, k]
                best_keep, arg = sim_keep.max(1)
                use_ref = best_ref >= best_keep
                target = torch.where(use_ref, rid[drop], ids[arg])
            else:
                target = rid[drop]
            ok = target >= 0                                         # always true unless nothing is kept and no ref
            if self.merge:
                st.sums.add(target[ok], x[drop][ok], w[drop][ok])
            # new content the cap dropped (all of it where j had no representative) is accounted
            # for: j now shows it, through its merge target; identical content later costs nothing
            new = (nov[drop] > self.threshold) & ok
            st.ref[pos[drop][new]] = xn[drop][new]
            st.ref_id[pos[drop][new]] = target[new]
        st.ref[pos[keep]] = xn[keep]
        st.ref_id[pos[keep]] = ids
        return rows[keep]
