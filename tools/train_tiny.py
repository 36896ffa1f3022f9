"""Train mmkv's bundled default model: a tiny Qwen2-VL that finds needles in synthetic videos.

Random weights give diffuse attention, which makes accuracy under compression meaningless; this
model, trained from scratch on CPU on `mmkv.synthetic` needle videos, has real, sparse attention
(its answer depends on a handful of visual tokens among thousands), so every compression method's
accuracy can be measured offline in CI-sized time.

    python tools/train_tiny.py                       # ~30 min on 2 CPU cores -> mmkv/assets/mmkv-tiny
    python tools/train_tiny.py --steps 200 --out /tmp/m --eval-n 0   # a quick run

Seeded and deterministic for a given machine/thread count: the data of step i comes from seeds
derived from (--seed, i); the frame-count curriculum and learning-rate schedule are functions of
the step only. Training examples use synthetic seeds below 1,000,000; the held-out sets
(`mmkv bench quality`, the tests) use seeds from 1,000,000 up.
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

from mmkv.evaluation.prompts import VIDEOMME_INSTRUCTION, VIDEOMME_POST_PROMPT, videomme_prompt  # noqa: E402
from mmkv.models.tiny import QWEN_SPECIAL, make_tiny  # noqa: E402
from mmkv.synthetic import COLORS, LETTERS, QUESTIONS, SHAPES, SIZE, TASKS, make_example  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "mmkv", "assets", "mmkv-tiny")
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
VISION = dict(embed_dim=64, num_heads=4, depth=2, mlp_ratio=2)
TOKENS_PER_BATCH = 4096
AUX_WEIGHT = 0.5    # weight of the auxiliary losses (training only; their heads are not saved)
CONTENT = list(COLORS) + list(SHAPES) + ["1", "2", "3", "4"]  # what an answer means, option order aside
TRAIN_SEED_LIMIT = 1_000_000


def corpus() -> list[str]:
    """Text the tokenizer is trained on: the prompt lines and every option line. With merges
    allowed across spaces (split_lines), each of them becomes one token."""
    words = list(COLORS) + list(SHAPES) + ["1", "2", "3", "4"]
    lines = [VIDEOMME_INSTRUCTION, VIDEOMME_POST_PROMPT.strip(), *QUESTIONS.values(), "user", "assistant", "system"]
    options = [f"{letter}. {w}" for letter in "ABCD" for w in words]
    return lines * 20 + options * 50


def build_model(seed: int):
    torch.manual_seed(seed)
    model, proc = make_tiny("qwen2_vl", seed=seed, corpus=corpus(), vocab_size=700, split_lines=True,
                            text_overrides=TEXT,
                            vision_overrides=VISION, min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)
    return model, proc


class Batcher:
    """Turns synthetic examples into model inputs without the (slow, general) processor: the
    frames are already SIZE x SIZE, so patches are normalized and laid out exactly as the Qwen2-VL
    video processor does (checked against it in `check_patchify`)."""

    def __init__(self, proc):
        self.proc = proc
        self.tok = proc.tokenizer
        vp = proc.video_processor
        self.mean = torch.tensor(vp.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(vp.image_std).view(1, 3, 1, 1)
        self.pad_id = self.tok.convert_tokens_to_ids("<|video_pad|>")
        self.eos = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.pad = self.tok.pad_token_id

    def patchify(self, frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0     # [T, 3, H, W]
        x = (x - self.mean) / self.std
        if x.shape[0] % 2:
            x = torch.cat([x, x[-1:]])
        t, c, h, w = x.shape
        gt, gh, gw = t // 2, h // 14, w // 14
        x = x.reshape(gt, 2, c, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * 2 * 14 * 14), [gt, gh, gw]

    def prompt_ids(self, prompt: str, n_visual: int) -> list[int]:
        msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        at = ids.index(self.pad_id)
        return ids[:at] + [self.pad_id] * n_visual + ids[at + 1:]

    @staticmethod
    def token_labels(ex, grid: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per merged visual token (2 frames x 28 x 28 px, in the vision tower's output order): the
        colour (1..4) and shape (1..4) of the needle drawn in it, 0 where there is none."""
        gt, gh, gw = grid[0], grid[1] // 2, grid[2] // 2
        col = torch.zeros(gt, gh, gw, dtype=torch.long)
        shp = torch.zeros(gt, gh, gw, dtype=torch.long)
        cell = 28
        for n in ex.needles:
            t0, t1 = n.start // 2, (n.start + n.length - 1) // 2
            ys = range(max(0, (n.y - n.size) // cell), min(gh - 1, (n.y + n.size) // cell) + 1)
            xs = range(max(0, (n.x - n.size) // cell), min(gw - 1, (n.x + n.size) // cell) + 1)
            for y in ys:
                for x in xs:
                    col[t0:t1 + 1, y, x] = list(COLORS).index(n.color) + 1
                    shp[t0:t1 + 1, y, x] = SHAPES.index(n.shape) + 1
        return col.flatten(), shp.flatten()

    def __call__(self, examples, with_answers: bool = True) -> dict:
        seqs, labels, pix, grids, cols, shps, last = [], [], [], [], [], [], []
        for ex in examples:
            p, g = self.patchify(ex.frames)
            pix.append(p)
            grids.append(g)
            c, sh = self.token_labels(ex, g)
            cols.append(c)
            shps.append(sh)
            ids = self.prompt_ids(ex.prompt, g[0] * g[1] * g[2] // 4)
            ans = self.tok(ex.answer, add_special_tokens=False)["input_ids"] + [self.eos] if with_answers else []
            seqs.append(ids + ans)
            last.append(len(ids) - 1)  # the position that predicts the answer
            labels.append([-100] * len(ids) + ans)
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
                "mm_token_type_ids": (input_ids == self.pad_id).int() * 2, "last": torch.tensor(last),
                "aux": {"color": torch.cat(cols), "shape": torch.cat(shps),
                        "content": torch.tensor([CONTENT.index(_truth(ex)) for ex in examples])}}


def _truth(ex) -> str:
    """The answer's content ("red", "circle", "3"), independent of the option order."""
    return ex.options[LETTERS.index(ex.answer)].split(". ", 1)[1]


class AuxHeads(torch.nn.Module):
    """Training-only heads that give dense signal early: the colour and shape of the needle in
    each visual token (on the vision tower's output) and the answer's content at the answer
    position (on the decoder's last hidden state). Never saved with the model."""

    def __init__(self, model):
        super().__init__()
        d = model.config.text_config.hidden_size
        self.color = torch.nn.Linear(d, len(COLORS) + 1)
        self.shape = torch.nn.Linear(d, len(SHAPES) + 1)
        self.content = torch.nn.Linear(d, len(CONTENT))
        self.visual = None
        model.model.visual.merger.register_forward_hook(lambda m, i, o: setattr(self, "visual", o))

    def loss(self, aux: dict, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional.cross_entropy
        v = self.visual
        h = hidden[torch.arange(len(last)), last]
        # colour over every token (is there a needle here, and which colour); shape on the needle
        # tokens only: averaged over all tokens, the 3 needle tokens among hundreds would give the
        # shape head almost no gradient (the model then never learns shapes)
        m = aux["shape"] > 0
        return f(self.color(v), aux["color"]) + f(self.shape(v[m]), aux["shape"][m]) + f(self.content(h), aux["content"])


def check_patchify(batcher: Batcher, proc) -> None:
    ex = make_example(TRAIN_SEED_LIMIT - 1, 33)
    ref = proc.video_processor(videos=[ex.frames], return_tensors="pt", do_sample_frames=False,
                               cap_pixels_per_frame=False)
    mine, grid = batcher.patchify(ex.frames)
    assert grid == ref["video_grid_thw"][0].tolist(), (grid, ref["video_grid_thw"])
    torch.testing.assert_close(mine, ref["pixel_values_videos"], atol=1e-5, rtol=1e-5)


def frames_for_step(step: int, steps: int, max_frames: int, rng: np.random.Generator) -> int:
    """Curriculum: short videos first, the full length from 60% of training on."""
    f = min(1.0, step / (0.6 * steps))
    hi = 32 + (max_frames - 32) * f
    return int(rng.integers(2, int(hi) // 16 + 1)) * 16


def lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate(model, batcher, seeds, frames: int, batch: int = 4) -> dict:
    model.eval()
    correct, by_task = 0, {}
    for s in range(0, len(seeds), batch):
        exs = [make_example(int(x), frames, task=TASKS[int(x) % len(TASKS)]) for x in seeds[s:s + batch]]
        inputs = batcher(exs, with_answers=False)
        last = inputs.pop("last")
        inputs.pop("labels")
        inputs.pop("aux")
        logits = model(**inputs, logits_to_keep=0).logits
        pred = logits[torch.arange(len(exs)), last].argmax(-1)
        for ex, p in zip(exs, pred.tolist()):
            ok = batcher.tok.decode([p]).strip() == ex.answer
            correct += ok
            by_task.setdefault(ex.task, []).append(ok)
    model.train()
    return {"accuracy": correct / len(seeds), **{t: sum(v) / len(v) for t, v in by_task.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--max-frames", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--tasks", default="color:1,shape:1,order:1,count:2",
                    help="tasks and their sampling weights (counting is the hardest: it gets twice the examples)")
    ap.add_argument("--eval-n", type=int, default=48, help="validation videos per evaluation (0: none)")
    ap.add_argument("--tokens-per-batch", type=int, default=TOKENS_PER_BATCH)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks, weights = zip(*[(t.split(":")[0], float(t.split(":")[1]) if ":" in t else 1.0)
                           for t in args.tasks.split(",")])
    task_p = np.array(weights) / sum(weights)

    model, proc = build_model(args.seed)
    batcher = Batcher(proc)
    check_patchify(batcher, proc)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, vocab {len(proc.tokenizer)}, steps {args.steps}", flush=True)
    model.train()
    heads = AuxHeads(model)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    val_seeds = list(range(TRAIN_SEED_LIMIT + 500_000, TRAIN_SEED_LIMIT + 500_000 + args.eval_n))
    losses = []
    t0 = time.time()
    ema = None
    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, step])
        frames = frames_for_step(step, args.steps, args.max_frames, rng)
        bsz = max(1, args.tokens_per_batch // (frames * 2 + 40))  # 2 visual tokens per frame + the text
        seeds = rng.integers(0, TRAIN_SEED_LIMIT, bsz)
        exs = [make_example(int(s), frames, task=tasks[int(rng.choice(len(tasks), p=task_p))]) for s in seeds]
        inputs = batcher(exs)
        last, aux = inputs.pop("last"), inputs.pop("aux")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        out = model(**inputs, output_hidden_states=True)
        aux_loss = heads.loss(aux, out.hidden_states[-1], last)
        loss = out.loss + AUX_WEIGHT * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = out.loss.item() if ema is None else 0.98 * ema + 0.02 * out.loss.item()
        aux_ema = aux_loss.item() if step == 0 else 0.98 * aux_ema + 0.02 * aux_loss.item()
        if step % 25 == 0:
            print(f"step {step:5d} frames {frames:3d} bsz {bsz:2d} loss {ema:.4f} aux {aux_ema:.3f} lr {g['lr']:.2e} "
                  f"{time.time() - t0:6.0f}s", flush=True)
        losses.append(out.loss.item())
        if args.eval_n and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            res = evaluate(model, batcher, val_seeds, min(128, args.max_frames))
            print(f"  eval@{step + 1} (128 frames): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    train_s = time.time() - t0
    final = {f: evaluate(model, batcher, val_seeds, f) for f in sorted({min(128, args.max_frames), args.max_frames})} \
        if args.eval_n else {}
    print(f"trained in {train_s / 60:.1f} min; validation: {final}", flush=True)

    model.eval()
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 4
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    card = {"trained": True, "architecture": "Qwen2VLForConditionalGeneration", "params": n_params,
            "task": "synthetic needle-in-a-video multiple choice (mmkv.synthetic): " + ", ".join(tasks),
            "prompt": f"Video-MME (lmms-eval) format; {SIZE}x{SIZE} frames at 2 fps",
            "train": {"steps": args.steps, "max_frames": args.max_frames, "lr": args.lr, "seed": args.seed,
                      # trained through transformers' own forward: transformers 5's M-RoPE layout
                      "rope_layout": "transformers",
                      "threads": args.threads, "minutes": round(train_s / 60, 1),
                      "command": "python tools/train_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv)},
            "validation": {str(k): v for k, v in final.items()}}
    with open(os.path.join(args.out, "mmkv.json"), "w") as f:
        json.dump(card, f, indent=1)
    print(f"saved to {args.out}")
    return {"losses": losses, "validation": final, "out": args.out}


if __name__ == "__main__":
    main()
