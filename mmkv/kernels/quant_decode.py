"""Fused decode attention over packed low-bit KV segments (flash-decoding with split-K).

One launch computes the attention of the new query token(s) of every head over one quantized
segment of a layer, reading the packed codes and dequantizing them in registers; nothing is
dequantized to memory. The full-precision recent window is a separate part: `KVLayer.attend`
merges this kernel's (out, lse) with the window's through the exact log-sum-exp merge
(`mmkv.cache.attend.merge_partials`), so the window costs one small dense matmul per step.

Formats served (`mmkv.cache.quant` / `mmkv.cache.lowbit`):
- keys: up to two planes whose channels are concatenated,
    plane 1: `QuantTensor` min-max codes (1/2/4/8 bits, per-channel or per-token groups), and/or
    plane 2: `SignTensor` 1-bit signs with a mean|x| scale (value = +-scale);
  KIVI keys are one `QuantTensor`; VidKV keys are [2-bit hi channels | 1-bit FFT coordinates].
- values: a `QuantTensor` (KIVI per-token, VidKV 2-bit per-channel) or a `TernaryTensor`
  (5 trits per byte, value = t * scale).
Statistics are fp16, or 8-bit (`stats=8`: log8 scales for signs and trits; anchored uint8 scale
and int8 zero codes for per-channel min-max planes), decoded in registers as the tiles load.
The query is given in the coordinates of the stored keys (`qt`): for KIVI it is the query; for
VidKV it is the query permuted to [hi | lo] channels with the lo part replaced by its weighted
FFT coordinates (`VidKVKeys.transform_query`), so q.k over FFT-domain keys is one dot product
(Parseval) and the keys are never inverse-transformed. That transform runs once per step.

Algorithm (flash-decoding): grid (B * Hk, S). Program (bh, s) takes the R = G * Lq query rows of
KV head bh (G query heads per KV head, GQA) and the tokens [s * chunk, (s + 1) * chunk), walks
them in tiles of BLOCK_N with an online softmax (exp2, the scale folded into q), and writes a
normalized partial output and its log2-sum-exp. `_reduce_kernel` merges the S partials per row.
Both dot products use tensor cores (tl.dot): fp16 operands (fp32 for fp32 queries, IEEE) with
fp32 accumulation; dequantized keys/values and softmax weights are rounded to fp16 only as the
dot's inputs, far below the quantization error.

`quant_attention_ref` (full dequantization, dense attention) is the reference;
`quant_attention_torch` is the same math block by block (bounded memory), used off CUDA;
`quant_attention` dispatches; `fused_quant_segment` serves KIVI's `QuantSegment` through it.
"""
from __future__ import annotations

import math

import torch

from ..cache.attend import merge_partials, partial_attention
from ..cache.lowbit import SignTensor, TernaryTensor
from ..cache.quant import LOG8_STEPS, SCALE8_ONE, SCALE8_STEPS, ZERO8_STEPS, QuantTensor, decode_scale

try:  # triton is optional at import time: the PyTorch paths work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

assert (LOG8_STEPS, SCALE8_STEPS, SCALE8_ONE, ZERO8_STEPS) == (8, 32, 191, 16), "the kernel hard-codes these"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_ROWS = 64      # query rows per KV head the kernel takes (G * Lq); beyond, the PyTorch path runs
MAX_SPLITS = 128


# ----------------------------------------------------------------------------- references
def _key_dim(planes) -> int:
    return sum(p.head_dim for p in planes)


def _check(qt: torch.Tensor, key_planes: list, values) -> None:
    if not 1 <= len(key_planes) <= 2:
        raise ValueError(f"expected 1 or 2 key planes, got {len(key_planes)}")
    b, hk, t, _ = values.shape
    for p in key_planes:
        if p.shape[:3] != (b, hk, t):
            raise ValueError(f"key plane shape {tuple(p.shape)} does not match values {tuple(values.shape)}")
    if qt.dim() != 4 or qt.shape[0] != b or qt.shape[1] % hk or qt.shape[-1] != _key_dim(key_planes):
        raise ValueError(f"query {tuple(qt.shape)} does not fit keys of {hk} heads and {_key_dim(key_planes)} "
                         "stored coordinates")


