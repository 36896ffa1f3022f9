"""KIVI: tuning-free asymmetric 2/4-bit KV quantization (Liu et al., ICML 2024, arXiv 2402.02750).

Keys are quantized per channel (min-max statistics over `group` consecutive tokens of each
channel), values per token (over `group` consecutive channels of each token); the `residual` most
recent tokens stay in full precision. During decoding, once the full-precision window holds
`residual + group` tokens, its oldest whole groups are quantized and appended to the packed part.

Window sized to the prompt: each layer's window is w = min(residual, floor(residual_fraction * n)),
n the full-precision entries the layer holds when the press compresses it (the prompt, or what
earlier presses kept), and stays w while decoding. With the defaults that is the paper's 128 from
1,024 entries on and an eighth of the prompt below (67 of 536 entries). A fixed 128-token window
quantizes nothing in a prompt under residual + group = 160 entries and most of nothing in short
ones; `residual_fraction=1` restores it. The stats say the window used (`kivi_window`, layer 0),
the entries quantized (`kivi_quantized_entries`, layer 0) and, when nothing could be quantized,
why (`kivi_note`).

Defaults (the paper's, except residual_fraction): bits=2, group=32, residual=128,
residual_fraction=0.125, stats=16, rotate=0, value_bits=0, salient=0. Storage per element: `bits` for
the code plus an fp16 scale and zero per group (32 / group bits): 3 bits at the defaults.
`stats=8` (1- and 2-bit only) stores the keys' per-channel scales and zeros in a byte each
(`quant.py`'s 8-bit statistics, as VidKV's default): keys 2.5 bits, 2.75 bits per element overall
at bits=2; the values' per-token statistics stay fp16.
`value_bits` (0 = `bits`, not in the paper): the values' code width apart from the keys', to
tell which side a width costs; the label is then "k{bits}v{value_bits}".
`rotate=1` (not in the paper): keys and values are quantized in a fixed rotated basis, QuaRot's
randomized Hadamard (arXiv 2404.00456; `rotate.py`): the codes hold k R and v R, the same bytes
as without it; attention is unchanged up to the codes' error (q R against the key codes, the
output rotated back by R^T), and the error is spread evenly over the channels instead of falling
on the outlier channels that the queries weigh most.
`salient=F` (not in the paper; ZipCache's rule, He et al., arXiv 2405.14256; `salient.py`): at
compression, the fraction F of each head's entries that would be quantized (those older than the
window) that the prompt's own rows attend to most (H2O's attention received, normalized by the
rows that see each key, from ZipVL's probe rows gathered in `observe`) stay in the model's dtype,
in a segment of their own (label "exact"); the rest are quantized as above. Query-agnostic, so it
runs at encode. Entries that decoding flushes later are all quantized (no ranking exists for them).
Storage: F of the entries at 16 (or 32) bits, e.g. 3.65 bits per element at bits=2, F=0.05, fp16.
Deviations from the official code: the official code flushes the whole key window when it reaches
`residual` tokens and streams values one token at a time; here both flush whole groups once the
window exceeds `residual`, so at least `residual` recent tokens are always exact. When head_dim is
smaller than `group`, values use one group per token.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

from ..stages import check, register
from .base import KVPress
from .core import QuantSegment
from .dense import DenseSegment
from .importance import ObservedImportance, StateSlice
from .quant import quantize
from .rotate import RotatedQuant, rotate
from .salient import salient_count, split_salient
from .storage import own

# ranks the salient entries: ZipVL's probe rows (the last 16 of each prefill chunk and 16 drawn)
SALIENT_SCORER = ObservedImportance(probes=16)


@register
@dataclass
class KIVI(KVPress):
    """KIVI: 2/4-bit KV quantization, keys per channel, values per token (arXiv 2402.02750)."""

    name: ClassVar[str] = "kivi"
    main: ClassVar[str] = "bits"
    quantizes: ClassVar[bool] = True

    bits: int = 2
    group: int = 32
    residual: int = 128
    residual_fraction: float = 0.125
    stats: int = 16
    rotate: int = 0
    value_bits: int = 0
    salient: float = 0.0

    def validate(self):
        check(self.bits in (1, 2, 4, 8), f"kivi: bits must be 1, 2, 4 or 8, got {self.bits}")
        check(self.stats in (8, 16), f"kivi: stats must be 8 or 16 (bits per key scale / zero), got {self.stats}")
        check(self.stats == 16 or self.bits <= 2, f"kivi: stats=8 is for 1- and 2-bit codes, got bits={self.bits}")
        check(self.group >= 1, f"kivi: group must be >= 1, got {self.group}")
        check(self.residual >= 0, f"kivi: residual must be >= 0, got {self.residual}")
        check(0 <= self.residual_fraction <= 1, f"kivi: residual_fraction must be in [0, 1], got {self.residual_fraction}")
        check(self.value_bits in (0, 1, 2, 4, 8), f"kivi: value_bits must be 0 (= bits), 1, 2, 4 or 8, got {self.value_bits}")
        check(self.rotate in (0, 1), f"kivi: rotate must be 0 (off) or 1 (a fixed rotated basis), got {self.rotate}")
        check(0 <= self.salient < 1, f"kivi: salient (the fraction of the quantized entries kept exact) must be in "
                                     f"[0, 1), got {self.salient}")

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx):
        """With salient > 0: the attention each entry receives from the prefill's probe rows."""
        if self.salient <= 0:
            return
        st = StateSlice(ctx.state, self.name)
        if st.get("done"):
            return  # compressed already: later rows change nothing
        SALIENT_SCORER.observe(st, idx, layer, query, key, value, scaling, q_start, ctx)

    def keep_salient(self, layer, idx: int, window: int, ctx) -> int:
        """Move the salient entries among those older than the window into an exact segment;
        returns how many per head."""
        cand = layer.residual_len - window
        s = salient_count(self.salient, cand)
        if s <= 0:
            return 0
        st = StateSlice(ctx.state, self.name)
        if not SALIENT_SCORER.ready(st, idx):
            raise RuntimeError(f"kivi: salient={self.salient} needs the attention gathered during the prefill "
                               f"(observe); none was gathered for layer {idx}")
        scores, _ = SALIENT_SCORER.scores(st, idx, layer, ctx)
        (k, v, p, w), (rk, rv, rp, rw) = split_salient(layer.keys, layer.values, layer.pos, layer.logw,
                                                       scores[:, :cand], s)
        layer.segments = layer.segments + [DenseSegment.of(k, v, p, "exact", w)]
        layer.set_residual(rk, rv, rp, rw)
        return s

    def value_group(self, head_dim: int) -> int:
        g = min(self.group, head_dim)
        return g if head_dim % g == 0 else head_dim

    def flush(self, layer, window: int | None = None) -> None:
        """Quantize the oldest whole groups of the full-precision window beyond `window` entries
        (default `residual`; the press passes each layer's sized window)."""
        w = self.residual if window is None else window
        n = (layer.residual_len - w) // self.group * self.group
        if n <= 0:
            return
        # slices of the window: the codes are new tensors, the positions are copied (a kept view
        # would keep the whole window alive); set_residual copies the new window likewise
        k, v, pos = layer.keys[:, :, :n], layer.values[:, :, :n], own(layer.pos[:, :n])
        vbits = self.value_bits or self.bits
        label = f"int{self.bits}" if vbits == self.bits else f"k{self.bits}v{vbits}"
        last = layer.segments[-1] if layer.segments and layer.segments[-1].label == label else None
        anchor = last.keys.anchor if last is not None else None  # groups added later join its segment
        logw = None if layer.logw is None else own(layer.logw[:, :n])   # a mass merge's weights travel along
        if self.rotate:   # QuaRot's rotated basis (rotate.py): the codes hold k R and v R
            kq = RotatedQuant(quantize(rotate(k), self.bits, self.group, "channel", self.stats, anchor))
            vq = RotatedQuant(quantize(rotate(v), vbits, self.value_group(v.shape[-1]), "token"))
        else:
            kq = quantize(k, self.bits, self.group, "channel", self.stats, anchor)
            vq = quantize(v, vbits, self.value_group(v.shape[-1]), "token")
        seg = QuantSegment(kq, vq, pos, label=label, logw=logw)
        if last is not None:
            layer.segments = layer.segments[:-1] + [last.cat(seg)]
        else:
            layer.segments = layer.segments + [seg]
        layer.set_residual(layer.keys[:, :, n:], layer.values[:, :, n:], layer.pos[:, n:],
                           None if layer.logw is None else layer.logw[:, n:])

    def compress(self, cache, ctx) -> None:
        windows, exact = [], []
        for idx, layer in enumerate(cache.layers):
            w = recent_window(self.residual, self.residual_fraction, layer.residual_len)
            if self.salient > 0 and ctx is not None and layer.residual_len:
                exact.append(self.keep_salient(layer, idx, w, ctx))
            with layer.quantizing():
                self.flush(layer, w)
            layer.on_update = functools.partial(self.flush, window=w)
            windows.append(w)
        if ctx is not None and cache.layers:
            record_window(ctx.stats, self.name, cache, windows, self.group)
            if self.salient > 0:
                StateSlice(ctx.state, self.name)["done"] = True
                ctx.stats[f"{self.name}_exact_entries"] = exact[0] if exact else 0


def recent_window(residual: int, fraction: float, n: int) -> int:
    """The full-precision window of a layer holding n entries: min(residual, floor(fraction * n))."""
    return min(residual, int(fraction * n))


def record_window(stats: dict, name: str, cache, windows: list[int], group: int) -> None:
    """{name}_window and {name}_quantized_entries (layer 0) and, when no layer quantized anything,
    {name}_note saying why."""
    first = cache.layers[0]
    stats[f"{name}_window"] = windows[0]
    stats[f"{name}_quantized_entries"] = sum(s.num_tokens for s in first.segments)
    if not any(layer.segments for layer in cache.layers):
        stats[f"{name}_note"] = (f"nothing quantized: {first.residual_len} entries per layer (layer 0), fewer "
                                 f"than its {windows[0]}-entry full-precision window plus one group of {group}")
