"""Human labels for the figures methods put in `Stats.extra` (raw keys such as
`zipvl_kv_important_per_layer`), and whether a per-layer series is a share or a count.

Known keys have a written label; any other key is spelled out from its parts ("foo_kept_tokens"
-> "foo: kept tokens"), so a new method's figures read sensibly without editing the demo.
"""
from __future__ import annotations

LABELS = {
    "zipvl_ratio_per_layer": "ZipVL prefill: share of keys attended to",
    "zipvl_kept_per_layer": "ZipVL prefill: keys attended to (summed over chunks)",
    "zipvl_ratio_mean": "ZipVL prefill: mean share of keys attended to (sparse layers)",
    "zipvl_attn_flops_dense": "ZipVL: attention FLOPs of a dense prefill",
    "zipvl_attn_flops": "ZipVL: attention FLOPs of its prefill (probes included)",
    "zipvl_attn_flops_saved": "ZipVL: share of attention FLOPs saved",
    "zipvl_kv_important_per_layer": "ZipVL KV: important tokens (kept at high precision)",
    "zipvl_kv_ratio_per_layer": "ZipVL KV: share of tokens kept as important",
    "zipvl_decode_reselections": "ZipVL decode: re-selections",
    "zipvl_decode_ratio_per_layer": "ZipVL decode: share of re-selected tokens kept as important",
    "lookm_kept_fraction": "LOOK-M: share of KV entries kept",
    "elastic_kept_fraction": "Elastic cache: share of KV entries kept",
    "vidkv_bits_per_element": "VidKV: bits per quantized element",
    "vidkv_quantized_entries": "VidKV: quantized tokens (layer 0)",
    "vidkv_protected_tokens": "VidKV: tokens protected by STP (layer 0)",
    "globalcom2_crop_ratios": "GlobalCom²: share of tokens kept per crop",
    "pvc_dropped_tokens": "PVC: visual tokens dropped",
    "kv_bytes_final": "KV bytes after decoding",
}

# method prefixes, spelled as their papers do
METHODS = {"zipvl": "ZipVL", "pvc": "PVC", "lookm": "LOOK-M", "vidkv": "VidKV", "kivi": "KIVI", "evs": "EVS",
           "elastic": "Elastic cache", "globalcom2": "GlobalCom²", "streaming": "StreamingLLM", "snapkv": "SnapKV"}
_WORDS = {"kv": "KV", "attn": "attention", "flops": "FLOPs", "ratio": "share", "fraction": "share",
          "stp": "STP", "llm": "LLM", "qk": "QK"}


def label(key: str) -> str:
    """The label shown for a stats key."""
    key = str(key)
    if key in LABELS:
        return LABELS[key]
    parts = [p for p in key.split("_") if p]
    if parts[-2:] == ["per", "layer"]:
        parts = parts[:-2]
    if not parts:
        return key
    head = METHODS.get(parts[0].lower())
    words = " ".join(_WORDS.get(p.lower(), p) for p in (parts[1:] if head else parts))
    if head:
        return f"{head}: {words}" if words else head
    return words[:1].upper() + words[1:]


def kind(values: list[float]) -> str:
    """"count" (whole numbers, some above 1), "share" (all within [0, 1]) or "value"."""
    if values and all(float(v).is_integer() for v in values) and any(abs(v) > 1 for v in values):
        return "count"
    if values and all(0.0 <= v <= 1.0 for v in values):
        return "share"
    return "value"


def fmt(v: float, how: str) -> str:
    """A per-layer value as shown: a share in percent, a count as a whole number."""
    if how == "share":
        return f"{100 * v:.1f}%"
    if how == "count":
        return f"{int(v):,}"
    return f"{v:.3g}"
