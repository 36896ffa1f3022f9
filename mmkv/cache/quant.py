"""Bit packing and group-wise min-max quantization of KV tensors (the KIVI layout).

Layout: a KV tensor is [B, H, T, D] (batch, KV heads, tokens, head dim).

- axis="channel": statistics over `group` consecutive tokens of one channel (KIVI keys).
  scale/zero: [B, H, T // group, D]. T must be a multiple of `group`.
- axis="token": statistics over `group` consecutive channels of one token (KIVI values).
  scale/zero: [B, H, T, D // group]. D must be a multiple of `group`.

Codes are packed along D, `8 // bits` codes per byte, little end first: byte = sum_i c_i << (bits * i).
Scales and zeros are stored in fp16 and the codes are computed against the stored (rounded)
values, so the reconstruction error of every element is at most scale / 2 (checked in tests).
Stored tensors are never modified in place: `cat` builds new ones, so a shallow copy of a cache
is a snapshot (see `CompressedCache.clone`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PACKABLE_BITS = (1, 2, 4, 8)
STAT_DTYPE = torch.float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2**bits) along the last dim -> packed uint8 [..., ceil(D * bits / 8)]."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"pack supports bits in {PACKABLE_BITS}, got {bits}")
    per = 8 // bits
    d = codes.shape[-1]
    pad = (-d) % per
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(*c.shape[:-1], -1, per)  # [..., D/per, per]
    shifts = torch.arange(per, device=c.device, dtype=torch.uint8) * bits
    return (c << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)  # bit fields do not overlap


def unpack(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 [..., P] -> uint8 codes [..., d]."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"unpack supports bits in {PACKABLE_BITS}, got {bits}")
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    c = (packed.unsqueeze(-1) >> shifts) & mask  # [..., P, per]
    return c.reshape(*packed.shape[:-1], -1)[..., :d]


def _group_view(x: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    """[B, H, T, D] -> grouped view with the reduced dim last-but-... see callers."""
    b, h, t, d = x.shape
    if axis == "channel":
        if t % group:
            raise ValueError(f"channel-wise groups need T % group == 0, got T={t}, group={group}")
        return x.view(b, h, t // group, group, d)  # reduce over dim 3
    if axis == "token":
        if d % group:
            raise ValueError(f"token-wise groups need D % group == 0, got D={d}, group={group}")
        return x.view(b, h, t, d // group, group)  # reduce over dim 4
    raise ValueError(f"axis must be 'channel' or 'token', got {axis!r}")


def _red_dim(axis: str) -> int:
    return 3 if axis == "channel" else 4


class PackedCodes:
    """Shared by the packed tensor formats: `codes` [B, H, T, packed D] and `head_dim` D."""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, t, _ = self.codes.shape
        return b, h, t, self.head_dim

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2]


@dataclass
class QuantTensor(PackedCodes):
    """A [B, H, T, D] tensor stored as packed min-max codes with fp16 scale and zero per group."""

    codes: torch.Tensor  # uint8 [B, H, T, ceil(D * bits / 8)]
    scale: torch.Tensor  # fp16, see module docstring
    zero: torch.Tensor   # fp16, same shape as scale
    bits: int
    group: int
    axis: str
    head_dim: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Reconstruct tokens [start, end) as [B, H, n, D] in `dtype`."""
        end = self.num_tokens if end is None else end
        if self.axis == "channel" and (start % self.group or (end % self.group and end != self.num_tokens)):
            raise ValueError("channel-wise slices must start and end on group boundaries")
        q = unpack(self.codes[:, :, start:end], self.bits, self.head_dim).float()  # [B, H, n, D]
        if self.axis == "channel":
            g0, g1 = start // self.group, -(-end // self.group)
            s = self.scale[:, :, g0:g1].float().repeat_interleave(self.group, dim=2)[:, :, : end - start]
            z = self.zero[:, :, g0:g1].float().repeat_interleave(self.group, dim=2)[:, :, : end - start]
        else:
            s = self.scale[:, :, start:end].float().repeat_interleave(self.group, dim=3)
            z = self.zero[:, :, start:end].float().repeat_interleave(self.group, dim=3)
        return (q * s + z).to(dtype)

    def cat(self, other: "QuantTensor") -> "QuantTensor":
        """A new QuantTensor holding self's tokens then other's (same format)."""
        if (self.bits, self.group, self.axis, self.head_dim) != (other.bits, other.group, other.axis, other.head_dim):
            raise ValueError("cannot concatenate quantized tensors of different formats")
        return QuantTensor(torch.cat([self.codes, other.codes], 2), torch.cat([self.scale, other.scale], 2),
                           torch.cat([self.zero, other.zero], 2), self.bits, self.group, self.axis, self.head_dim)

    def select(self, idx: torch.Tensor) -> "QuantTensor":
        """Keep tokens `idx` ([H, k] per head, or [k]); only for token-wise groups."""
        if self.axis != "token":
            raise ValueError("only token-wise quantized tensors can be subset by token")
        return QuantTensor(_take(self.codes, idx), _take(self.scale, idx), _take(self.zero, idx),
                           self.bits, self.group, self.axis, self.head_dim)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, ...], idx [H, k] or [k] -> x[:, h, idx[h]]."""
    if idx.dim() == 1:
        return x.index_select(2, idx)
    b, h = x.shape[:2]
    gi = idx.view(1, h, -1, *([1] * (x.dim() - 3))).expand(b, h, idx.shape[-1], *x.shape[3:])
    return x.gather(2, gi)


def quantize(x: torch.Tensor, bits: int, group: int, axis: str) -> QuantTensor:
    """Asymmetric min-max quantization of x [B, H, T, D] into `bits`-bit codes per group.

    Guarantees |x - dequantize(quantize(x))| <= scale / 2 elementwise (scale as stored, fp16).
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    b, h, t, d = x.shape
    levels = (1 << bits) - 1
    xg = _group_view(x.float(), group, axis)
    rd = _red_dim(axis)
    mn = xg.amin(rd, keepdim=True)
    mx = xg.amax(rd, keepdim=True)
    # Round the stored statistics so that [zero, zero + levels * scale] still covers [min, max].
    zero = mn.to(STAT_DTYPE)
    low = zero.float() > mn
    if low.any():
        zero = torch.where(low, torch.nextafter(zero, torch.full_like(zero, -float("inf"))), zero)
    scale = ((mx - zero.float()) / levels).to(STAT_DTYPE)
    short = zero.float() + levels * scale.float() < mx
    if short.any():
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s = scale.float()
    q = torch.where(s > 0, (xg - zero.float()) / s.clamp_min(1e-30), torch.zeros_like(xg))
    q = q.round_().clamp_(0, levels).to(torch.uint8).view(b, h, t, d)
    return QuantTensor(pack(q, bits), scale.squeeze(rd), zero.squeeze(rd), bits, group, axis, d)


