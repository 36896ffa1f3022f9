"""Train mmkv's long-video benchmark model: a tiny Qwen2-VL that answers the three open questions
of task v2 (`mmkv.synthetic.long`) about 112 px needle videos, one at a time or in one
conversation, and holds up to 2,048 frames (16K visual tokens).

    python tools/train_long.py                                  # -> mmkv/assets/mmkv-long
    python tools/train_long.py --steps 40 --max-frames 128 --out /tmp/m --eval-n 0    # a quick run

The model is a real Qwen2-VL (saved with save_pretrained, loaded by mmkv through from_pretrained):
decoder hidden 128, 4 layers, 4 heads over 2 KV heads, RoPE base 1e6 as the real checkpoints;
vision tower 2 blocks of 64. Training sequences are whole conversations: the video, question 1,
answer 1, question 2, answer 2, question 3, answer 3, built with the model's own chat template
through the mmkv adapter (the same token ids mmkv feeds at inference); the loss is on the answer
tokens and the end-of-turn token, plus training-only auxiliary heads on the vision tower's output
(the colour and shape drawn in each visual token). Videos grow from 96 frames to --max-frames
over the first 70% of the steps; the same number of visual tokens per batch throughout.

Seeded and deterministic for a given machine and thread count: step i's data comes from seeds
derived from (--seed, i). Training seeds are below 1,000,000; held-out sets use 1,000,000 and up.
Uses the GPU when one is present (the same steps, bf16 autocast).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from train_tiny import Batcher, lr_at  # noqa: E402

from mmkv.models.qwen2_vl import QwenVLAdapter  # noqa: E402
from mmkv.models.tiny import QWEN_SPECIAL, make_tiny  # noqa: E402
from mmkv.synthetic import SHAPES  # noqa: E402
from mmkv.synthetic.long import CELL, COLORS, PLURAL, SIZE, make_long_example, question_text  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "mmkv", "assets", "mmkv-long")
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
VISION = dict(embed_dim=64, num_heads=4, depth=2, mlp_ratio=2)
ROPE_THETA = 1e6
TOKENS_PER_BATCH = 8192  # visual tokens per step
AUX_WEIGHT = 0.5
TRAIN_SEED_LIMIT = 1_000_000
TOKENS_PER_SLOT = (SIZE // CELL) ** 2   # 16 visual tokens per 2 frames


def corpus() -> list[str]:
    """Text the tokenizer learns: every question and answer word, the chat template's words."""
    words = list(COLORS) + list(SHAPES) + list(PLURAL.values()) + ["1", "2", "3"]
    qs = [question_text(k, t) for k in ("order", "count") for t in SHAPES] + \
         [question_text("identify", c) for c in COLORS]
    answers = [f"{c} {s}" for c in COLORS for s in SHAPES] + [", ".join(p) for p in zip(COLORS, list(COLORS)[1:])]
    return (qs * 20 + answers * 10 + words * 20 + ["user", "assistant", "system"] * 20)


def build_model(seed: int):
    torch.manual_seed(seed)
    return make_tiny("qwen2_vl", seed=seed, corpus=corpus(), vocab_size=600, split_lines=False,
                     text_overrides=TEXT, vision_overrides=VISION, min_pixels=SIZE * SIZE,
                     max_pixels=SIZE * SIZE, rope_theta=ROPE_THETA)


