"""Extension points: observers see every prefill chunk's queries against all held keys."""
from dataclasses import dataclass
from typing import ClassVar

import torch

import mmkv
from mmkv.models.qwen2_vl import use_released_layout
from conftest import frames_for
from mmkv.cache import KVPress
from mmkv.cache.attend import causal_mask
from mmkv.recipe import Recipe


@dataclass
class AttentionReceived(KVPress):
    """Test press: accumulates the attention each key receives (summed over queries and heads)."""

    name: ClassVar[str] = "attn_received"

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx):
        g = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(g, 1).float()
        s = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
        m = causal_mask(query.shape[2], key.shape[2], query.device)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        got = s.softmax(-1).sum((0, 1, 2))  # [Lk]
        key_ = ("attn", idx)
        prev = ctx.state.get(key_)
        if prev is not None:
            got[: prev.shape[0]] = got[: prev.shape[0]] + prev
        ctx.state[key_] = got
        ctx.state.setdefault("chunks", []).append((q_start, query.shape[2]))

    def compress(self, cache, ctx):
        ctx.stats["attn_received"] = [ctx.state[("attn", i)] for i in range(len(cache.layers))]


def test_observer_accumulates_attention_like_eager(tiny_dir):
    from transformers import AutoModelForImageTextToText
    fam = "llava_onevision"
    pipe = mmkv.load(tiny_dir[fam], prefill_chunk=17)  # several prefix chunks, then the question
    pipe.recipe = Recipe([AttentionReceived()])
    pipe._split_stages()
    video = frames_for(fam, n=6, seed=3)
    enc = pipe.encode(video)
    res = pipe.ask(enc, "What is happening?", max_new_tokens=1)
    got = res.stats.extra["attn_received"]
    # reference: the eager model's full attention matrix over the same inputs
    ref_model = AutoModelForImageTextToText.from_pretrained(tiny_dir[fam], attn_implementation="eager").eval()
    use_released_layout(ref_model)   # mmkv's M-RoPE layout (tests/test_rope_layout.py)
    n = res.stats.prompt_tokens
    suffix = pipe.adapter.suffix("What is happening?", "video", enc.prefix.next_text_position)
    ids = torch.cat([enc.prefix.ids, suffix.ids])
    embeds = ref_model.get_input_embeddings()(ids)[None].clone()
    embeds[0, enc.prefix.visual.nonzero().squeeze(1)] = enc.visual.embeds
    with torch.inference_mode():
        out = ref_model.model.language_model(inputs_embeds=embeds, output_attentions=True)
    for layer, att in enumerate(out.attentions):
        torch.testing.assert_close(got[layer], att[0].float().sum((0, 1)), atol=1e-4, rtol=1e-4)
    assert len(got[0]) == n
