"""Per-patch importance scores from a vision tower's last attention layer, for GlobalCom².

GlobalCom² (arXiv 2501.05179) ranks patches by the [CLS] query's attention in the LAST layer of
CLIP: the pre-softmax logits q_cls . k_j / sqrt(d), averaged over heads (the official code's
`attn_maps[-1][:, 0, 1:]`), even when the features come from an earlier layer. We compute the
same numbers without replacing any transformers class: a forward pre-hook on that one attention
module (removed right after) captures its input, and the q/k projections are recomputed for the
one query row that is needed.

SigLIP (LLaVA-OneVision) has no [CLS]. The substitute is the same logit with the MEAN of the
layer's input tokens as the query. Because the query projection is affine, q(mean_i h_i) =
mean_i q(h_i), so this score equals the pre-softmax attention logit each patch receives, averaged
over all queries and heads: "how strongly, on average, the whole view attends to this patch",
the logit analogue of the attention-received score FastV-style methods use, and like the [CLS]
row a single global query per view.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def last_encoder_layer(vision_tower) -> torch.nn.Module:
    """The last encoder layer of a CLIP / SigLIP vision tower (with or without a `vision_model` wrapper)."""
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        layers = getattr(getattr(owner, "encoder", None), "layers", None)
        if layers is not None and len(layers):
            return layers[-1]
    raise RuntimeError(f"cannot find the encoder layers of {type(vision_tower).__name__}")


def last_self_attention(vision_tower) -> torch.nn.Module:
    """The self-attention module of the vision tower's last encoder layer."""
    return last_encoder_layer(vision_tower).self_attn


@contextmanager
def capture_last_attention_input(vision_tower):
    """Within the block, `box["hidden"]` receives the [V, L, D] input of the last attention layer
    (after its layer norm) of every forward pass of `vision_tower`."""
    attn = last_self_attention(vision_tower)
    box: dict = {"attn": attn}

    def hook(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        box["hidden"] = h.detach()

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@torch.inference_mode()
def query_scores(attn: torch.nn.Module, hidden: torch.Tensor, query: str) -> torch.Tensor:
    """Head-mean pre-softmax logits of one global query against the patch keys of each view.

    hidden: [V, L, D], the attention layer's input. query="cls": the first token is the query and
    the other L - 1 are the patches (CLIP); query="mean": the mean of all L tokens is the query and
    all L are patches (SigLIP). Returns [V, n_patches] float32.
    """
    V, L, D = hidden.shape
    heads, d = attn.num_heads, attn.head_dim
    if query == "cls":
        q_in, keys = hidden[:, :1], hidden[:, 1:]
    elif query == "mean":
        q_in, keys = hidden.mean(1, keepdim=True), hidden
    else:
        raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")
    q = attn.q_proj(q_in).view(V, 1, heads, d).transpose(1, 2)           # [V, heads, 1, d]
    k = attn.k_proj(keys).view(V, keys.shape[1], heads, d).transpose(1, 2)  # [V, heads, n, d]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale  # [V, heads, 1, n]
    return logits.mean(1)[:, 0]
