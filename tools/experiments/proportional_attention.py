"""Experiment: does ToMe-style proportional attention recover EVS's counting loss?

EVS drops a token that repeats the token at the same (h, w) in the previous temporal slot. With
MODE=on, each dropped token is attributed to the latest kept token at its (h, w) (its weight,
`VisualTokens.weight`, counts it), and every attention call of the language model adds
log(weight) of each key to the logits: attention over a kept token then equals attention over
that many identical copies (ToMe's proportional attention, Bolya et al., ICLR 2023). MODE=off
runs the same code path without the bias. It monkeypatches EVS, the pipeline's prompt assembly
and mmkv's dense attention (sdpa, batch 1, no KV press: the keys are in sequence order), so it
is an experiment, not a feature.

    python tools/experiments/proportional_attention.py on  --recipes 'evs:0.25;evs:0.125;evs:0.5'
    python tools/experiments/proportional_attention.py off --recipes 'evs:0.25'

Result (BENCHMARKS.md, 100 held-out 256-frame videos, bundled model): 91 / 92 / 94% with the
bias against 91 / 91 / 93% without: no effect on counting (64-76%), so the loss is not about
attention mass. Static background tokens get weights up to ~55 and the answers do not change.
"""
import sys

import torch

from mmkv import pipeline as P, attention as A
from mmkv.vision import evs as E
from mmkv.cache.attend import causal_mask
from mmkv.bench import quality as Q

MODE = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in ("on", "off") else "on"
STATE = {"lw": None}

orig_compress = E.EVS.compress
def evs_compress(self, tokens, ctx):
    out = orig_compress(self, tokens, ctx)
    if MODE == "off" or tokens.kind != "video":
        return out
    # attribute each dropped patch to the latest kept token at the same (h, w) before it
    pos_in_out = {int(i): j for j, i in enumerate(out.index.tolist())}
    w = out.weight.clone().float()
    last = {}
    for r in range(tokens.num):
        if not tokens.is_patch[r]:
            continue
        t, h, ww = tokens.coords[r].tolist()
        idx = int(tokens.index[r])
        if idx in pos_in_out:
            last[(h, ww)] = pos_in_out[idx]
        elif (h, ww) in last:
            w[last[(h, ww)]] += tokens.weight[r].float()
    from dataclasses import replace  # noqa: E402
    return replace(out, weight=w)
E.EVS.compress = evs_compress

orig_assemble = P.Pipeline._assemble
def assemble(self, prefix, vt):
    keep, tt, emb = orig_assemble(self, prefix, vt)
    lw = torch.zeros(int(keep.sum()))
    slots = prefix.visual.nonzero().squeeze(1)
    order = torch.zeros(len(prefix.ids), dtype=torch.long)
    order[keep] = torch.arange(int(keep.sum()))
    rows = order[slots[vt.index]]
    lw[rows] = vt.weight.float().log()
    STATE["lw"] = lw if MODE == "on" else None
    return keep, tt, emb
P.Pipeline._assemble = assemble

orig_dense = A.dense_attention
def dense(module, query, key, value, scaling, base="sdpa", dropout=0.0, **kw):
    lw = STATE["lw"]
    if lw is None:
        return orig_dense(module, query, key, value, scaling, base, dropout, **kw)
    lq, lk = query.shape[2], key.shape[2]
    bias = torch.zeros(lk, dtype=query.dtype)
    n = min(lk, lw.numel()); bias[:n] = lw[:n].to(query.dtype)
    m = causal_mask(lq, lk, query.device)
    f = bias.expand(lq, lk).clone()
    if m is not None:
        f = f.masked_fill(~m, float("-inf"))
    return A.ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, f[None, None], scaling=scaling, dropout=dropout, **kw)
A.dense_attention = dense

import argparse  # noqa: E402

p = argparse.ArgumentParser(); Q.add_arguments(p)
args = p.parse_args(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] in ("on", "off") else sys.argv[1:])
Q.main(args)