class LongBatcher(Batcher):
    """Conversations of task v2 as model inputs. Token ids come from the mmkv adapter (prefix,
    question suffix, follow-up turn), so training sees exactly what mmkv feeds at inference."""

    def __init__(self, model, proc):
        super().__init__(proc)
        self.adapter = QwenVLAdapter(model, proc)
        prefix = self.adapter._split_template("video", None)[0]
        ids = self.adapter._tokenize(prefix)
        at = ids.index(self.pad_id)
        self.head, self.tail = ids[:at], ids[at + 1:]

    @staticmethod
    def token_labels(ex, grid):
        """Per merged visual token: the colour (1..6) and shape (1..4) drawn in it, 0 where none."""
        gt, gh, gw = grid[0], grid[1] // 2, grid[2] // 2
        col = torch.zeros(gt, gh, gw, dtype=torch.long)
        shp = torch.zeros(gt, gh, gw, dtype=torch.long)
        for it in ex.items:
            t0, t1 = it.start // 2, (it.start + it.length - 1) // 2
            y, x = it.cell
            col[t0:t1 + 1, y, x] = list(COLORS).index(it.color) + 1
            shp[t0:t1 + 1, y, x] = SHAPES.index(it.shape) + 1
        return col.flatten(), shp.flatten()

    def conversation(self, ex, n_visual: int) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """ids, labels (-100 outside the answers) and each answer's (start, end) label span."""
        a = self.adapter
        ids = self.head + [self.pad_id] * n_visual + self.tail
        labels = [-100] * len(ids)
        spans = []
        for i, q in enumerate(ex.questions):
            if i == 0:
                turn = a.suffix(q.text, "video", 0).ids.tolist()
            else:
                turn = a.next_turn(q.text, "video", 0).ids.tolist()
                assert turn[0] == self.eos, "the follow-up turn must open with the end-of-turn token"
                turn = turn[1:]                       # that token is the last answer's label
            ans = self.tok(q.answer, add_special_tokens=False)["input_ids"] + [self.eos]
            ids += turn
            labels += [-100] * len(turn)
            spans.append((len(ids), len(ids) + len(ans)))
            ids += ans
            labels += ans
        return ids, labels, spans

    def __call__(self, examples):
        seqs, labels, pix, grids, cols, shps, spans = [], [], [], [], [], [], []
        for ex in examples:
            p, g = self.patchify(ex.frames)
            pix.append(p)
            grids.append(g)
            c, sh = self.token_labels(ex, g)
            cols.append(c)
            shps.append(sh)
            ids, lab, sp = self.conversation(ex, g[0] * g[1] * g[2] // 4)
            seqs.append(ids)
            labels.append(lab)
            spans.append(sp)
        n = max(map(len, seqs))
        input_ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        lab = torch.full((len(seqs), n), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            input_ids[i, :len(s)] = torch.tensor(s)
            lab[i, :len(l)] = torch.tensor(l)
            mask[i, :len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab,
                "pixel_values_videos": torch.cat(pix), "video_grid_thw": torch.tensor(grids),
                "mm_token_type_ids": (input_ids == self.pad_id).int() * 2,
                "spans": spans, "aux": {"color": torch.cat(cols), "shape": torch.cat(shps)}}


class AuxHeads(torch.nn.Module):
    """Training-only heads on the vision tower's output: the colour and the shape drawn in each
    visual token (dense signal early on). Never saved with the model."""

    def __init__(self, model):
        super().__init__()
        d = model.config.text_config.hidden_size
        self.color = torch.nn.Linear(d, len(COLORS) + 1)
        self.shape = torch.nn.Linear(d, len(SHAPES) + 1)
        self.visual = None
        model.model.visual.merger.register_forward_hook(lambda m, i, o: setattr(self, "visual", o))

    def loss(self, aux: dict) -> torch.Tensor:
        f = torch.nn.functional.cross_entropy
        v = self.visual.float()
        m = aux["shape"] > 0
        return f(self.color(v), aux["color"]) + f(self.shape(v[m]), aux["shape"][m])


def batch_vision_attention(model) -> None:
    """Training speed: transformers' Qwen2-VL vision attention (without flash-attention) runs one
    SDPA call per frame pair, a Python loop over hundreds of 64-patch chunks per layer and step,
    which was ~80% of a CPU step. Every chunk here has the same length, so this instance-level
    forward reshapes them into one batch and calls SDPA once (same result, checked below). Only
    the training script uses it; the saved model is the unmodified architecture."""
    import types

    import torch.nn.functional as F
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        n_all = hidden_states.shape[0]
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        n = int(lengths[0])
        if not bool((lengths == n).all()):
            return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, **kwargs)
        q, k, v = self.qkv(hidden_states).reshape(n_all, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.reshape(n_all // n, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [N, H, n, d]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n_all, -1)
        return self.proj(out)

    for blk in model.model.visual.blocks:
        blk.attn.forward = types.MethodType(forward, blk.attn)


def check_batched_vision(model, batcher) -> None:
    ex = make_long_example(TRAIN_SEED_LIMIT - 1, 96)
    pix, grid = batcher.patchify(ex.frames)
    thw = torch.tensor([grid])
    with torch.no_grad():
        ref = model.model.get_video_features(pix, thw, return_dict=True).pooler_output[0]
        batch_vision_attention(model)
        got = model.model.get_video_features(pix, thw, return_dict=True).pooler_output[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def frames_for_step(step: int, steps: int, max_frames: int, rng: np.random.Generator) -> int:
    """Curriculum: 96-frame videos first, up to max_frames from 70% of the steps on (multiples of 32)."""
    f = min(1.0, step / (0.7 * steps))
    hi = 96 + (max_frames - 96) * f
    return int(rng.integers(3, int(hi) // 32 + 1)) * 32


def to_device(inputs: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}


@torch.no_grad()
def evaluate(model, batcher, seeds, frames: int, device, batch: int = 2) -> dict:
    """Exact-match accuracy per question kind under teacher forcing (an answer counts only if
    every one of its tokens, and the end-of-turn token, is the argmax: exactly what greedy
    decoding would produce given the earlier turns)."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for s in range(0, len(seeds), batch):
        exs = [make_long_example(int(x), frames) for x in seeds[s:s + batch]]
        inputs = to_device(batcher(exs), device)
        spans = inputs.pop("spans")
        inputs.pop("aux")
        labels = inputs.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**inputs, logits_to_keep=0).logits
        pred = logits.argmax(-1)
        for i, ex in enumerate(exs):
            for (a, b), q in zip(spans[i], ex.questions):
                ok = bool((pred[i, a - 1:b - 1] == labels[i, a:b]).all())
                hits.setdefault(q.kind, []).append(ok)
                hits.setdefault(f"turn{ex.questions.index(q) + 1}", []).append(ok)
    model.train()
    allq = [x for k, v in hits.items() if not k.startswith("turn") for x in v]
    return {"accuracy": sum(allq) / max(1, len(allq)), **{k: sum(v) / len(v) for k, v in sorted(hits.items())}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--max-frames", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--eval-n", type=int, default=24, help="validation videos per evaluation (0: none)")
    ap.add_argument("--final-frames", default="1024,2048", help="frame counts of the final validation")
    ap.add_argument("--tokens-per-batch", type=int, default=TOKENS_PER_BATCH)
    ap.add_argument("--time-limit", type=float, default=0, help="stop early after this many minutes (0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model, proc = build_model(args.seed)
    batcher = LongBatcher(model, proc)
    check_batched_vision(model, batcher)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, vocab {len(proc.tokenizer)}, steps {args.steps}, device {device}", flush=True)
    model.train()
    heads = AuxHeads(model).to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    val_seeds = list(range(TRAIN_SEED_LIMIT + 500_000, TRAIN_SEED_LIMIT + 500_000 + args.eval_n))
    losses, t0, ema, aux_ema, steps_done = [], time.time(), None, None, 0
    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, step])
        frames = frames_for_step(step, args.steps, args.max_frames, rng)
        bsz = max(1, args.tokens_per_batch // (frames // 2 * TOKENS_PER_SLOT))
        exs = [make_long_example(int(s), frames) for s in rng.integers(0, TRAIN_SEED_LIMIT, bsz)]
        inputs = to_device(batcher(exs), device)
        aux = inputs.pop("aux")
        inputs.pop("spans")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**inputs)
            aux_loss = heads.loss(aux)
        loss = out.loss + AUX_WEIGHT * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = out.loss.item() if ema is None else 0.98 * ema + 0.02 * out.loss.item()
        aux_ema = aux_loss.item() if aux_ema is None else 0.98 * aux_ema + 0.02 * aux_loss.item()
        losses.append(out.loss.item())
        steps_done = step + 1
        if step % 25 == 0:
            print(f"step {step:5d} frames {frames:4d} bsz {bsz:2d} loss {ema:.4f} aux {aux_ema:.3f} "
                  f"lr {g['lr']:.2e} {time.time() - t0:6.0f}s", flush=True)
        if args.eval_n and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            res = evaluate(model, batcher, val_seeds, min(256, args.max_frames), device)
            print(f"  eval@{step + 1} (256 frames): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
        if args.time_limit and time.time() - t0 > 60 * args.time_limit:
            print(f"time limit reached after {step + 1} steps", flush=True)
            break
    train_s = time.time() - t0
    final = {}
    if args.eval_n:
        for f in [int(x) for x in args.final_frames.split(",") if x]:
            final[str(f)] = evaluate(model, batcher, val_seeds, f, device, batch=1)
            print(f"  final ({f} frames): " + ", ".join(f"{k} {v:.3f}" for k, v in final[str(f)].items()), flush=True)
    print(f"trained in {train_s / 60:.1f} min", flush=True)

    model.to("cpu").float().eval()
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 12
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    card = {"trained": True, "architecture": "Qwen2VLForConditionalGeneration", "params": n_params,
            "task": "mmkv.synthetic.long (task v2): order, count and identify questions, open answers, "
                    "one at a time or in one conversation",
            "prompt": f"the question alone after the video; {SIZE}x{SIZE} frames at 2 fps, "
                      f"{TOKENS_PER_SLOT} visual tokens per frame pair",
            "train": {"steps": steps_done, "max_frames": args.max_frames, "lr": args.lr, "seed": args.seed,
                      "threads": args.threads, "device": str(device), "minutes": round(train_s / 60, 1),
                      "tokens_per_batch": args.tokens_per_batch,
                      "command": "python tools/train_long.py " + " ".join(sys.argv[1:] if argv is None else argv)},
            "validation": final, "validation_note": "teacher-forced exact match on held-out seeds 1,500,000+"}
    with open(os.path.join(args.out, "mmkv.json"), "w") as f:
        json.dump(card, f, indent=1)
    print(f"saved to {args.out}")
    return {"losses": losses, "validation": final, "out": args.out}


if __name__ == "__main__":
    main()
