"""ZipVL as a plain transformers attention implementation ("zipvl", registered with
AttentionInterface and AttentionMaskInterface on import): sparse prefill only, for HF models run
outside mmkv's pipeline; `zipvl_session` chooses the policy and collects its stats."""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ...cache.base import PressContext
from .policy import ZipVL

ATTN_NAME = "zipvl"
_SESSION: contextvars.ContextVar = contextvars.ContextVar("zipvl_session", default=None)
_DEFAULT: list = []


@contextmanager
def zipvl_session(policy: ZipVL | None = None):
    """Use `policy` (default ZipVL(kv="none")) for the "zipvl" attention implementation inside the
    block. Yields a dict that holds the stats (zipvl_ratio_per_layer, ...) once the block exits.

        model.set_attn_implementation({"text_config": "zipvl"})   # or "zipvl" for a plain LLM
        with zipvl_session(ZipVL(tau=0.96)) as stats:
            model.generate(**inputs, max_new_tokens=32)
        print(stats["zipvl_ratio_per_layer"])

    Only the sparse prefill runs here (kv is ignored: the KV cache is transformers' own)."""
    policy = policy or ZipVL(kv="none")
    pctx = PressContext(token_type=torch.zeros(0, dtype=torch.int8))
    policy.begin(pctx)
    token = _SESSION.set((policy, pctx))
    try:
        yield pctx.stats
    finally:
        _SESSION.reset(token)
        policy._write_stats(pctx)
        policy._pctx = None


def zipvl_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface function "zipvl": ZipVL's sparse prefill on a plain HF model
    (batch without padding). Decode steps and dense layers use SDPA."""
    from ...attention import dense_attention

    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    session = _SESSION.get()
    if session is None:
        if not _DEFAULT:
            _DEFAULT.append(ZipVL(kv="none"))
        policy = _DEFAULT[0]
        policy.begin(PressContext(token_type=torch.zeros(0, dtype=torch.int8)))
    else:
        policy, pctx = session
        policy._pctx = pctx
    out = policy.attend(module, query, key, value, scaling, None)
    if out is not None:
        return out, None
    return dense_attention(module, query, key, value, scaling, "sdpa", dropout, **kwargs)


def zipvl_mask(*args, attention_mask=None, **kwargs):
    """Mask function for "zipvl": causal masks are built inside the attention call; padded batches
    are refused (the subset selection is shared by the batch)."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.bool().all()):
        raise ValueError("the zipvl attention implementation supports unpadded inputs only")
    return None


AttentionInterface.register(ATTN_NAME, zipvl_attention)
AttentionMaskInterface.register(ATTN_NAME, zipvl_mask)
