"""How concentrated a model's attention is, per layer: what a benchmark proxy model is and is not.

For one or more videos, the language model's softmax attention is computed for two sets of query
rows (block by block, never an [L, L] matrix):
- `video`: the rows of the visual tokens over everything before them (prefix prefill);
- `question`: the rows of the question tokens over the whole prompt (the question's prefill).
For each row: the normalized entropy H / log(n) (1 = uniform over the n keys it can see, 0 = all
mass on one key) and the mass on its top 10% of keys; reported as the mean over rows and query
heads, per layer, plus (question rows) the share of attention that lands on visual tokens.

    python tools/attention_profile.py --model mmkv-long --task long --frames 1024 --n 4
    python tools/attention_profile.py --model Qwen/Qwen2-VL-2B-Instruct --video clip.mp4 --question "..."

Any model mmkv loads works (a real checkpoint needs the weights on disk or a hub connection).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmkv.cache.base import VISUAL, KVPress  # noqa: E402
from mmkv.cache.scores import key_positions  # noqa: E402

ROWS_PER_BLOCK = 64


@dataclass
class AttentionProfile(KVPress):
    """Not a compression stage: an observer that profiles attention rows (see the module doc)."""

    name: ClassVar[str] = "attention-profile"
    acc: dict = field(default_factory=dict)

    def observe(self, idx, layer, query, key, value, scaling, q_start, ctx):
        b, hq, lq, d = query.shape
        hk = key.shape[1]
        g = hq // hk
        kpos = key_positions(layer, key)[0].to(query.device)                  # [Lk]
        tt = ctx.token_type.to(query.device)
        is_vis = (tt[kpos.long()] == VISUAL)                                   # [Lk]
        qpos = torch.arange(q_start, q_start + lq, device=query.device)
        rows = (tt[qpos] == VISUAL) if ctx.question is None else (qpos >= ctx.question[0])
        phase = "video" if ctx.question is None else "question"
        kt = key.float().transpose(-1, -2)
        for s in range(0, lq, ROWS_PER_BLOCK):
            e = min(lq, s + ROWS_PER_BLOCK)
            sel = rows[s:e]
            if not bool(sel.any()):
                continue
            q = query[:, :, s:e][:, :, sel].float().reshape(b, hk, g * int(sel.sum()), d)
            sc = torch.matmul(q, kt) * scaling                                  # [B, Hk, G*r, Lk]
            visible = kpos[None, :] <= qpos[s:e][sel][:, None]                  # [r, Lk]
            vis = visible.repeat(g, 1)[None, None]                              # [1, 1, G*r, Lk]
            p = sc.masked_fill(~vis, float("-inf")).softmax(-1)
            n = vis.sum(-1).clamp_min(2).float()                                # keys each row sees
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / torch.log(n)
            k10 = torch.ceil(0.1 * n).long()                                    # top 10% of the visible keys
            srt = p.sort(-1, descending=True).values.cumsum(-1)
            top = srt.gather(-1, (k10 - 1).view(1, 1, -1, 1).expand(b, hk, -1, 1)).squeeze(-1)
            vmass = (p * is_vis[None, None, None]).sum(-1)
            a = self.acc.setdefault((phase, idx), [0.0, 0.0, 0.0, 0])
            a[0] += float(ent.sum())
            a[1] += float(top.sum())
            a[2] += float(vmass.sum())
            a[3] += ent.numel()

    def compress(self, cache, ctx) -> None:
        pass

    def report(self) -> dict:
        out: dict = {}
        for (phase, idx), (e, t, v, n) in sorted(self.acc.items()):
            out.setdefault(phase, {})[idx] = {"entropy": e / n, "top10_mass": t / n, "visual_mass": v / n}
        return out


def profile(model: str, videos: list, questions: list[str], frames: int) -> dict:
    import mmkv
    from mmkv.recipe import Recipe

    press = AttentionProfile()
    pipe = mmkv.load(model).with_recipe(Recipe([press]))
    for video, q in zip(videos, questions):
        enc = pipe.encode(video, frames=frames) if isinstance(video, str) else pipe.encode(video)
        pipe.ask(enc, q, max_new_tokens=1)
    return press.report()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmkv-long")
    ap.add_argument("--task", choices=["long", "needle"], default="long", help="synthetic videos to profile")
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--n", type=int, default=4, help="synthetic videos")
    ap.add_argument("--video", default=None, help="profile this file instead of synthetic videos")
    ap.add_argument("--question", default="Describe the video.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.video:
        videos, questions = [args.video], [args.question]
    elif args.task == "long":
        from mmkv.io import load_media
        from mmkv.synthetic.long import FPS, make_long_example

        exs = [make_long_example(1_900_000 + i, args.frames) for i in range(args.n)]
        videos = [load_media(ex.frames, video_fps=FPS) for ex in exs]
        questions = [ex.questions[0].text for ex in exs]
    else:
        from mmkv.io import load_media
        from mmkv.synthetic import FPS, make_example

        exs = [make_example(1_900_000 + i, args.frames) for i in range(args.n)]
        videos = [load_media(ex.frames, video_fps=FPS) for ex in exs]
        questions = [ex.prompt for ex in exs]
    rep = profile(args.model, videos, questions, args.frames)
    print(f"model {args.model}; {len(videos)} video(s) of {args.frames} frames")
    print("| rows | layer | entropy / log n | mass on top 10% of keys | mass on visual tokens |")
    print("|---|---|---|---|---|")
    for phase, layers in rep.items():
        for idx, m in layers.items():
            print(f"| {phase} | {idx} | {m['entropy']:.3f} | {m['top10_mass']:.3f} | {m['visual_mass']:.3f} |")
    if args.json:
        json.dump({"model": args.model, "frames": args.frames, "videos": len(videos),
                   "layers": {p: {str(i): m for i, m in ls.items()} for p, ls in rep.items()}},
                  open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
