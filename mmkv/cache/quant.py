"""Bit packing and group-wise min-max quantization of KV tensors (the KIVI layout).

Layout: a KV tensor is [B, H, T, D] (batch, KV heads, tokens, head dim).

- axis="channel": statistics over `group` consecutive tokens of one channel (KIVI keys).
  scale/zero: [B, H, T // group, D]. T must be a multiple of `group`.
- axis="token": statistics over `group` consecutive channels of one token (KIVI values).
  scale/zero: [B, H, T, D // group]. D must be a multiple of `group`.

Codes are packed along D, `8 // bits` codes per byte, little end first: byte = sum_i c_i << (bits * i).
Scales and zeros are stored in fp16 and the codes are computed against the stored (rounded)
values, so the reconstruction error of every element is at most scale / 2 (checked in tests).
Values beyond fp16's range (+-65504, possible in bf16 models) are clipped to it first (here and
in `lowbit`), so statistics never overflow to inf.

8-bit statistics (`stats=8`, 1- and 2-bit codes in per-channel groups): at 2 bits and groups of 32 tokens, an fp16
scale and zero cost 1 bit per element, a third of the total. With `stats=8` each costs a byte,
against a per-(batch, head, channel) fp16 `anchor` [B, H, 2, D] fixed when the tensor is created:
anchor[:, :, 0] = the channel's center c (its mean over the tokens), anchor[:, :, 1] = a scale
reference r (the largest group scale the channel needs then).
- scale = r * 2 ** ((code - 191) / 32), a uint8 code (0 = zero scale): 32 steps per octave from
  r / 61 to 4 r, rounded up so the group's range stays covered (at most 2.2% coarser);
- zero = c + scale * code / 16, an int8 code, rounded down; the scale is chosen large enough that
  [zero, zero + levels * scale] covers the group's [min, max] with that slack (2% at 2 bits) and
  the offset (min - c) fits 127 codes (a group far from its channel's center, relative to its own
  spread, gets a coarser step; nothing is clipped).
So the grid is at most ~4% coarser than with fp16 statistics; the bound |x - dequant| <= scale / 2
holds with the stored scale. Groups added later (decode time) reuse the anchor (pass `anchor=`);
one needing more than 4 r (four times the largest spread seen at creation) is clipped to 4 r;
one needing less than r / 61 gets r / 61.

`log8` (`log8_encode` / `log8_decode`) is the anchor-free 8-bit format used for the positive
mean|x| scales of the 1-bit and ternary formats (`lowbit`): 2 ** ((code - 128) / 8), 8 steps per
octave over fp16's normal range, at most 4.4% off (rounded to nearest).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

PACKABLE_BITS = (1, 2, 4, 8)
STAT_DTYPE = torch.float16
FP16_MAX = 65504.0


class NonFiniteError(InputError):
    """Keys or values to quantize hold NaN or +-inf. No quantized format can carry them (the 8-bit
    statistics have no code for NaN, and min-max or mean|x| statistics would spread one NaN over
    its whole group, or clip an inf to a finite value), so quantizing refuses them; `layer` is the
    decoder layer, when the cache knows it (`KVLayer.quantizing`)."""

    def __init__(self, message: str, layer: int | None = None):
        super().__init__(message if layer is None else f"layer {layer}: {message}")
        self.layer = layer


def check_finite(x: torch.Tensor) -> None:
    """Raise NonFiniteError if x holds NaN or inf (one reduction; a device sync on a GPU)."""
    if not bool(torch.isfinite(x).all()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise NonFiniteError(f"the keys or values to quantize hold {n_nan} NaN and {n_inf} inf of {x.numel()} "
                             "entries: the model's activations overflowed or were NaN already (a quantized "
                             "cache cannot carry them; without a quantizing KV press they propagate as usual)")


def _finite16(x: torch.Tensor) -> torch.Tensor:
    """x as fp32, clipped to fp16's finite range (the statistics are fp16 or anchored to fp16):
    keys or values beyond +-65504 (possible in bf16 models) are clipped, never turned into inf."""
    return x.float().clamp(-FP16_MAX, FP16_MAX)


LOG8_STEPS = 8       # log8 codes per octave: value = 2 ** ((code - 128) / LOG8_STEPS), code 0 = 0
SCALE8_STEPS = 32    # anchored scale codes per octave: scale = ref * 2 ** ((code - SCALE8_ONE) / SCALE8_STEPS)
SCALE8_ONE = 191     # the code of scale = ref (codes up to 255 give up to 4 ref)
ZERO8_STEPS = 16     # int8 zero codes per scale: zero = center + scale * code / ZERO8_STEPS


def log8_encode(x: torch.Tensor, up: bool = False) -> torch.Tensor:
    """Non-negative x -> uint8 log codes: 0 for x <= 0, else 128 + LOG8_STEPS * log2(x) rounded
    (to nearest in the log domain, or up when `up`, so that decode >= x), clamped to [1, 255]
    (2**-15.9 .. 2**15.9, about fp16's normal range). Relative error <= 2**(1/16) - 1 = 4.4%."""
    x = x.float()
    lg = torch.log2(x.clamp_min(1e-38)) * LOG8_STEPS
    c = ((torch.ceil(lg) if up else torch.round(lg)) + 128).clamp(1, 255)
    if up:  # rounding in exp2: make sure decode(c) >= x
        c = torch.where(log8_decode(c) < x, c + 1, c).clamp(1, 255)
    return torch.where(x > 0, c, torch.zeros_like(c)).to(torch.uint8)


_TABLES: dict = {}


def _table(kind: str, device) -> torch.Tensor:
    """fp32 [256] decode tables, computed once in float64: "log8": 2 ** ((c - 128) / 8);
    "scale8": 2 ** ((c - SCALE8_ONE) / SCALE8_STEPS); code 0 decodes to 0. A table lookup gives
    every code the same value wherever it sits (a vectorized exp2 may differ in the last bit)."""
    key = (kind, str(device))
    if key not in _TABLES:
        c = torch.arange(256, dtype=torch.float64)
        v = torch.exp2((c - 128) / LOG8_STEPS) if kind == "log8" else torch.exp2((c - SCALE8_ONE) / SCALE8_STEPS)
        v[0] = 0.0
        _TABLES[key] = v.float().to(device)
    return _TABLES[key]


def log8_decode(c: torch.Tensor) -> torch.Tensor:
    """log8 codes (uint8, or float holding integers in [0, 255]) -> fp32 values (0 for code 0)."""
    return _table("log8", c.device)[c.long()]


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale tensor as fp32: log8 codes (uint8) are decoded, fp16 is widened."""
    return log8_decode(scale) if scale.dtype == torch.uint8 else scale.float()


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
    """A [B, H, T, D] tensor stored as packed min-max codes with a scale and zero per group (fp16,
    or 8-bit codes against an fp16 anchor)."""

    codes: torch.Tensor  # uint8 [B, H, T, ceil(D * bits / 8)]
    scale: torch.Tensor  # fp16 (or uint8 anchored scale codes with stats=8), see module docstring
    zero: torch.Tensor   # fp16 (or int8 codes with stats=8), same shape as scale
    bits: int
    group: int
    axis: str
    head_dim: int
    anchor: torch.Tensor | None = None  # fp16 [B, H, 2, D] (center, scale reference) with stats=8

    @property
    def stats(self) -> int:
        """Bits of each stored statistic: 16 (fp16 scale and zero) or 8."""
        return 8 if self.anchor is not None else 16

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes + \
            (self.anchor.nbytes if self.anchor is not None else 0)

    def group_stats(self, g0: int, g1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) fp32 of per-channel groups [g0, g1): [B, H, g1 - g0, D]; per-token
        tensors: of tokens [g0, g1), [B, H, g1 - g0, D // group]."""
        s = self.scale[:, :, g0:g1]
        if self.anchor is None:
            return s.float(), self.zero[:, :, g0:g1].float()
        a = self.anchor.float()
        sc = _scale8_decode(s, a[:, :, 1:2])
        return sc, _zero8_decode(self.zero[:, :, g0:g1], sc, a[:, :, 0:1])

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Reconstruct tokens [start, end) as [B, H, n, D] in `dtype`."""
        end = self.num_tokens if end is None else end
        if self.axis == "channel" and (start % self.group or (end % self.group and end != self.num_tokens)):
            raise ValueError("channel-wise slices must start and end on group boundaries")
        q = unpack(self.codes[:, :, start:end], self.bits, self.head_dim).float()  # [B, H, n, D]
        if self.axis == "channel":
            s, z = self.group_stats(start // self.group, -(-end // self.group))
            s = s.repeat_interleave(self.group, dim=2)[:, :, : end - start]
            z = z.repeat_interleave(self.group, dim=2)[:, :, : end - start]
        else:
            s, z = self.group_stats(start, end)
            s, z = s.repeat_interleave(self.group, dim=3), z.repeat_interleave(self.group, dim=3)
        return (q * s + z).to(dtype)

    def cat(self, other: "QuantTensor") -> "QuantTensor":
        """A new QuantTensor holding self's tokens then other's (same format)."""
        if (self.bits, self.group, self.axis, self.head_dim, self.stats) != \
                (other.bits, other.group, other.axis, other.head_dim, other.stats):
            raise ValueError("cannot concatenate quantized tensors of different formats")
        if self.anchor is not None and not torch.equal(self.anchor, other.anchor):
            raise ValueError("cannot concatenate 8-bit-statistics tensors with different anchors "
                             "(quantize the new part with anchor=self.anchor)")
        return QuantTensor(torch.cat([self.codes, other.codes], 2), torch.cat([self.scale, other.scale], 2),
                           torch.cat([self.zero, other.zero], 2), self.bits, self.group, self.axis, self.head_dim,
                           self.anchor)

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


def quantize(x: torch.Tensor, bits: int, group: int, axis: str, stats: int = 16,
             anchor: torch.Tensor | None = None) -> QuantTensor:
    """Asymmetric min-max quantization of x [B, H, T, D] into `bits`-bit codes per group.

    stats: 16 (fp16 scale and zero) or 8 (uint8 scale and int8 zero codes against a per-channel
    `anchor`; per-channel groups only, see the module docstring). anchor: fp16 [B, H, 2, D] to
    reuse (to extend an existing tensor), else computed from x.
    Guarantees |x - dequantize(quantize(x))| <= scale / 2 elementwise (scale as stored).
    Raises NonFiniteError if x holds NaN or inf.
    """
    check_finite(x)
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    if stats not in (8, 16):
        raise ValueError(f"stats must be 8 or 16, got {stats}")
    if stats == 8:
        if axis != "channel" or bits > 2:
            raise ValueError("8-bit statistics are for 1- and 2-bit codes in per-channel groups (axis='channel'), "
                             f"got {bits} bits, axis={axis!r}")
        return _quantize_stats8(x, bits, group, anchor)
    b, h, t, d = x.shape
    levels = (1 << bits) - 1
    xg = _group_view(_finite16(x), group, axis)
    rd = _red_dim(axis)
    mn = xg.amin(rd, keepdim=True)
    mx = xg.amax(rd, keepdim=True)
    # Round the stored statistics so that [zero, zero + levels * scale] still covers [min, max].
    zero = mn.to(STAT_DTYPE)
    low = zero.float() > mn
    if low.any():
        zero = torch.where(low, torch.nextafter(zero, torch.full_like(zero, -float("inf"))), zero)
    scale = ((mx - zero.float()) / levels).clamp_max(FP16_MAX).to(STAT_DTYPE)
    short = zero.float() + levels * scale.float() < mx
    if short.any():
        short &= scale.float() < FP16_MAX   # at fp16's top the range is clipped instead
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s = scale.float()
    q = torch.where(s > 0, (xg - zero.float()) / s.clamp_min(1e-30), torch.zeros_like(xg))
    q = q.round_().clamp_(0, levels).to(torch.uint8).view(b, h, t, d)
    return QuantTensor(pack(q, bits), scale.squeeze(rd), zero.squeeze(rd), bits, group, axis, d)


def _scale8_decode(code: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Anchored scale codes (uint8, or float integers in [0, 255]) -> ref * 2 ** ((code - 191) / 32)."""
    return ref * _table("scale8", code.device)[code.long()]


def _zero8_decode(code: torch.Tensor, scale: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """int8 zero codes (or float integers) -> center + scale * code / ZERO8_STEPS (fp32)."""
    return center + scale * (code.float() / ZERO8_STEPS)


def _quantize_stats8(x: torch.Tensor, bits: int, group: int, anchor: torch.Tensor | None) -> QuantTensor:
    b, h, t, d = x.shape
    levels = (1 << bits) - 1
    xf = _finite16(x)
    xg = _group_view(xf, group, "channel")                               # [B, H, T/g, g, D]
    mn, mx = xg.amin(3), xg.amax(3)                                      # [B, H, T/g, D]
    slack = 1.0 / ZERO8_STEPS

    def needed(cen):
        # zero >= min - scale / Z (floor of its code), so (levels - 1 / Z) * scale must cover
        # max - min; the offset (min - center) must fit 127 codes of scale / Z.
        return torch.maximum((mx - mn) / (levels - slack), (mn - cen).abs() * (ZERO8_STEPS / 127.0))

    if anchor is None:
        cen = (xf.mean(2, keepdim=True) if t else xf.new_zeros(b, h, 1, d)).to(STAT_DTYPE).float()
        top = needed(cen).amax(2, keepdim=True) if t else xf.new_zeros(b, h, 1, d)
        top = top.clamp_max(FP16_MAX)
        ref = top.to(STAT_DTYPE)
        ref = torch.where(ref.float() < top, torch.nextafter(ref, torch.full_like(ref, float("inf"))), ref)
        ref = torch.where(ref.float() > 0, ref, torch.ones_like(ref))    # all-constant channels
        anchor = torch.cat([cen.to(STAT_DTYPE), ref], 2)
    if anchor.shape != (b, h, 2, d):
        raise ValueError(f"anchor must be [B, H, 2, D] = {(b, h, 2, d)}, got {tuple(anchor.shape)}")
    cen, ref = anchor[:, :, 0:1].float(), anchor[:, :, 1:2].float()
    need = needed(cen)
    lg = torch.log2((need / ref).clamp_min(1e-30)) * SCALE8_STEPS
    code = torch.ceil(lg) + SCALE8_ONE
    code = torch.where(_scale8_decode(code.clamp(1, 255), ref) < need, code + 1, code).clamp(1, 255)
    code = torch.where(need > 0, code, torch.zeros_like(code))
    s = _scale8_decode(code, ref)
    zc = torch.where(s > 0, torch.floor((mn - cen) * ZERO8_STEPS / s.clamp_min(1e-30)), torch.zeros_like(s))
    zc = zc.clamp(-128, 127)
    zero = _zero8_decode(zc, s, cen)                                      # as decoded
    q = torch.where(s.unsqueeze(3) > 0, (xg - zero.unsqueeze(3)) / s.unsqueeze(3).clamp_min(1e-30),
                    torch.zeros_like(xg))
    q = q.round_().clamp_(0, levels).to(torch.uint8).view(b, h, t, d)
    return QuantTensor(pack(q, bits), code.to(torch.uint8), zc.to(torch.int8), bits, group, "channel", d, anchor)


class WrappedCodes:
    """Shared by the formats that wrap a QuantTensor (`inner`) and transform what it decodes to
    (ChannelScaledQuant, rotate.RotatedQuant): the shape and code width are the inner tensor's."""

    @property
    def bits(self) -> int:
        return self.inner.bits

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


@dataclass
class ChannelScaledQuant(WrappedCodes):
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
    def axis(self) -> str:
        return "token"

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
    check_finite(x)
    c = x.float().abs().amax(2, keepdim=True).sqrt()                      # [B, H, 1, D]
    c = torch.where(c > 0, c, torch.ones_like(c)).to(STAT_DTYPE)
    c = torch.where(c.float() > 0, c, torch.ones_like(c))                  # fp16 underflow
    return ChannelScaledQuant(quantize(x.float() / c.float(), bits, x.shape[-1], "token"), c)
