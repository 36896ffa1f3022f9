"""Sub-2-bit KV formats: 1-bit signs and 1.58-bit ternary codes, per channel in groups of tokens.

Both follow the KIVI key layout (see `quant.py`): a tensor is [B, H, T, D]; statistics are taken
per channel over `group` consecutive tokens, so scales are [B, H, T // group, D] and T must be a
multiple of `group`. Codes are packed along D (per token), so attention kernels read whole token
rows, exactly as they read `QuantTensor` codes.

- `SignTensor` (1 bit): x ~ s * scale with s = +1 if x >= 0 else -1, scale = mean|x| over the
  group (fp16). Bits are packed 8 per byte with `quant.pack(bits=1)`; bit 1 means +1.
  Dequantization is (2 * bit - 1) * scale: a 0 bit is -scale (the official VidKV code computes
  bit * scale and so turns every -1 into 0).
- `TernaryTensor` (log2(3) = 1.58 bits): x ~ t * scale with t = +1 if x > thr, -1 if x < -thr,
  else 0, scale = mean|x| over the group (fp16) and thr = 0.5 * scale. Codes are the digits
  t + 1 in {0, 1, 2}, packed 5 per byte in base 3 (3**5 = 243 <= 256), i.e. 1.6 bits each:
  byte = sum_i digit_i * 3**i, little end first. Dequantization is t * scale (the official code
  returns t without the scale).

With `stats=8` the scale is stored as a uint8 `log8` code (`quant.log8_encode`: 8 steps per
octave, rounded to nearest in the log domain, at most 4.4% off) instead of fp16: at groups of 32
tokens that takes the scale's cost from 0.5 to 0.25 bit per element. The scale tensor's dtype says
which (uint8: log8; fp16: plain).

The threshold is applied against the stored (rounded) scale, so dequantization and the
codes agree exactly with the direct formulas (checked in tests). Stored tensors are never
modified in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import STAT_DTYPE, PackedCodes, _finite16, check_finite, decode_scale, log8_encode, pack, unpack

TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


def pack_ternary(digits: torch.Tensor) -> torch.Tensor:
    """uint8 digits in {0, 1, 2} along the last dim -> packed uint8 [..., ceil(D / 5)]."""
    d = digits.shape[-1]
    pad = (-d) % TRITS_PER_BYTE
    c = digits.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(*c.shape[:-1], -1, TRITS_PER_BYTE)                       # [..., P, 5]
    w = torch.tensor(_POW3, dtype=torch.int32, device=c.device)
    return (c * w).sum(-1).to(torch.uint8)                               # <= 242


def unpack_ternary(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: packed uint8 [..., P] -> uint8 digits [..., d] in {0, 1, 2}."""
    w = torch.tensor(_POW3, dtype=torch.int32, device=packed.device)
    c = (packed.to(torch.int32).unsqueeze(-1) // w) % 3                  # [..., P, 5]
    return c.reshape(*packed.shape[:-1], -1)[..., :d].to(torch.uint8)


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    check_finite(x)  # NaN / inf: NonFiniteError (a log8 scale has no code for NaN)
    b, h, t, d = x.shape
    if group < 1 or t % group:
        raise ValueError(f"channel-wise groups need T % group == 0, got T={t}, group={group}")
    return _finite16(x).view(b, h, t // group, group, d)                 # reduce over dim 3


def _expand(stat: torch.Tensor, group: int, start: int, end: int) -> torch.Tensor:
    """[B, H, T // group, D] per-group scales (fp16 or log8) -> [B, H, end - start, D] per token (fp32)."""
    g0, g1 = start // group, -(-end // group)
    return decode_scale(stat[:, :, g0:g1]).repeat_interleave(group, dim=2)[:, :, start - g0 * group: end - g0 * group]


def _store_scale(scale: torch.Tensor, stats: int) -> torch.Tensor:
    if stats == 8:
        return log8_encode(scale)
    if stats == 16:
        return scale.to(STAT_DTYPE)
    raise ValueError(f"stats must be 8 or 16, got {stats}")


def _check_slice(t: "SignTensor | TernaryTensor", start: int, end: int | None) -> int:
    end = t.num_tokens if end is None else end
    if start % t.group or (end % t.group and end != t.num_tokens) or not 0 <= start <= end <= t.num_tokens:
        raise ValueError(f"slices must start and end on group boundaries, got [{start}, {end}) "
                         f"with group {t.group} and {t.num_tokens} tokens")
    return end


@dataclass
class SignTensor(PackedCodes):
    """[B, H, T, D] stored as sign bits with an fp16 mean|x| scale per (channel, group of tokens)."""

    codes: torch.Tensor  # uint8 [B, H, T, ceil(D / 8)]
    scale: torch.Tensor  # fp16 [B, H, T // group, D] (uint8 log8 codes with stats=8)
    group: int
    head_dim: int

    bits = 1

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    def signs(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The stored signs of tokens [start, end) as float +1 / -1, [B, H, n, D]."""
        return unpack(self.codes[:, :, start:end], 1, self.head_dim).float() * 2 - 1

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = _check_slice(self, start, end)
        return (self.signs(start, end) * _expand(self.scale, self.group, start, end)).to(dtype)

    def cat(self, other: "SignTensor") -> "SignTensor":
        if (self.group, self.head_dim, self.scale.dtype) != (other.group, other.head_dim, other.scale.dtype):
            raise ValueError("cannot concatenate sign tensors of different formats")
        return SignTensor(torch.cat([self.codes, other.codes], 2), torch.cat([self.scale, other.scale], 2),
                          self.group, self.head_dim)


def sign_quantize(x: torch.Tensor, group: int, stats: int = 16) -> SignTensor:
    """1-bit sign quantization of x [B, H, T, D] with scale mean|x| per (channel, `group` tokens),
    stored in fp16 (stats=16) or as a log8 code (stats=8)."""
    b, h, t, d = x.shape
    xg = _groups(x, group)
    scale = _store_scale(xg.abs().mean(3), stats)                        # [B, H, T/g, D]
    bits = (x >= 0).to(torch.uint8)                                      # [B, H, T, D]
    return SignTensor(pack(bits, 1), scale, group, d)


@dataclass
class TernaryTensor(PackedCodes):
    """[B, H, T, D] stored as ternary digits (5 per byte) with an fp16 mean|x| scale per
    (channel, group of tokens)."""

    codes: torch.Tensor  # uint8 [B, H, T, ceil(D / 5)]
    scale: torch.Tensor  # fp16 [B, H, T // group, D] (uint8 log8 codes with stats=8)
    group: int
    head_dim: int

    bits = 1.6  # storage bits per code (log2(3) = 1.585 is the information content)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    def trits(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The stored values t in {-1, 0, 1} of tokens [start, end) as float, [B, H, n, D]."""
        return unpack_ternary(self.codes[:, :, start:end], self.head_dim).float() - 1

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = _check_slice(self, start, end)
        return (self.trits(start, end) * _expand(self.scale, self.group, start, end)).to(dtype)

    def cat(self, other: "TernaryTensor") -> "TernaryTensor":
        if (self.group, self.head_dim, self.scale.dtype) != (other.group, other.head_dim, other.scale.dtype):
            raise ValueError("cannot concatenate ternary tensors of different formats")
        return TernaryTensor(torch.cat([self.codes, other.codes], 2), torch.cat([self.scale, other.scale], 2),
                             self.group, self.head_dim)


def ternary_quantize(x: torch.Tensor, group: int, threshold: float = 0.5, stats: int = 16) -> TernaryTensor:
    """Ternary quantization of x [B, H, T, D] per (channel, `group` tokens): scale = mean|x|
    (fp16 with stats=16, a log8 code with stats=8), t = sign(x) where |x| > threshold * scale
    (the stored scale), else 0."""
    b, h, t, d = x.shape
    xg = _groups(x, group)
    scale = _store_scale(xg.abs().mean(3, keepdim=True), stats)          # [B, H, T/g, 1, D]
    thr = threshold * decode_scale(scale)
    q = (xg > thr).to(torch.int8) - (xg < -thr).to(torch.int8)           # [B, H, T/g, g, D]
    return TernaryTensor(pack_ternary((q + 1).view(b, h, t, d)), scale.squeeze(3), group, d)
