"""The `mmkv` attention implementation, registered with transformers' AttentionInterface.

The pipeline switches the language model (only) to `attn_implementation="mmkv"`. The function
then routes each layer's attention, for the duration of a `forward_context`:

1. to the active prefill policy (ZipVL's sparse attention), if it handles this call;
2. to the cache layer itself when it holds compressed parts (`KVLayer.attend`: attention over
   quantized segments with fused kernels, merged with the full-precision window), and always
   (before any prefill policy) when it holds a mass merge's log-weights, which only it adds;
3. otherwise to the user's base implementation (sdpa, eager or flash_attention_2).

Masks: the matching mask function returns None, so no [L, L] mask is ever materialized; causal
masking is rebuilt here from shapes (bottom-right aligned: all cached entries precede the new
queries). That stays right when layers hold different numbers of entries after eviction,
which a single model-wide mask cannot express. Batch size 1, no padding.

Before routing, `prepare` hooks may change the layer's parts (bi-level KV brings a question's
chunks back here, from that layer's queries). It can also record the post-RoPE query states of
the last `record_queries` tokens of every layer, and calls `observers` on every prefill chunk with the chunk's queries and all keys the
layer holds (full precision), so presses can accumulate attention statistics block by block
(probe rows, attention received) without ever forming an [L, L] matrix.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache.attend import causal_mask

NAME = "mmkv"


@dataclass
class ForwardContext:
    """What the attention function needs to know during one pipeline forward."""

    cache: Any = None               # CompressedCache
    base: str = "sdpa"              # user's attention implementation for plain dense attention
    policy: Any = None              # prefill policy: .attend(module, q, k, v, scaling, ctx) -> out | None
    record_queries: int = 0         # keep query rows of the last n tokens per layer
    queries: dict = field(default_factory=dict)  # layer_idx -> [B, Hq, n, D]
    observers: list = field(default_factory=list)  # fn(idx, layer, query, key, value, scaling, q_start)
    prepare: list = field(default_factory=list)    # fn(idx, layer, query, scaling, q_start): may change the layer's parts
    state: dict = field(default_factory=dict)    # free slot for policies (per-layer records)


_CTX: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("mmkv_forward", default=None)


@contextmanager
def forward_context(**kwargs):
    """Activate a ForwardContext for the calls made inside the block; yields it."""
    ctx = ForwardContext(**kwargs)
    token = _CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CTX.reset(token)


def current_context() -> ForwardContext | None:
    return _CTX.get()


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hk, L, D] -> [B, Hk * n_rep, L, D] (each KV head repeated for its query group)."""
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention (matmul, fp32 softmax, matmul), with an additive float mask."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w, v)
    return out.transpose(1, 2).contiguous(), w


def dense_attention(module, query, key, value, scaling, base: str = "sdpa", dropout: float = 0.0, **kwargs):
    """Causal attention of the last Lq positions over Lk keys with the base implementation."""
    lq, lk = query.shape[2], key.shape[2]
    if base == "sdpa":
        mask = None if lq == 1 or lq == lk else causal_mask(lq, lk, query.device)[None, None]
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    if base in ("eager", NAME) or base not in ALL_ATTENTION_FUNCTIONS:
        m = causal_mask(lq, lk, query.device)
        fmask = None if m is None else torch.zeros(lq, lk, dtype=query.dtype, device=query.device).masked_fill_(
            ~m, torch.finfo(query.dtype).min)[None, None]
        return eager_attention(module, query, key, value, fmask, scaling, dropout)
    # flash-attention style kernels align causal masks bottom-right themselves
    return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)


def mmkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry point (see module docstring). Returns (out [B, Lq, Hq, D], weights)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    ctx = _CTX.get()
    if ctx is None:
        return dense_attention(module, query, key, value, scaling, "sdpa", dropout, **kwargs)
    layer_idx = module.layer_idx
    if ctx.record_queries:
        ctx.queries[layer_idx] = query[:, :, -ctx.record_queries:]
    if ctx.prepare and ctx.cache is not None:  # e.g. bi-level KV brings chunks back before the layer attends
        layer = ctx.cache.layers[layer_idx]
        for fn in ctx.prepare:
            fn(layer_idx, layer, query, scaling, layer.seen - query.shape[2])
    if ctx.observers and ctx.cache is not None:
        layer = ctx.cache.layers[layer_idx]
        q_start = layer.seen - query.shape[2]  # sequence index of the first query of this chunk
        for fn in ctx.observers:
            fn(layer_idx, layer, query, key, value, scaling, q_start)
    layer = ctx.cache.layers[layer_idx] if ctx.cache is not None else None
    if layer is not None and getattr(layer, "logw", None) is not None:
        return layer.attend(query, scaling), None     # a mass merge's log-weights: only attend() adds them
    if ctx.policy is not None:
        out = ctx.policy.attend(module, query, key, value, scaling, ctx)
        if out is not None:
            return out, None
    if layer is not None and getattr(layer, "fused", False) and layer.segments:
        return layer.attend(query, scaling), None
    return dense_attention(module, query, key, value, scaling, ctx.base, dropout, **kwargs)


def _no_mask(*args, **kwargs):
    """Mask function for the `mmkv` implementation: masks are built inside the attention call."""
    return None


def _on_query_device(fn):
    """Run `fn` with the query's GPU as the current CUDA device: Triton launches kernels on the
    current device, and under a device map decoder layers (and their cache layers) run on
    different GPUs."""
    def on_device(module, query, *args, **kwargs):
        if query.is_cuda and query.device.index != torch.cuda.current_device():
            with torch.cuda.device(query.device):
                return fn(module, query, *args, **kwargs)
        return fn(module, query, *args, **kwargs)
    return on_device


AttentionInterface.register(NAME, _on_query_device(mmkv_attention))
AttentionMaskInterface.register(NAME, _no_mask)