@dataclass
class ChannelScaledQuant:
    """ZipCache's "channel-separable token-wise" quantization (He et al., arXiv 2405.14256), used by
    ZipVL's mixed-precision values: x is divided by a per-channel scale c = sqrt(max_t |x|) (over
    the tokens quantized together, one per head and channel), then quantized per token with min-max
    over the head dim; x ~= dequant(inner) * c. The channel scale tames outlier channels that
    per-token statistics alone would spread over every code.

    Same interface as QuantTensor (num_tokens, nbytes, dequantize, select); it has no packed-code
    attributes of its own, so fused kernels that read a QuantTensor's fields never mistake it
    for one."""

    inner: QuantTensor          # token-wise codes of x / c
    channel_scale: torch.Tensor  # fp16 [B, H, 1, D]

    @property
    def bits(self) -> int:
        return self.inner.bits

    @property
    def axis(self) -> str:
        return "token"

    @property
    def group(self) -> int:
        return self.inner.group

    @property
    def head_dim(self) -> int:
        return self.inner.head_dim

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.inner.shape

    @property
    def num_tokens(self) -> int:
        return self.inner.num_tokens

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.channel_scale.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        return (self.inner.dequantize(torch.float32, start, end) * self.channel_scale.float()).to(dtype)

    def cat(self, other: "ChannelScaledQuant") -> "ChannelScaledQuant":
        raise ValueError("channel-scaled tensors have their own channel scales and cannot be concatenated; "
                         "keep them as separate segments")

    def select(self, idx: torch.Tensor) -> "ChannelScaledQuant":
        return ChannelScaledQuant(self.inner.select(idx), self.channel_scale)


def quantize_channel_separable(x: torch.Tensor, bits: int) -> ChannelScaledQuant:
    """x [B, H, T, D] -> ChannelScaledQuant: c = sqrt(max over T of |x|) per (B, H, channel), stored in
    fp16 (zero channels get c = 1), then per-token min-max over D of x / c (with c as stored).
    Error bound: |x - dequant| <= c * scale / 2 elementwise."""
    c = x.float().abs().amax(2, keepdim=True).sqrt()                      # [B, H, 1, D]
    c = torch.where(c > 0, c, torch.ones_like(c)).to(STAT_DTYPE)
    c = torch.where(c.float() > 0, c, torch.ones_like(c))                  # fp16 underflow
    return ChannelScaledQuant(quantize(x.float() / c.float(), bits, x.shape[-1], "token"), c)
