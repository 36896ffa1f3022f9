"""VidKV: 1.x-bit mixed-precision KV quantization for video LLMs (Tao et al., "Plug-and-Play 1.x-Bit
KV Cache Quantization for Video Large Language Models", arXiv 2503.16257).

Everything is quantized per channel in groups of `group` consecutive tokens (the KIVI key layout,
used for values too: the paper finds per-channel values better than per-token for video LLMs).

Keys (`key_bits` = 1 + fraction of 2-bit channels; 1.5 by default):
- the channels are ranked by their range (max - min over the tokens being quantized);
- the top `round(D * (key_bits - 1))` channels get 2-bit asymmetric min-max (fp16 scale, zero);
- the other De channels get 1 bit in the frequency domain: the FFT along those channels of each
  token, its real and imaginary parts quantized to their sign with scale mean|x| per (frequency
  coordinate, group). Dequantization is the inverse FFT of (+-scale).
Values (`value_bits` = 1.58): ternary per channel: scale = mean|x|, t = sign(x) where |x| > 0.5 *
  scale, else 0; dequantization t * scale. value_bits=2 gives the paper's "1.5 / 2" setting
  (2-bit min-max values).
Semantic token protection (STP, `stp` = 0.2): the visual tokens most similar to the question (dot
  product of their input embeddings with the mean question-token embedding; the top `stp`
  fraction of visual patch tokens) keep 2-bit min-max values (keys as all the others), giving the
  paper's "1.66-bit" values. They are stored as a separate segment (attention is order-free over
  the cache), so both parts keep whole groups of `group` tokens.
Residual: the `residual` most recent tokens stay in full precision (the model's dtype), at most
`residual_fraction` of the entries a layer holds when it is compressed (as in `kivi`: the paper's
128 from 1,024 entries on, an eighth of shorter prompts; `residual_fraction=1` keeps the fixed
window, which quantizes nothing in prompts under 160 entries). The stats give the window
(`vidkv_window`), the entries quantized and, when nothing could be, why (`vidkv_note`).

Defaults (the paper's, except `stats` and `residual_fraction`): key_bits=1.5, value_bits=1.58,
stp=0.2, group=32, residual=128, residual_fraction=0.125, channels="layer" (one channel ranking per layer, shared by its KV heads, as in the
official code; channels="head" ranks per KV head at no extra cost, see docs/vidkv.md for the
measured effect), stats=8 (each per-group scale and zero in one byte; 16 = fp16, the paper's).

Storage (true bits per element, scales included; the byte count is the sum of the stored tensors),
head_dim 128, groups of 32 (s = bits per statistic, 16 or 8):
- 2-bit key channels: 2 + 2s/32 (scale + zero per group; with s = 8 plus a per-channel fp16
  anchor, `quant.py`);
- 1-bit key channels: the FFT of De real channels has exactly De independent real coordinates
  (real parts of bins 0..De//2, imaginary parts of bins 1..(De-1)//2; the others are zero or
  conjugate copies), so we store De sign bits + De scales per group: 1 + s/32 bits;
- ternary values: 5 trits per byte (1.6 bits, 1.625 at D = 128) + s/32;  2-bit values: 2 + 2s/32.
With fp16 statistics: keys 2.25, values 2.125, 2.19 bits per element overall (~7.3x smaller than
fp16), 2.28 with STP at 0.2; the paper's "1.5 / 1.58 bits" count code bits only. With 8-bit
statistics (default): keys 1.875, values 1.875, 1.88 bits (8.5x), 1.94 with STP (8.2x), plus a
per-layer channel permutation ([H, D] uint8, shared by the layer's segments and counted once).

Deviations from the official code (KD-TAO/VidKV @0e55c39, `cache_utils.QuantizedCacheVLM*`,
`vidkv_quant.py`), and why:
- 1-bit dequantization maps a 0 bit to -scale (the official code maps it to 0) and ternary
  dequantization multiplies by the stored scale (the official code drops it): both are bugs.
- The official code stores all 2*De real and imaginary parts of the full FFT (half of them
  redundant by conjugate symmetry); we store the De independent ones. The reconstruction is the
  same (the redundant signs and scales are copies), at half the bits.
- Decoding: the official code dequantizes the whole cache at every step and, every 128 tokens,
  re-quantizes everything from scratch (re-selecting channels, compounding the error). Here, as in
  KIVI, whole groups are quantized once when they leave the full-precision window and appended;
  they reuse the layer's channel ranking, chosen once from all the tokens the layer holds in full
  precision when it is first quantized. Attention reads the packed codes directly (a fused Triton
  kernel on CUDA; a block-wise PyTorch path elsewhere), and for the FFT-domain keys computes q.k in
  the frequency domain (Parseval: the query is transformed once per step, keys never are).
- The official `shape_fft` is one attribute shared by all layers (it works only because every
  layer re-quantizes at the same step); here each segment carries its own shapes.
- STP: the official code protects max(32, floor(0.2 N / 32) * 32) tokens, then drops the last 32
  and shifts indices by a hard-coded 14 system-prompt tokens (LLaVA-OV's template). Here the
  visual tokens are found from the token types; the salient set is the top `stp` fraction of all
  visual patch tokens, and the protected count is how many of them are being quantized, rounded
  to whole groups (per head after per-head eviction: the mean count; each head then protects its
  own most similar visual entries).
  Similarity uses all question-side tokens the pipeline embeds (question plus chat-template tail).
- A partial last group (fewer than `group` tokens) stays in full precision, as in the official
  prefill; only its size differs.
- 8-bit statistics by default (the official code stores fp16 scales and zeros): log8 codes for the
  sign and ternary scales, anchored uint8 / int8 codes for the 2-bit planes (`quant.py`). They
  take the cache from 2.28 to 1.94 true bits per element at the same measured accuracy on the
  trained tiny model (BENCHMARKS.md); `stats=16` restores the paper's format.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from ..stages import check, register
from .base import SEPARATOR, VISUAL, KVPress
from .kivi import record_window, recent_window
from .lowbit import SignTensor, TernaryTensor, sign_quantize, ternary_quantize
from .quant import QuantTensor, quantize
from .storage import data_tensors, distinct_nbytes


# ----------------------------------------------------------------------------- FFT helpers
def spectrum(x: torch.Tensor) -> torch.Tensor:
    """The n independent real coordinates of the FFT of x along its last dim (n channels):
    [Re X_0 .. Re X_{n//2}, Im X_1 .. Im X_{(n-1)//2}] (fp32)."""
    n = x.shape[-1]
    f = torch.fft.rfft(x.float(), dim=-1)                                # [..., n//2 + 1]
    return torch.cat([f.real, f.imag[..., 1:(n - 1) // 2 + 1]], -1)      # [..., n]


def inverse_spectrum(r: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `spectrum`: coordinates [..., n] -> the real signal [..., n] (fp32)."""
    m = n // 2 + 1
    re = r[..., :m].float()
    im = torch.zeros_like(re)
    im[..., 1:(n - 1) // 2 + 1] = r[..., m:].float()
    return torch.fft.irfft(torch.complex(re, im), n=n, dim=-1)


_WEIGHTS: dict = {}


def spectral_weights(n: int, device=None) -> torch.Tensor:
    """w [n] such that q . inverse_spectrum(r) == (w * spectrum(q)) . r for real q (Parseval):
    1/n for the bins without a conjugate twin (0, and n/2 when n is even), 2/n for the others."""
    key = (n, str(device))
    if key not in _WEIGHTS:
        m = n // 2 + 1
        w = torch.full((n,), 2.0 / n, device=device)
        w[0] = 1.0 / n
        if n % 2 == 0:
            w[m - 1] = 1.0 / n
        _WEIGHTS[key] = w
    return _WEIGHTS[key]


def query_spectrum(q: torch.Tensor) -> torch.Tensor:
    """Frequency-domain query: (q . x) == (query_spectrum(q) . spectrum(x)) for real q, x."""
    return spectrum(q) * spectral_weights(q.shape[-1], q.device)


# ----------------------------------------------------------------------------- storage
def select_channels(keys: torch.Tensor, n_hi: int, per_head: bool) -> torch.Tensor:
    """Channel permutation [H, D]: the n_hi channels of largest range (max - min over batch and
    tokens; over heads too unless per_head), ascending, then the others, ascending."""
    b, h, t, d = keys.shape
    k = keys.float()
    if per_head:
        rng = k.amax((0, 2)) - k.amin((0, 2))                            # [H, D]
    else:
        rng = (k.amax((0, 1, 2)) - k.amin((0, 1, 2))).expand(h, d)       # [H, D]
    top = rng.topk(n_hi, dim=-1).indices.sort(-1).values if n_hi else rng.new_zeros(h, 0, dtype=torch.long)
    mask = torch.zeros(h, d, dtype=torch.bool, device=keys.device).scatter_(1, top, True)
    rest = torch.arange(d, device=keys.device).expand(h, d)[~mask].view(h, d - n_hi)
    return torch.cat([top, rest], 1).to(torch.uint8 if d <= 256 else torch.int16)


@dataclass
class VidKVKeys:
    """Mixed-precision keys [B, H, T, D]: channels perm[:, :n_hi] as 2-bit min-max codes (`hi`),
    channels perm[:, n_hi:] as sign bits of their spectrum (`lo`, De = D - n_hi coordinates)."""

    hi: QuantTensor | None  # [B, H, T, n_hi] 2-bit, per channel, groups of `group` tokens
    lo: SignTensor | None   # [B, H, T, De] signs of spectrum(x[..., lo channels])
    perm: torch.Tensor      # [H, D] uint8 (int16 if D > 256): hi channels then lo channels
    group: int

    @property
    def n_hi(self) -> int:
        return 0 if self.hi is None else self.hi.head_dim

    @property
    def head_dim(self) -> int:
        return self.perm.shape[1]

    @property
    def num_tokens(self) -> int:
        return (self.hi if self.hi is not None else self.lo).num_tokens

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.planes()) + self.perm.nbytes

    def planes(self) -> list:
        return [p for p in (self.hi, self.lo) if p is not None]

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Reconstruct tokens [start, end) as [B, H, n, D] (inverse FFT of the 1-bit part)."""
        parts = []
        if self.hi is not None:
            parts.append(self.hi.dequantize(torch.float32, start, end))
        if self.lo is not None:
            parts.append(inverse_spectrum(self.lo.dequantize(torch.float32, start, end), self.lo.head_dim))
        xp = torch.cat(parts, -1)                                        # [B, H, n, D] in perm order
        idx = self.perm.long()[None, :, None, :].expand_as(xp)
        return torch.empty_like(xp).scatter_(-1, idx, xp).to(dtype)

    def transform_query(self, query: torch.Tensor) -> torch.Tensor:
        """query [B, Hq, Lq, D] -> [B, Hq, Lq, D] fp32 in the stored key coordinates, so that
        transform_query(q) . [hi codes dequantized | lo spectrum dequantized] == q . dequantize().
        Computed once per step; the keys are never inverse-transformed. Nothing is cached on the
        keys (an expanded [Hq, D] int64 index kept here would be held but not counted)."""
        b, hq, lq, d = query.shape
        hk = self.perm.shape[0]
        idx = self.perm.long()[None, :, None, None, :].expand(b, hk, hq // hk, lq, d)  # query head h reads h // G
        qp = query.float().reshape(b, hk, hq // hk, lq, d).gather(-1, idx).view(b, hq, lq, d)  # perm order
        n_hi = self.n_hi
        if self.lo is None:
            return qp
        return torch.cat([qp[..., :n_hi], query_spectrum(qp[..., n_hi:])], -1)

    def cat(self, other: "VidKVKeys") -> "VidKVKeys":
        if self.group != other.group or not torch.equal(self.perm, other.perm):
            raise ValueError("cannot concatenate VidKV keys with different channel selections")
        return VidKVKeys(None if self.hi is None else self.hi.cat(other.hi),
                         None if self.lo is None else self.lo.cat(other.lo), self.perm, self.group)


def quantize_keys(x: torch.Tensor, perm: torch.Tensor, n_hi: int, group: int, stats: int = 16,
                  anchor: torch.Tensor | None = None) -> VidKVKeys:
    """VidKV keys of x [B, H, T, D]: channels perm[:, :n_hi] at 2-bit min-max, the rest as the
    sign bits of their spectrum, all per channel in groups of `group` tokens. stats: 16 (fp16
    scales and zeros) or 8 (`quant` 8-bit statistics; `anchor`: the 2-bit plane's to extend)."""
    b, h, t, d = x.shape
    idx = perm.long()[None, :, None, :].expand(b, h, t, d)
    xp = x.float().gather(-1, idx)                                       # [B, H, T, D] in perm order
    hi = quantize(xp[..., :n_hi], 2, group, "channel", stats, anchor) if n_hi else None
    lo = sign_quantize(spectrum(xp[..., n_hi:]), group, stats) if n_hi < d else None
    return VidKVKeys(hi, lo, perm, group)


@dataclass
class VidKVSegment:
    """A compressed part of a layer: VidKV keys and ternary (or 2-bit) values of the same tokens."""

    keys: VidKVKeys
    values: TernaryTensor | QuantTensor
    pos: torch.Tensor  # [H, n] int32 sequence index of each entry
    label: str = "vidkv"

    @property
    def num_tokens(self) -> int:
        return self.keys.num_tokens

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def bits_per_element(self) -> float:
        """Stored bits per K/V element (codes, scales, zeros, channel permutation)."""
        b, h, n, d = self.values.shape
        return 8 * self.nbytes / max(2 * b * h * n * d, 1)

    def cat(self, other: "VidKVSegment") -> "VidKVSegment":
        return VidKVSegment(self.keys.cat(other.keys), self.values.cat(other.values),
                            torch.cat([self.pos, other.pos], 1), self.label)

    def blocks(self, dtype: torch.dtype, block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Dequantized (keys, values) [B, H, n, D] in blocks of at most max(block, group) tokens."""
        g = self.keys.group
        step = max(block // g, 1) * g
        for s in range(0, self.num_tokens, step):
            e = min(self.num_tokens, s + step)
            yield self.keys.dequantize(dtype, s, e), self.values.dequantize(dtype, s, e)

    def fused_attention(self, query: torch.Tensor, scaling: float):
        """(out [B, Hq, Lq, D] fp32, lse [B, Hq, Lq]) over this segment, reading the packed codes:
        the Triton kernel on CUDA, the block-wise PyTorch path elsewhere (mmkv.kernels.quant_decode)."""
        from ..kernels.quant_decode import quant_attention

        return quant_attention(self.keys.transform_query(query), self.keys.planes(), self.values, scaling,
                               dtype=query.dtype)


# ----------------------------------------------------------------------------- the press
def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, ...], idx [H, k] -> x[:, h, idx[h]] ([B, H, k, ...])."""
    b, h = x.shape[:2]
    gi = idx.view(1, h, -1, *([1] * (x.dim() - 3))).expand(b, h, idx.shape[-1], *x.shape[3:])
    return x.gather(2, gi)


@register
@dataclass
class VidKV(KVPress):
    """VidKV: 1.x-bit KV quantization, FFT 1-bit + 2-bit keys, ternary values (arXiv 2503.16257)."""

    name: ClassVar[str] = "vidkv"
    main: ClassVar[str] = "key_bits"
    quantizes: ClassVar[bool] = True

    key_bits: float = 1.5
    value_bits: float = 1.58
    stp: float = 0.2
    group: int = 32
    residual: int = 128
    residual_fraction: float = 0.125
    channels: str = "layer"
    stats: int = 8

    def validate(self):
        check(1.0 <= self.key_bits <= 2.0, f"vidkv: key_bits must be in [1, 2], got {self.key_bits}")
        check(self.value_bits in (1.58, 2), f"vidkv: value_bits must be 1.58 (ternary) or 2, got {self.value_bits}")
        check(0.0 <= self.stp < 1.0, f"vidkv: stp must be in [0, 1), got {self.stp}")
        check(self.group >= 1, f"vidkv: group must be >= 1, got {self.group}")
        check(self.residual >= 0, f"vidkv: residual must be >= 0, got {self.residual}")
        check(0 <= self.residual_fraction <= 1, f"vidkv: residual_fraction must be in [0, 1], got {self.residual_fraction}")
        check(self.channels in ("layer", "head"), f"vidkv: channels must be 'layer' or 'head', got {self.channels!r}")
        check(self.stats in (8, 16), f"vidkv: stats must be 8 or 16 (bits per scale / zero), got {self.stats}")

    @property
    def query_aware(self) -> bool:
        """STP needs the question's embeddings, so compression waits for the question."""
        return self.stp > 0

    @property
    def protects(self) -> bool:
        return self.stp > 0 and self.value_bits < 2

    def n_hi(self, head_dim: int) -> int:
        return min(head_dim, int(round(head_dim * (self.key_bits - 1.0))))

    def _label(self, protected: bool) -> str:
        v = "2" if protected or self.value_bits >= 2 else "1.58"
        return f"vidkv k{self.key_bits:g}/v{v}" + (" stp" if protected else "")

    # --- salient tokens ----------------------------------------------------------------------
    def salience(self, ctx) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sim [L], salient [L]) over sequence indices: sim is the dot product of each visual patch
        token's input embedding with the mean question-token embedding (-inf for other tokens);
        salient marks the top `stp` fraction of visual patch tokens. None when STP is off or the
        context has no question (e.g. unit tests on bare caches)."""
        if not self.protects or ctx is None or ctx.question_embeds is None or ctx.visual_embeds is None:
            return None
        tt = ctx.token_type
        vis = ((tt == VISUAL) | (tt == SEPARATOR)).nonzero().squeeze(1)  # rows of visual_embeds, in order
        ve = ctx.visual_embeds
        if ve.shape[0] != vis.numel():
            raise ValueError(f"vidkv: {ve.shape[0]} visual embeddings for {vis.numel()} visual tokens in token_type")
        qe = ctx.question_embeds.reshape(-1, ctx.question_embeds.shape[-1]).float()
        s = ve.float().to(qe.device) @ qe.mean(0)                        # [N_vis]
        sim = torch.full((tt.numel(),), float("-inf"))
        sim[vis] = s.cpu()
        sim[tt == SEPARATOR] = float("-inf")
        k = int(round(self.stp * int((tt == VISUAL).sum())))
        salient = torch.zeros(tt.numel(), dtype=torch.bool)
        if k > 0:
            salient[sim.topk(k).indices] = True
        return sim, salient

    def _protected(self, pos: torch.Tensor, sal) -> torch.Tensor | None:
        """Indices [H, k] (ascending) into the pool entries `pos` [H, m] that keep 2-bit values:
        per head, the k most question-similar visual entries, k = the mean count of salient
        entries per head rounded to whole groups (and at most every head's visual entries)."""
        sim, salient = sal
        p = pos.long().cpu()
        s = sim[p]                                                       # [H, m]
        c = salient[p].sum(1).float()                                    # salient entries per head
        v = torch.isfinite(s).sum(1)                                     # visual patch entries per head
        g = self.group
        k = min(int(round(float(c.mean()) / g)) * g, int(v.min()) // g * g)
        if k <= 0:
            return None
        return s.topk(k, dim=1).indices.sort(1).values.to(pos.device)

    # --- quantization ------------------------------------------------------------------------
    def _perm(self, layer) -> torch.Tensor:
        """The layer's channel ranking: reused from its VidKV segments, else chosen now from every
        full-precision token the layer holds."""
        for s in layer.segments:
            if isinstance(s, VidKVSegment):
                return s.keys.perm
        return select_channels(layer.keys, self.n_hi(layer.keys.shape[-1]), self.channels == "head")

    def _segment(self, layer, k, v, pos, perm, protected: bool) -> VidKVSegment:
        """Quantize entries k, v [B, H, n, D]; with 8-bit statistics, groups that will join an
        existing segment of the layer reuse its per-channel anchors."""
        label = self._label(protected)
        prev = self._find(layer, label)
        ka = prev.keys.hi.anchor if prev is not None and prev.keys.hi is not None else None
        va = getattr(prev.values, "anchor", None) if prev is not None else None
        keys = quantize_keys(k, perm, self.n_hi(k.shape[-1]), self.group, self.stats, ka)
        if protected or self.value_bits >= 2:
            values = quantize(v, 2, self.group, "channel", self.stats, va)
        else:
            values = ternary_quantize(v, self.group, stats=self.stats)
        return VidKVSegment(keys, values, pos, label)

    @staticmethod
    def _find(layer, label: str) -> "VidKVSegment | None":
        """The layer's VidKV segment of that precision class, if any."""
        return next((s for s in layer.segments if isinstance(s, VidKVSegment) and s.label == label), None)

    @staticmethod
    def _append(layer, seg: VidKVSegment) -> None:
        """Join `seg` to the layer's segment of its class (a new list: snapshots stay intact)."""
        prev = VidKV._find(layer, seg.label)
        layer.segments = [s.cat(seg) if s is prev else s for s in layer.segments] if prev is not None \
            else [*layer.segments, seg]

    def quantize_layer(self, layer, sal=None, window: int | None = None) -> None:
        """Quantize the window entries beyond the last `window` (default `residual`) in whole
        groups: protected (salient) entries get 2-bit values, the others ternary; a partial group stays."""
        g = self.group
        n = layer.residual_len
        m = n - (self.residual if window is None else window)
        if m < g:
            return
        dev = layer.keys.device
        h = layer.keys.shape[1]
        perm = self._perm(layer)
        prot = self._protected(layer.pos[:, :m], sal) if sal is not None else None
        pool = torch.arange(m, device=dev).expand(h, m)
        if prot is not None:
            keep = torch.ones(h, m, dtype=torch.bool, device=dev).scatter_(1, prot, False)
            pool = pool[keep].view(h, m - prot.shape[1])
        nq = pool.shape[1] // g * g
        main, left = pool[:, :nq], pool[:, nq:]
        K, V, P = layer.keys, layer.values, layer.pos
        for idx, protected in ((main, False), (prot, True)):
            if idx is not None and idx.shape[1]:
                self._append(layer, self._segment(layer, _take(K, idx), _take(V, idx), P.gather(1, idx), perm,
                                                  protected))
        rest = torch.cat([left, torch.arange(m, n, device=dev).expand(h, n - m)], 1)
        layer.set_residual(_take(K, rest), _take(V, rest), P.gather(1, rest))

    def flush(self, layer, window: int | None = None) -> None:
        """Decode-time hook (before each append): quantize the oldest whole groups of the window
        beyond `window` (the layer's sized window; default `residual`); they join the
        non-protected segment with the layer's channel ranking."""
        w = self.residual if window is None else window
        if layer.residual_len - w >= self.group:
            self.quantize_layer(layer, None, w)

    def compress(self, cache, ctx) -> None:
        sal = self.salience(ctx)
        windows = []
        for layer in cache.layers:
            w = recent_window(self.residual, self.residual_fraction, layer.residual_len)
            windows.append(w)
            if not layer.is_initialized:
                continue
            with layer.quantizing():
                self.quantize_layer(layer, sal, w)
            layer.on_update = functools.partial(self.flush, window=w)
        if ctx is not None and cache.layers:
            record_window(ctx.stats, self.name, cache, windows, self.group)
            segs = [s for layer in cache.layers for s in layer.segments if isinstance(s, VidKVSegment)]
            nbytes = distinct_nbytes(data_tensors(segs))  # the layer's permutation once, not per segment
            elems = sum(2 * math.prod(s.values.shape) for s in segs)
            if elems:  # nothing quantized (a prompt within the window): no bits to report
                ctx.stats["vidkv_bits_per_element"] = 8 * nbytes / elems
            first = cache.layers[0].segments if cache.layers else []
            ctx.stats["vidkv_quantized_entries"] = sum(s.num_tokens for s in first if isinstance(s, VidKVSegment))
            ctx.stats["vidkv_protected_tokens"] = sum(s.num_tokens for s in first
                                                      if isinstance(s, VidKVSegment) and s.label.endswith("stp"))
