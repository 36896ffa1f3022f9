"""Helpers shared by the KV-press tests (LOOK-M, Elastic Cache): capture a press's view of the
cache around compress(), the eager attention of the whole prompt, and a plain-transformers decode
step over a given cache (independent of mmkv's attention and decode path)."""
from __future__ import annotations

import torch

from mmkv.recipe import Recipe


def capture(pipe, presses):
    """Put `presses` in the pipeline and wrap the first one's compress() to snapshot the cache
    before and after, the press state and the token types. Returns the dict the snapshots go to."""
    snaps: dict = {}
    press = presses[0]
    inner = press.compress

    def compress(cache, ctx):
        snaps["pre"] = cache.clone()
        snaps["state"] = dict(ctx.state)
        snaps["token_type"] = ctx.token_type.clone()
        inner(cache, ctx)
        snaps["post"] = cache.clone()

    press.compress = compress
    pipe.recipe = Recipe(list(presses))
    pipe._split_stages()
    return snaps


def prompt(pipe, enc, question):
    """(ids [n], positions [P, n], next generated position) of the whole prompt, as the pipeline builds it."""
    suffix = pipe.adapter.suffix(question, enc.kind, enc.prefix.next_text_position)
    ids = torch.cat([enc.prefix.ids, suffix.ids])
    positions = torch.cat([enc.prefix.positions[:, enc.keep], suffix.positions], 1)
    return ids, positions, max(enc.prefix.max_position, suffix.max_position) + 1


def eager_model(path):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager",
                                                       dtype=torch.float32).eval()


def eager_attentions(model, pipe, enc, ids, positions):
    """Per-layer eager attention [Hq, n, n] of the plain model over the whole prompt."""
    embeds = model.get_input_embeddings()(ids)[None].clone()
    embeds[0, enc.prefix.visual.nonzero().squeeze(1)] = enc.visual.embeds.to(embeds.dtype)
    with torch.inference_mode():
        out = model.model.language_model(inputs_embeds=embeds, position_ids=pipe.adapter.model_positions(positions),
                                         output_attentions=True)
    return [a[0].float() for a in out.attentions]


def hf_step_logits(model, pipe, layers_kv, token: int, position: int) -> torch.Tensor:
    """Logits of one decode step of the plain transformers model over a DynamicCache holding
    `layers_kv` [(keys, values) [1, H, L, D] per layer], the new token at `position`."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers_kv):
        cache.update(k.float(), v.float(), i)
    emb = model.get_input_embeddings()(torch.tensor([[token]]))
    pos = torch.full((pipe.adapter.pos_dims, 1), position, dtype=torch.long)
    with torch.inference_mode():
        out = model.model.language_model(inputs_embeds=emb, position_ids=pipe.adapter.model_positions(pos),
                                         use_cache=True, **{pipe.adapter.cache_kwarg: cache})
        return model.lm_head(out.last_hidden_state[:, -1]).float()[0]
