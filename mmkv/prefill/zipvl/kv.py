"""ZipVL's KV cache (arXiv 2410.08584, steps 6-7): the important tokens at `bits_high` and the
rest at `bits_low` (v1, kv="mixed") or evicted (v2, kv="evict"), classified once per prefill and
again every `every` generated tokens from those tokens' own queries."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...cache.core import QuantSegment
from ...cache.quant import quantize, quantize_channel_separable
from .budget import adaptive_budget, select_important


@dataclass
class ZipSegment(QuantSegment):
    """A QuantSegment whose values are channel-scaled (ChannelScaledQuant); attention reads it
    through the PyTorch block path (fused kernels do not know the channel scale)."""

    fused_attention = None


def compress_layer(policy, layer, a: torch.Tensor | None, nnz: torch.Tensor | None, done: int | None,
                   idx: int) -> tuple[int, int]:
    """Classify the layer's entries at sequence index >= `done` (all of them when None) by the
    recorded probe scores a / nnz (by sequence index). Returns (important, classified)."""
    if layer.segments and done is None:
        raise RuntimeError("zipvl: the cache is already compressed by another stage; ZipVL's KV compression "
                           "needs the full cache (use zipvl:kv=none to combine it with other KV presses)")
    pos = layer.pos
    if not bool((pos == pos[:1]).all()):
        raise RuntimeError("zipvl: the layer's heads hold different tokens; ZipVL selects per layer")
    rpos = pos[0].long()
    entries = (rpos >= (done or 0)).nonzero().squeeze(1)
    if entries.numel() == 0:
        return 0, 0
    if a is None or a.numel() < layer.seen:
        if done is None:
            raise RuntimeError(f"zipvl: no probe scores were recorded for layer {idx}")
        return 0, 0  # tokens prefilled over an already compressed cache stay in full precision
    sel = rpos[entries].to(a.device)
    p = adaptive_budget(a[sel], policy.tau, policy.ratio)
    keep = entries[select_important(a[sel], nnz[sel], p).to(entries.device)]
    with layer.quantizing():  # a NonFiniteError names the layer
        store(policy, layer, keep, entries)
    return p, int(entries.numel())


def store(policy, layer, keep: torch.Tensor, entries: torch.Tensor) -> None:
    """Of the residual entries `entries` (indices, sorted), quantize (mixed) or keep (evict) the
    important ones `keep` (a subset); other residual entries stay as they are."""
    dev = layer.keys.device
    keep, entries = keep.to(dev), entries.to(dev)
    is_kept = torch.zeros(layer.residual_len, dtype=torch.bool, device=dev)
    is_kept[keep] = True
    in_set = torch.zeros_like(is_kept)
    in_set[entries] = True
    if policy.kv == "evict":
        layer.select((~in_set | is_kept).nonzero().squeeze(1))
        return
    segs = []
    for mask, bits in ((is_kept, policy.bits_high), (in_set & ~is_kept, policy.bits_low)):
        sel = mask.nonzero().squeeze(1)
        if sel.numel():
            segs.append(segment(policy, layer.keys[:, :, sel], layer.values[:, :, sel], layer.pos[:, sel], bits))
    rest = (~in_set).nonzero().squeeze(1)
    layer.segments = layer.segments + segs
    layer.set_residual(layer.keys[:, :, rest], layer.values[:, :, rest], layer.pos[:, rest])


def segment(policy, k, v, pos, bits):
    """One precision class: keys per channel over the class's tokens, values channel-separable
    per token (ZipCache) or plain per token (values="token")."""
    kq = quantize(k, bits, k.shape[2], "channel")  # one min-max per channel over the class's tokens
    if policy.values == "channel_separable":
        return ZipSegment(kq, quantize_channel_separable(v, bits), pos, label=f"int{bits}")
    return QuantSegment(kq, quantize(v, bits, v.shape[-1], "token"), pos, label=f"int{bits}")


def lse_over_layer(layer, q: torch.Tensor, qpos: torch.Tensor, scaling: float):
    """Logits of q [B, Hq, m, D] (at sequence indices qpos [m]) over every entry of `layer`,
    causal by sequence index; returns (lse [B, Hq, m], residual logits [B, Hq, m, R])."""
    b, hq, m, d = q.shape
    hk = layer.keys.shape[1]
    g = hq // hk
    qg = q.float().reshape(b, hk, g * m, d)

    def logits(k, pos):
        s = torch.matmul(qg, k.float().transpose(-1, -2)).view(b, hk, g, m, -1) * scaling
        s = s.masked_fill(~(pos[None, :] <= qpos[:, None]), float("-inf"))
        return s.view(b, hq, m, -1)

    lses = []
    for seg in layer.segments:  # ZipVL's own segments: keys are one channel-wise group, read whole
        kb = seg.keys.dequantize(torch.float32)
        lses.append(torch.logsumexp(logits(kb, seg.pos[0].to(q.device)), -1))
    res = logits(layer.keys, layer.pos[0].to(q.device))
    lses.append(torch.logsumexp(res, -1))
    return torch.logsumexp(torch.stack(lses), 0), res


def reselect(policy, layer, q: torch.Tensor, scaling: float) -> tuple[int, int]:
    """Steps 3-4 on the m newest tokens, scored by their own m queries over every entry."""
    m = q.shape[2]
    first = layer.seen - m                                              # sequence index of the first new token
    qpos = torch.arange(first, layer.seen, device=q.device)
    lse, res_logits = lse_over_layer(layer, q, qpos, scaling)
    rpos = layer.pos[0].to(q.device)
    new = (rpos >= first).nonzero().squeeze(1)                           # residual entries of the new tokens
    received = torch.exp(res_logits[..., new] - lse.unsqueeze(-1)).sum((0, 1, 2))  # [len(new)]
    nnz = (layer.seen - rpos[new]).float()                               # queries at or after each new token
    p = adaptive_budget(received, policy.tau, policy.ratio)
    keep = new[select_important(received, nnz, p)]
    store(policy, layer, keep, new)
    return p, int(new.numel())