def quant_attention_ref(qt: torch.Tensor, key_planes: list, values, scaling: float):
    """Reference: dequantize everything, then dense attention (fp32).

    qt: [B, Hq, Lq, Dk] query in stored-key coordinates; key_planes: planes [B, Hk, T, D_i] with
    sum D_i = Dk; values: [B, Hk, T, Dv]. Every key precedes every query (no mask).
    Returns out [B, Hq, Lq, Dv] fp32 (normalized) and lse [B, Hq, Lq] fp32 (natural log)."""
    _check(qt, key_planes, values)
    k = torch.cat([p.dequantize(torch.float32) for p in key_planes], -1)
    return partial_attention(qt.float(), k, values.dequantize(torch.float32), scaling)


def _token_unit(key_planes, values) -> int:
    unit = 1
    for p in [*key_planes, values]:
        if getattr(p, "axis", "channel") == "channel":
            unit = math.lcm(unit, p.group)
    return unit


_LUTS: dict = {}


def _lut(kind, device) -> torch.Tensor:
    """byte -> the values it packs, as a float table [256, per]: kind = bits (1/2/4/8 codes),
    "sign" (1 bit as -1/+1) or "ternary" (5 trits as -1/0/+1)."""
    key = (kind, str(device))
    if key not in _LUTS:
        b = torch.arange(256)
        if kind == "ternary":
            t = (b[:, None] // torch.tensor([1, 3, 9, 27, 81])) % 3 - 1
        else:
            bits = 1 if kind == "sign" else kind
            t = (b[:, None] >> (torch.arange(8 // bits) * bits)) & ((1 << bits) - 1)
            if kind == "sign":
                t = 2 * t - 1
        _LUTS[key] = t.float().to(device)
    return _LUTS[key]


def _channel_stats(p):
    """(scale, zero or None) fp32 [B, H, T // group, D] of every group of a per-channel plane,
    decoded once per attention call (1/group of the plane's elements); None for per-token planes."""
    if isinstance(p, (TernaryTensor, SignTensor)):
        return decode_scale(p.scale), None
    if p.axis == "channel":
        return p.group_stats(0, p.scale.shape[2])
    return None


def _dequant_block(p, s: int, e: int, stats=None) -> torch.Tensor:
    """Tokens [s, e) of a plane as fp32 [B, H, n, D]: table lookup of the packed bytes (one
    gather, no bit arithmetic) and broadcast group statistics (`stats`: `_channel_stats(p)`, if
    already decoded). Same values as p.dequantize."""
    if isinstance(p, (TernaryTensor, SignTensor)):
        kind, axis = ("ternary" if isinstance(p, TernaryTensor) else "sign"), "channel"
    else:
        kind, axis = p.bits, p.axis
    codes = p.codes[:, :, s:e]
    b, h, n, _ = codes.shape
    d, g = p.head_dim, p.group
    x = torch.nn.functional.embedding(codes.int(), _lut(kind, codes.device)).flatten(-2)[..., :d]
    if axis == "channel":  # s, e on group boundaries (e may end the tensor)
        g0, g1 = s // g, -(-e // g)
        pad = (g1 - g0) * g - n
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        x = x.reshape(b, h, g1 - g0, g, d)
        sc, z = stats if stats is not None else _channel_stats(p)
        x = x * sc[:, :, g0:g1, None, :]
        if z is not None:
            x = x + z[:, :, g0:g1, None, :]
        return x.reshape(b, h, -1, d)[:, :, :n]
    sc, z = p.group_stats(s, e)
    x = x.reshape(b, h, n, d // g, g) * sc[..., None] + z[..., None]
    return x.reshape(b, h, n, d)


def quant_attention_torch(qt: torch.Tensor, key_planes: list, values, scaling: float, block: int = 4096):
    """The reference's math, dequantizing at most ~`block` tokens at a time (same shapes)."""
    _check(qt, key_planes, values)
    t = values.shape[2]
    unit = _token_unit(key_planes, values)
    step = max(block // unit, 1) * unit
    q = qt.float()
    stats = [_channel_stats(p) for p in key_planes]
    vstats = _channel_stats(values)
    parts = []
    for s in range(0, t, step):
        e = min(t, s + step)
        k = torch.cat([_dequant_block(p, s, e, st) for p, st in zip(key_planes, stats)], -1) if len(key_planes) > 1 \
            else _dequant_block(key_planes[0], s, e, stats[0])
        parts.append(partial_attention(q, k, _dequant_block(values, s, e, vstats), scaling))
    if len(parts) == 1:
        return parts[0]
    return merge_partials(parts), torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)


# ----------------------------------------------------------------------------- Triton kernel
if triton is not None:

    @triton.jit
    def _u2f(i):
        """Exact int32 -> fp32 for 0 <= i < 2**23 without an int-to-float conversion instruction:
        the bits of 2**23 + i, as a float, minus 2**23 (integer OR and one float subtract)."""
        return (i | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _log8(c):
        """log8 codes (any int dtype) -> fp32 scales: 2 ** ((c - 128) / 8), 0 for code 0."""
        cf = c.to(tl.float32)
        return tl.where(cf > 0, tl.exp2((cf - 128.0) * 0.125), 0.0)

    @triton.jit
    def _columns(BLOCK_D: tl.constexpr, PER: tl.constexpr):
        """(byte, digit) of a tile's BLOCK_D columns for codes packed PER to a byte; column i holds
        channel byte * PER + digit. Adjacent column pairs read adjacent bytes (PER = 1: the
        identity): the code pointers are truly 2-contiguous along the channels, so the compiler
        lays the tile out with channels across lanes and tokens in registers under every Triton
        version (with 1-contiguous pointers on both axes, Triton 3.6 broke the tie the other way,
        and the per-tile statistics became one decode per element)."""
        i = tl.arange(0, BLOCK_D)
        return (i // (2 * PER)) * 2 + i % 2, (i // 2) % PER

    @triton.jit
    def _minmax_stats(S, Z, N, sidx, smask, ch, dmask, dim, STAT8: tl.constexpr):
        """(scale, zero) fp32 at the statistics offsets `sidx` (a [BLOCK_D] row or a whole tile);
        with STAT8 decoded against the anchor N [2, dim]: scale = ref * 2 ** ((code - 191) / 32),
        zero = center + scale * int8 code / 16 (the [BLOCK_D] anchor rows at channels `ch`
        broadcast). As in the PyTorch path, code 0 is ref * 0 (so a NaN anchor stays NaN)."""
        if STAT8:
            c = tl.load(S + sidx, mask=smask, other=0).to(tl.float32)
            cen = tl.load(N + ch, mask=dmask, other=0.0).to(tl.float32)
            ref = tl.load(N + dim + ch, mask=dmask, other=0.0).to(tl.float32)
            sc = ref * tl.where(c > 0, tl.exp2((c - 191.0) * 0.03125), 0.0)
            z = cen + sc * (tl.load(Z + sidx, mask=smask, other=0).to(tl.float32) * 0.0625)
        else:
            sc = tl.load(S + sidx, mask=smask, other=0.0).to(tl.float32)
            z = tl.load(Z + sidx, mask=smask, other=0.0).to(tl.float32)
        return sc, z

    @triton.jit
    def _minmax_tile(C, S, Z, N, sc_t, ss_r, offs_n, nmask, dim, group, start, BLOCK_D: tl.constexpr,
                     BITS: tl.constexpr, AXIS: tl.constexpr, STAT8: tl.constexpr, ONE_GROUP: tl.constexpr):
        """Dequantized min-max tile [BLOCK_N, BLOCK_D] (fp32), columns in `_columns` order:
        code * scale + zero; with STAT8 (per-channel only, N = the anchor [2, D]: center, scale
        reference) scale = ref[d] * 2 ** ((uint8 code - 191) / 32), zero = center[d] + scale * int8
        code / 16. ONE_GROUP (per channel, the tile is exactly group `start // group`): the
        statistics are one [BLOCK_D] row, loaded and decoded once per tile and broadcast over its
        tokens."""
        PER: tl.constexpr = 8 // BITS
        byte_i, digit = _columns(BLOCK_D, PER)
        ch = byte_i * PER + digit
        dmask = ch < dim
        mask = nmask[:, None] & dmask[None, :]
        byte = tl.load(C + offs_n[:, None] * sc_t + byte_i[None, :], mask=mask, other=0)
        code = (byte.to(tl.int32) >> (digit * BITS)[None, :]) & ((1 << BITS) - 1)
        if AXIS == 0 and ONE_GROUP:
            sc, z = _minmax_stats(S, Z, N, (start // group) * ss_r + ch, dmask, ch, dmask, dim, STAT8)
            sc, z = sc[None, :], z[None, :]
        else:
            if AXIS == 0:  # per channel, groups of tokens: stats [T // group, dim]
                sidx = (offs_n // group)[:, None] * ss_r + ch[None, :]
            else:          # per token, groups of channels: stats [T, dim // group]
                sidx = offs_n[:, None] * ss_r + (ch // group)[None, :]
            sc, z = _minmax_stats(S, Z, N, sidx, mask, ch[None, :], dmask[None, :], dim, STAT8)
        return _u2f(code) * sc + z

    @triton.jit
    def _load_scale(S, sidx, mask, S8: tl.constexpr):
        if S8:
            return _log8(tl.load(S + sidx, mask=mask, other=0))
        return tl.load(S + sidx, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _sign_tile(C, S, sc_t, ss_r, offs_n, nmask, dim, group, start, BLOCK_D: tl.constexpr, S8: tl.constexpr,
                   ONE_GROUP: tl.constexpr):
        """Dequantized sign tile [BLOCK_N, BLOCK_D] (fp32, `_columns` order): (2 * bit - 1) * scale."""
        byte_i, digit = _columns(BLOCK_D, 8)
        ch = byte_i * 8 + digit
        dmask = ch < dim
        mask = nmask[:, None] & dmask[None, :]
        byte = tl.load(C + offs_n[:, None] * sc_t + byte_i[None, :], mask=mask, other=0)
        bit = (byte.to(tl.int32) >> digit[None, :]) & 1
        if ONE_GROUP:  # the tile is group start // group: one row of scales, decoded once
            sc = _load_scale(S, (start // group) * ss_r + ch, dmask, S8)[None, :]
        else:
            sc = _load_scale(S, (offs_n // group)[:, None] * ss_r + ch[None, :], mask, S8)
        return tl.where(bit != 0, sc, -sc)

    @triton.jit
    def _trit_digits(C, sc_t, offs_n, nmask, dim, BLOCK_D: tl.constexpr):
        """Base-3 digits {0, 1, 2} [BLOCK_N, BLOCK_D] (int32, natural channel order), 5 a byte, and
        the channel mask. Digit e of a byte without integer division: byte // 3**e == (byte * inv)
        >> 16 with inv = ceil(2**16 / 3**e), and q % 3 == q - 3 * ((q * 21846) >> 16), exact for
        bytes."""
        ch = tl.arange(0, BLOCK_D)
        dmask = ch < dim
        byte = tl.load(C + offs_n[:, None] * sc_t + (ch // 5)[None, :], mask=nmask[:, None] & dmask[None, :],
                       other=0).to(tl.int32)
        e = ch % 5
        inv = tl.where(e == 0, 65536, tl.where(e == 1, 21846, tl.where(e == 2, 7282, tl.where(e == 3, 2428, 810))))
        q = (byte * inv[None, :]) >> 16
        return q - 3 * ((q * 21846) >> 16), dmask

    @triton.jit
    def _ternary_tile(C, S, sc_t, ss_r, offs_n, nmask, dim, group, BLOCK_D: tl.constexpr, S8: tl.constexpr):
        """Dequantized ternary tile [BLOCK_N, BLOCK_D] (fp32): (digit - 1) * scale, statistics per
        element (tiles spanning several groups). A zero trit is 0 * scale, as in the PyTorch path
        (a NaN scale is never hidden)."""
        digit, dmask = _trit_digits(C, sc_t, offs_n, nmask, dim, BLOCK_D)
        ch = tl.arange(0, BLOCK_D)
        sc = _load_scale(S, (offs_n // group)[:, None] * ss_r + ch[None, :], nmask[:, None] & dmask[None, :], S8)
        return tl.where(digit == 2, sc, tl.where(digit == 0, -sc, sc * 0.0))

    @triton.jit
    def _dot(a, b, DOT_F32: tl.constexpr):
        if DOT_F32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a.to(tl.float16), b.to(tl.float16))

    @triton.jit
    def _quant_decode_kernel(
        Q, OP, LP,
        K1C, K1S, K1Z, K1N, K2C, K2S, VC, VS, VZ, VN,
        k1c_b, k1c_h, k1c_t, k1s_b, k1s_h, k1s_r, k1n_b, k1n_h,
        k2c_b, k2c_h, k2c_t, k2s_b, k2s_h, k2s_r,
        vc_b, vc_h, vc_t, vs_b, vs_h, vs_r, vn_b, vn_h,
        HK, T, R, NSPLIT, chunk, k1_group, k2_group, v_group,
        D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
        HAS_K1: tl.constexpr, HAS_K2: tl.constexpr, K1_BITS: tl.constexpr, K1_AXIS: tl.constexpr,
        V_TERNARY: tl.constexpr, V_BITS: tl.constexpr, V_AXIS: tl.constexpr,
        K1_S8: tl.constexpr, K2_S8: tl.constexpr, V_S8: tl.constexpr, ONE_GROUP: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = (bh // HK).to(tl.int64)  # batch and head base offsets in int64: b * stride passes 2**31 at
        h = (bh % HK).to(tl.int64)   # long contexts (e.g. 8-bit planes at batch 8 x 600K tokens)
        offs_r = tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        q_rows = Q + (bh * R + offs_r) * (D1 + D2)                       # Q: [B*HK, R, D1 + D2] fp32
        if HAS_K1:
            c1, e1 = _columns(BLOCK_D1, 8 // K1_BITS)
            ch1 = c1 * (8 // K1_BITS) + e1                               # the tile's channel order
            q1 = tl.load(q_rows[:, None] + ch1[None, :], mask=rmask[:, None] & (ch1 < D1)[None, :], other=0.0)
            k1c = K1C + b * k1c_b + h * k1c_h
            k1s = K1S + b * k1s_b + h * k1s_h
            k1z = K1Z + b * k1s_b + h * k1s_h
            k1n = K1N + b * k1n_b + h * k1n_h
        if HAS_K2:
            c2, e2 = _columns(BLOCK_D2, 8)
            ch2 = c2 * 8 + e2
            q2 = tl.load(q_rows[:, None] + D1 + ch2[None, :], mask=rmask[:, None] & (ch2 < D2)[None, :], other=0.0)
            k2c = K2C + b * k2c_b + h * k2c_h
            k2s = K2S + b * k2s_b + h * k2s_h
        if V_TERNARY:
            chv = tl.arange(0, BLOCK_DV)
        else:
            cv, ev = _columns(BLOCK_DV, 8 // V_BITS)
            chv = cv * (8 // V_BITS) + ev                                # acc's columns are these channels
        vc = VC + b * vc_b + h * vc_h
        vs = VS + b * vs_b + h * vs_h
        vz = VZ + b * vs_b + h * vs_h
        vn = VN + b * vn_b + h * vn_h

        lo = sp * chunk
        hi = tl.minimum(lo + chunk, T)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
            if HAS_K1:
                k1 = _minmax_tile(k1c, k1s, k1z, k1n, k1c_t, k1s_r, offs_n, nmask, D1, k1_group, start, BLOCK_D1,
                                  K1_BITS, K1_AXIS, K1_S8, ONE_GROUP)
                s += _dot(q1, tl.trans(k1), DOT_F32)
            if HAS_K2:
                k2 = _sign_tile(k2c, k2s, k2c_t, k2s_r, offs_n, nmask, D2, k2_group, start, BLOCK_D2, K2_S8,
                                ONE_GROUP)
                s += _dot(q2, tl.trans(k2), DOT_F32)
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_TERNARY:
                if ONE_GROUP:  # p @ (t * sc) == (p @ t) * sc: the row of scales multiplies the product
                    digit, dmask = _trit_digits(vc, vc_t, offs_n, nmask, DV, BLOCK_DV)
                    t = _u2f(digit) - 1.0
                    sc = _load_scale(vs, (start // v_group) * vs_r + chv, dmask, V_S8)
                    pv = _dot(p, t, DOT_F32) * sc[None, :]
                else:
                    pv = _dot(p, _ternary_tile(vc, vs, vc_t, vs_r, offs_n, nmask, DV, v_group, BLOCK_DV, V_S8),
                              DOT_F32)
            else:
                v = _minmax_tile(vc, vs, vz, vn, vc_t, vs_r, offs_n, nmask, DV, v_group, start, BLOCK_DV, V_BITS,
                                 V_AXIS, V_S8, ONE_GROUP)
                pv = _dot(p, v, DOT_F32)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out_rows = (bh * NSPLIT + sp) * R + offs_r                       # OP: [B*HK, S, R, DV]; LP: [B*HK, S, R]
        tl.store(OP + out_rows[:, None] * DV + chv[None, :], acc / l_safe[:, None],
                 mask=rmask[:, None] & (chv < DV)[None, :])
        # log2-sum-exp; a NaN sum stays NaN (its split must not drop out of the merge as -inf would)
        tl.store(LP + out_rows, tl.where(l_i == 0, float("-inf"), m_i + tl.log2(l_i)), mask=rmask)

    @triton.jit
    def _reduce_kernel(OP, LP, OUT, LSE, R, NSPLIT, DV: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_DV: tl.constexpr):
        row = tl.program_id(0)                                           # = bh * R + r
        bh = row // R
        r = row % R
        offs_s = tl.arange(0, BLOCK_S)
        smask = offs_s < NSPLIT
        offs_d = tl.arange(0, BLOCK_DV)
        dmask = offs_d < DV
        prow = (bh * NSPLIT + offs_s) * R + r
        lse = tl.load(LP + prow, mask=smask, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)                                             # [BLOCK_S]
        o = tl.load(OP + prow[:, None] * DV + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
        den = tl.sum(w, 0)
        tl.store(OUT + row * DV + offs_d, tl.sum(w[:, None] * o, 0) / den, mask=dmask)
        tl.store(LSE + row, (m + tl.log2(den)) * 0.6931471805599453)  # log2 -> natural log


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _channel_groups(key_planes, values) -> set[int]:
    """The token-group sizes of the planes quantized per channel (groups of tokens)."""
    return {p.group for p in [*key_planes, values] if getattr(p, "axis", "channel") == "channel"}


def _num_splits(sms: int | None, bhk: int, tiles: int, per_sm: int = 2) -> int:
    """Token splits per KV head: about `per_sm` programs per SM on a GPU of `sms` SMs, 4 elsewhere."""
    want = -(-per_sm * sms // bhk) if sms else 4
    return max(1, min(tiles, want, MAX_SPLITS))


def check_block(name: str, value: int, on_gpu: bool) -> None:
    """An explicit tile size must be a power of two, at least 16 on a GPU (tl.dot needs 16 per
    dimension there) and at least 8 under the interpreter."""
    lo = 16 if on_gpu else 8
    if not isinstance(value, int) or value < lo or value & (value - 1):
        raise ValueError(f"{name}={value!r}: tile sizes must be powers of two >= {lo} "
                         f"({'tl.dot on a GPU needs 16 per dimension' if on_gpu else 'interpreter minimum'})")


def _same_strides(scale: torch.Tensor, zero: torch.Tensor):
    if scale.stride() != zero.stride():
        return scale.contiguous(), zero.contiguous()
    return scale, zero


def _anchor(p: QuantTensor, dummy: torch.Tensor):
    """(anchor [B, H, 2, D] fp16, rows and channels contiguous, its (batch, head) strides) of an
    8-bit-statistics plane; (dummy, (0, 0)) otherwise."""
    if p.anchor is None:
        return dummy, (0, 0)
    a = p.anchor
    if a.stride(-1) != 1 or a.stride(-2) != a.shape[-1]:
        a = a.contiguous()
    return a, (a.stride(0), a.stride(1))


def _strides_bht(x: torch.Tensor) -> tuple[int, int, int]:
    if x.stride(-1) != 1:
        raise ValueError("packed planes must be contiguous along their last dim")
    return x.stride(0), x.stride(1), x.stride(2)


def quant_attention_triton(qt: torch.Tensor, key_planes: list, values, scaling: float, *,
                           num_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                           dtype: torch.dtype | None = None, splits_per_sm: int = 2):
    """Launch the fused kernel. Shapes (B batch, Hk KV heads, Hq = G * Hk query heads, T tokens):

    qt: [B, Hq, Lq, Dk] float, the query in stored-key coordinates (Dk = sum of the planes' dims);
    key_planes: [QuantTensor] | [SignTensor] | [QuantTensor, SignTensor], each [B, Hk, T, D_i]
      (QuantTensor: codes uint8 [B, Hk, T, ceil(D_i * bits / 8)], scale/zero fp16 [B, Hk, T/g, D_i]
      per channel or [B, Hk, T, D_i/g] per token, or with 8-bit statistics uint8 / int8
      [B, Hk, T/g, D_i] plus an fp16 anchor [B, Hk, 2, D_i]; SignTensor: codes
      [B, Hk, T, ceil(D_i / 8)], scale [B, Hk, T/g, D_i] fp16 or uint8 log8);
    values: QuantTensor or TernaryTensor (codes [B, Hk, T, ceil(Dv / 5)], scale [B, Hk, T/g, Dv]
      fp16 or uint8 log8);
    num_splits: token splits per KV head (default: about `splits_per_sm` programs per SM: more
      programs keep more loads in flight, and each split adds a partial output to write and merge);
    block_n: tokens per tile, a power of two >= 16 on a GPU (>= 8 under the interpreter); default:
      the planes' common per-channel group, when it is a power of two in [16, 128], else 64. When
      a tile is exactly one group, each plane's group statistics are one row per tile, loaded and
      decoded (8-bit codes: one exp2) once per channel instead of once per element;
    dtype: the model's dtype (default qt's): fp32 gives IEEE fp32 dot operands, anything else fp16
      operands (tensor cores) with fp32 accumulation.
    Returns out [B, Hq, Lq, Dv] fp32 (normalized) and lse [B, Hq, Lq] fp32 (natural log).

    Preconditions (asserted): G * Lq <= MAX_ROWS; every plane's last dim contiguous; the batch
    and head strides of a plane may be anything (views are fine).
    """
    out, lse, launches = quant_attention_launches(qt, key_planes, values, scaling, num_splits=num_splits,
                                                  block_n=block_n, num_warps=num_warps, dtype=dtype,
                                                  splits_per_sm=splits_per_sm)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    return out, lse


def quant_attention_launches(qt: torch.Tensor, key_planes: list, values, scaling: float, *,
                             num_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                             dtype: torch.dtype | None = None, on_gpu: bool | None = None, sms: int | None = None,
                             splits_per_sm: int = 2):
    """What `quant_attention_triton` launches, without launching it: (out, lse, [(kernel, grid,
    args, kwargs)]), the two kernels with their exact arguments. `on_gpu` (default: qt on CUDA)
    and `sms` (default: the device's SM count) let `mmkv.kernels.aot` compile a GPU launch from
    CPU or meta tensors."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(qt, key_planes, values)
    b, hq, lq, dk = qt.shape
    _, hk, t, dv = values.shape
    rows = (hq // hk) * lq
    if rows > MAX_ROWS:
        raise ValueError(f"the fused kernel takes at most {MAX_ROWS} query rows per KV head, got {rows}")
    k1 = key_planes[0] if isinstance(key_planes[0], QuantTensor) else None
    k2 = key_planes[-1] if isinstance(key_planes[-1], SignTensor) else None
    if len(key_planes) != (k1 is not None) + (k2 is not None):
        raise ValueError("key planes must be [QuantTensor], [SignTensor] or [QuantTensor, SignTensor]")
    if not isinstance(values, (QuantTensor, TernaryTensor)):
        raise ValueError(f"unsupported value format {type(values).__name__}")
    dev = qt.device
    on_gpu = qt.is_cuda if on_gpu is None else on_gpu
    if sms is None and dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
    dot_fp32 = (dtype or qt.dtype) == torch.float32
    d1 = k1.head_dim if k1 is not None else 0
    d2 = k2.head_dim if k2 is not None else 0
    q = (qt.float() * (scaling * LOG2E)).contiguous()                    # [B, Hq, Lq, Dk] = [B*Hk, R, Dk]
    groups = _channel_groups(key_planes, values)
    if block_n is None:
        g = next(iter(groups)) if len(groups) == 1 else 0
        block_n = g if g in (16, 32, 64, 128) else 64
    check_block("block_n", block_n, on_gpu)
    one_group = len(groups) == 1 and block_n in groups and block_n >= 16
    tiles = -(-t // block_n)
    s = num_splits or _num_splits(sms if on_gpu else None, b * hk, tiles, splits_per_sm)
    s = max(1, min(s, tiles, MAX_SPLITS))
    chunk = -(-tiles // s) * block_n
    s = -(-t // chunk)                                                   # no empty split
    op = torch.empty(b * hk, s, rows, dv, device=dev, dtype=torch.float32)
    lp = torch.empty(b * hk, s, rows, device=dev, dtype=torch.float32)
    dummy = q
    z3 = (0, 0, 0)
    if k1 is not None:
        k1c, k1s, k1z = k1.codes, *_same_strides(k1.scale, k1.zero)
        k1cs, k1ss = _strides_bht(k1c), _strides_bht(k1s)
        k1_bits, k1_axis, k1_group = k1.bits, 0 if k1.axis == "channel" else 1, k1.group
        k1n, k1ns = _anchor(k1, dummy)
    else:
        k1c = k1s = k1z = k1n = dummy
        k1cs = k1ss = z3
        k1ns = (0, 0)
        k1_bits, k1_axis, k1_group = 8, 0, 1
    if k2 is not None:
        k2c, k2s = k2.codes, k2.scale
        k2cs, k2ss = _strides_bht(k2c), _strides_bht(k2s)
        k2_group = k2.group
    else:
        k2c = k2s = dummy
        k2cs = k2ss = z3
        k2_group = 1
    vc = values.codes
    vs, vz = _same_strides(values.scale, values.zero if isinstance(values, QuantTensor) else values.scale)
    vcs, vss = _strides_bht(vc), _strides_bht(vs)
    vn, vns = _anchor(values, dummy) if isinstance(values, QuantTensor) else (dummy, (0, 0))
    ternary = isinstance(values, TernaryTensor)
    v_bits = 2 if ternary else values.bits
    v_axis = 0 if ternary or values.axis == "channel" else 1
    main = (_quant_decode_kernel, (b * hk, s),
            (q, op, lp, k1c, k1s, k1z, k1n, k2c, k2s, vc, vs, vz, vn,
             *k1cs, *k1ss, *k1ns, *k2cs, *k2ss, *vcs, *vss, *vns,
             hk, t, rows, s, chunk, k1_group, k2_group, values.group),
            dict(D1=d1, D2=d2, DV=dv, HAS_K1=k1 is not None, HAS_K2=k2 is not None, K1_BITS=k1_bits,
                 K1_AXIS=k1_axis, V_TERNARY=ternary, V_BITS=v_bits, V_AXIS=v_axis,
                 K1_S8=k1 is not None and k1.stats == 8, K2_S8=k2 is not None and k2.scale.dtype == torch.uint8,
                 V_S8=values.scale.dtype == torch.uint8, ONE_GROUP=one_group, BLOCK_R=_pow2(rows),
                 BLOCK_N=block_n, BLOCK_D1=_pow2(max(d1, 1)), BLOCK_D2=_pow2(max(d2, 1)), BLOCK_DV=_pow2(dv),
                 DOT_F32=bool(dot_fp32), num_warps=num_warps))
    out = torch.empty(b * hk * rows, dv, device=dev, dtype=torch.float32)
    lse = torch.empty(b * hk * rows, device=dev, dtype=torch.float32)
    reduce = (_reduce_kernel, (b * hk * rows,), (op, lp, out, lse, rows, s),
              dict(DV=dv, BLOCK_S=_pow2(s, 2), BLOCK_DV=_pow2(dv), num_warps=1 if dv <= 64 else 2))
    return out.view(b, hq, lq, dv), lse.view(b, hq, lq), [main, reduce]


# ----------------------------------------------------------------------------- dispatch
def kernel_available(x: torch.Tensor) -> bool:
    """True when the Triton kernel can run on x's device (CUDA with triton installed)."""
    return triton is not None and x.is_cuda


def quant_attention(qt: torch.Tensor, key_planes: list, values, scaling: float, block: int = 4096,
                    dtype: torch.dtype | None = None):
    """Attention over packed planes: the Triton kernel on CUDA (up to MAX_ROWS query rows per KV
    head), the block-wise PyTorch path elsewhere. Same arguments and results as the reference;
    `dtype` is the model's dtype (it picks the kernel's dot precision)."""
    if kernel_available(qt) and (qt.shape[1] // values.shape[1]) * qt.shape[2] <= MAX_ROWS and values.shape[2]:
        return quant_attention_triton(qt, key_planes, values, scaling, dtype=dtype)
    return quant_attention_torch(qt, key_planes, values, scaling, block)


def fused_quant_segment(segment, query: torch.Tensor, scaling: float):
    """`QuantSegment.fused_attention` (KIVI): the kernel on CUDA, the block-wise PyTorch path
    (table-lookup dequantization) elsewhere."""
    return quant_attention(query, [segment.keys], segment.values, scaling, dtype=query.dtype)
