"""Train mmkv's high-resolution image benchmark model: a tiny LLaVA-OneVision that answers the three
questions of `mmkv.synthetic.hires` (locate, describe, count) about a 252 px image seen as an
AnyRes thumbnail plus 3 x 3 crops, one question at a time or in one conversation.

    python tools/train_hires.py                                   # -> mmkv/assets/mmkv-hires
    python tools/train_hires.py --steps 40 --out /tmp/m --eval-n 0     # a quick run

The model is a real LLaVA-OneVision (saved with save_pretrained, loaded by mmkv through
from_pretrained): SigLIP tower of 84 px views (patch 14: 6 x 6 tokens a view), AnyRes pinpoints up
to 3 x 3 crops, so a 252 px image is 36 thumbnail tokens + 324 crop tokens + 18 newlines = 378
visual tokens; decoder hidden 128, 4 layers, 4 heads over 2 KV heads. Training sequences are
whole conversations (the image, question 1, answer 1, question 2, ...), built with the model's
own chat template through the mmkv adapter (the same token ids mmkv feeds at inference); the loss
is on the answer tokens and the end-of-turn token, plus training-only auxiliary heads: the colour
and shape drawn in each visual token (on the projector's output), and which crop row and column
each crop token lies in (on the decoder's hidden state after layer 2; the decoder has 1-D
positions only, so "top left" must be learnt from where a token sits in the sequence).

Seeded and deterministic for a given machine and thread count: step i's data comes from seeds
derived from (--seed, i). Training seeds are below 1,000,000; held-out sets use 1,000,000 and up
(`mmkv bench quality --task image`), validation here 1,500,000 and up.
Uses the GPU when one is present (the same steps, bf16 autocast).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from train_tiny import lr_at  # noqa: E402

from mmkv.models.llava_onevision import LlavaOnevisionAdapter  # noqa: E402
from mmkv.models.tiny import make_tiny  # noqa: E402
from mmkv.synthetic import SHAPES  # noqa: E402
from mmkv.synthetic.hires import (CELL, COLS, CROP, GRID, KINDS, ROWS, SIZE, make_hires_example,  # noqa: E402
                                  question_text)
from mmkv.synthetic.long import COLORS, PLURAL  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "mmkv", "assets", "mmkv-hires")
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
BATCH = 16
AUX_WEIGHT = 0.5
POS_LAYER = 2          # the decoder hidden state the crop-position head reads
TRAIN_SEED_LIMIT = 1_000_000
SIDE = CROP // 14      # tokens per view side


def corpus() -> list[str]:
    """Text the tokenizer learns: every question and answer, the chat template's words."""
    places = [(r, c) for r in range(GRID) for c in range(GRID)]
    qs = [question_text(k, col, s, p) for k in KINDS for col in COLORS for s in SHAPES for p in places[:1]]
    qs += [question_text("describe", "red", "circle", p) for p in places]
    answers = [f"{c} {s}" for c in COLORS for s in SHAPES] + [f"{ROWS[r]} {COLS[c]}" for r, c in places]
    answers += [f"{k} {PLURAL[s]}" for k in range(2, 7) for s in SHAPES]
    return qs * 10 + answers * 10 + ["user", "assistant", "system"] * 20


def build_model(seed: int, embed_std: float = 0.02):
    torch.manual_seed(seed)
    model, proc = make_tiny("llava_onevision", seed=seed, corpus=corpus(), vocab_size=500, text_overrides=TEXT,
                            vision_overrides=VISION, image_size=CROP, max_crops=GRID)
    if embed_std != 0.02:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=embed_std)
    return model, proc


class HiresBatcher:
    """Conversations of the hires task as model inputs. Pixels are laid out exactly as the
    LLaVA-OneVision image processor does (checked in `check_pixels`); token ids come from the mmkv
    adapter (prefix, question suffix, follow-up turn), as at inference."""

    def __init__(self, model, proc):
        import torchvision.transforms.v2.functional as tvF

        self.tvF = tvF
        self.proc, self.tok = proc, proc.tokenizer
        ip = proc.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        self.adapter = a = LlavaOnevisionAdapter(model, proc)
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.eos = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.pad = self.tok.pad_token_id
        ids = a._tokenize(a._split_template("image", None)[0])
        at = ids.index(self.image_id)
        self.head, self.tail = ids[:at], ids[at + 1:]
        coords = a._image_coords(1 + GRID * GRID, torch.tensor([[SIZE, SIZE]]))    # [378, 3] (t, h, w)
        self.n_visual = coords.shape[0]
        crop = (coords[:, 0] == 1) & (coords[:, 1] >= 0)
        self.crop_tokens = crop.nonzero().squeeze(1)                                 # [324] among the visual tokens
        self.crop_row = coords[crop, 1] // SIDE
        self.crop_col = coords[crop, 2] // SIDE

    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        """[B, 1 + GRID^2, 3, CROP, CROP]: the thumbnail (bicubic, antialiased), then the crops row-major."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)                    # [B, 3, SIZE, SIZE] uint8
        thumb = self.tvF.resize(x, [CROP, CROP], interpolation=self.tvF.InterpolationMode.BICUBIC, antialias=True)
        b = x.shape[0]
        crops = x.reshape(b, 3, GRID, CROP, GRID, CROP).permute(0, 2, 4, 1, 3, 5).reshape(b, GRID * GRID, 3, CROP, CROP)
        views = torch.cat([thumb[:, None], crops], 1).float() / 255.0
        return (views - self.mean[None]) / self.std[None]

    @staticmethod
    def token_labels(ex) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view token [1 + GRID^2, SIDE^2]: the colour (1..6) and shape (1..4) drawn in it, 0 where
        none; the thumbnail's tokens (3 cells wide) get the colour only."""
        col = torch.zeros(1 + GRID * GRID, SIDE, SIDE, dtype=torch.long)
        shp = torch.zeros_like(col)
        for it in ex.items:
            c, s = list(COLORS).index(it.color) + 1, SHAPES.index(it.shape) + 1
            (cy, cx), (gy, gx) = it.crop, it.cell
            v = 1 + cy * GRID + cx
            col[v, gy % SIDE, gx % SIDE] = c
            shp[v, gy % SIDE, gx % SIDE] = s
            col[0, it.y * SIDE // SIZE, it.x * SIDE // SIZE] = c
        return col.flatten(1), shp.flatten(1)

    def conversation(self, ex) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """ids, labels (-100 outside the answers) and each answer's (start, end) label span."""
        a = self.adapter
        ids = self.head + [self.image_id] * self.n_visual + self.tail
        labels = [-100] * len(ids)
        spans = []
        for i, q in enumerate(ex.questions):
            if i == 0:
                turn = a.suffix(q.text, "image", 0).ids.tolist()
            else:
                turn = a.next_turn(q.text, "image", 0).ids.tolist()
                assert turn[0] == self.eos, "the follow-up turn must open with the end-of-turn token"
                turn = turn[1:]                       # that token is the last answer's label
            ans = self.tok(q.answer, add_special_tokens=False)["input_ids"] + [self.eos]
            ids += turn
            labels += [-100] * len(turn)
            spans.append((len(ids), len(ids) + len(ans)))
            ids += ans
            labels += ans
        return ids, labels, spans

    def __call__(self, examples) -> dict:
        seqs, labels, spans, cols, shps = [], [], [], [], []
        for ex in examples:
            ids, lab, sp = self.conversation(ex)
            seqs.append(ids)
            labels.append(lab)
            spans.append(sp)
            c, s = self.token_labels(ex)
            cols.append(c)
            shps.append(s)
        n = max(map(len, seqs))
        input_ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        lab = torch.full((len(seqs), n), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            input_ids[i, :len(s)] = torch.tensor(s)
            lab[i, :len(l)] = torch.tensor(l)
            mask[i, :len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab,
                "pixel_values": self.pixels([ex.image for ex in examples]),
                "image_sizes": torch.tensor([[SIZE, SIZE]] * len(examples)), "spans": spans,
                "aux": {"color": torch.cat(cols).flatten(), "shape": torch.cat(shps).flatten(),
                        "crop_at": len(self.head) + self.crop_tokens}}


def check_pixels(batcher: HiresBatcher, proc) -> None:
    from PIL import Image

    ex = make_hires_example(TRAIN_SEED_LIMIT - 1)
    ref = proc.image_processor(images=[Image.fromarray(ex.image)], return_tensors="pt")
    assert ref["image_sizes"].tolist() == [[SIZE, SIZE]], ref["image_sizes"]
    torch.testing.assert_close(batcher.pixels([ex.image]), ref["pixel_values"], atol=1e-5, rtol=1e-5)


class AuxHeads(torch.nn.Module):
    """Training-only heads (never saved): the colour and shape in each visual token (projector
    output), and the crop row / column of each crop token (decoder hidden state after POS_LAYER)."""

    def __init__(self, model, batcher: HiresBatcher):
        super().__init__()
        d = model.config.text_config.hidden_size
        self.color = torch.nn.Linear(d, len(COLORS) + 1)
        self.shape = torch.nn.Linear(d, len(SHAPES) + 1)
        self.row = torch.nn.Linear(d, GRID)
        self.col = torch.nn.Linear(d, GRID)
        self.register_buffer("crop_row", batcher.crop_row.clone())
        self.register_buffer("crop_col", batcher.crop_col.clone())
        self.visual = None
        model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: setattr(self, "visual", o))

    def loss(self, aux: dict, hidden: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional.cross_entropy
        norm = lambda x: torch.nn.functional.layer_norm(x.float(), x.shape[-1:])  # noqa: E731
        v = norm(self.visual).flatten(0, 1)                                    # [B * views * SIDE^2, D]
        m = aux["shape"] > 0
        h = norm(hidden[:, aux["crop_at"]])                                    # [B, 324, D]
        b = h.shape[0]
        return (f(self.color(v), aux["color"]) + f(self.shape(v[m]), aux["shape"][m])
                + f(self.row(h).flatten(0, 1), self.crop_row.repeat(b))
                + f(self.col(h).flatten(0, 1), self.crop_col.repeat(b)))


def to_device(inputs: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}


@torch.no_grad()
def evaluate(model, batcher, seeds, device, batch: int = 8) -> dict:
    """Exact-match accuracy per question kind and turn under teacher forcing (an answer counts only
    if every one of its tokens and the end-of-turn token is the argmax: what greedy decoding
    produces given the earlier turns)."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for s in range(0, len(seeds), batch):
        exs = [make_hires_example(int(x)) for x in seeds[s:s + batch]]
        inputs = to_device(batcher(exs), device)
        spans = inputs.pop("spans")
        inputs.pop("aux")
        labels = inputs.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**inputs, logits_to_keep=0).logits
        pred = logits.argmax(-1)
        for i, ex in enumerate(exs):
            for t, ((a, b), q) in enumerate(zip(spans[i], ex.questions)):
                ok = bool((pred[i, a - 1:b - 1] == labels[i, a:b]).all())
                hits.setdefault(q.kind, []).append(ok)
                hits.setdefault(f"turn{t + 1}", []).append(ok)
    model.train()
    allq = [x for k, v in hits.items() if not k.startswith("turn") for x in v]
    return {"accuracy": sum(allq) / max(1, len(allq)), **{k: sum(v) / len(v) for k, v in sorted(hits.items())}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=BATCH, help="images per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine two threads were 8x slower, measured)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=64, help="validation images per evaluation (0: none)")
    ap.add_argument("--final-n", type=int, default=200, help="validation images at the end (0: none)")
    ap.add_argument("--aux-weight", type=float, default=AUX_WEIGHT)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    ap.add_argument("--embed-std", type=float, default=0.02, help="initial std of the text embeddings")
    ap.add_argument("--time-limit", type=float, default=0, help="stop early after this many minutes (0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model, proc = build_model(args.seed, args.embed_std)
    batcher = HiresBatcher(model, proc)
    check_pixels(batcher, proc)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, vocab {len(proc.tokenizer)}, steps {args.steps}, device {device}", flush=True)
    model.train()
    heads = AuxHeads(model, batcher).to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    val_seeds = list(range(TRAIN_SEED_LIMIT + 500_000, TRAIN_SEED_LIMIT + 500_000 + max(args.eval_n, args.final_n)))
    losses, t0, ema, aux_ema, steps_done = [], time.time(), None, None, 0
    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, step])
        exs = [make_hires_example(int(s)) for s in rng.integers(0, TRAIN_SEED_LIMIT, args.batch)]
        inputs = to_device(batcher(exs), device)
        aux = inputs.pop("aux")
        inputs.pop("spans")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**inputs, output_hidden_states=True)
            aux_loss = heads.loss(aux, out.hidden_states[POS_LAYER])
        loss = out.loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        with torch.no_grad():   # teacher-forced accuracy of the answer tokens (end-of-turn excluded)
            lab = inputs["labels"][:, 1:]
            m = (lab != -100) & (lab != batcher.eos)
            tok_acc = (out.logits[:, :-1].argmax(-1) == lab)[m].float().mean().item()
        acc_ema = tok_acc if step == 0 else 0.95 * acc_ema + 0.05 * tok_acc
        ema = out.loss.item() if ema is None else 0.98 * ema + 0.02 * out.loss.item()
        aux_ema = aux_loss.item() if aux_ema is None else 0.98 * aux_ema + 0.02 * aux_loss.item()
        losses.append(out.loss.item())
        steps_done = step + 1
        if step % 25 == 0:
            print(f"step {step:5d} loss {ema:.4f} tokens {acc_ema:.3f} aux {aux_ema:.3f} lr {g['lr']:.2e} {time.time() - t0:6.0f}s",
                  flush=True)
        if args.eval_n and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            res = evaluate(model, batcher, val_seeds[:args.eval_n], device)
            print(f"  eval@{step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
        if args.time_limit and time.time() - t0 > 60 * args.time_limit:
            print(f"time limit reached after {step + 1} steps", flush=True)
            break
    train_s = time.time() - t0
    final = evaluate(model, batcher, val_seeds[:args.final_n], device) if args.final_n else {}
    if final:
        print("  final: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items()), flush=True)
    print(f"trained in {train_s / 60:.1f} min", flush=True)

    model.to("cpu").float().eval()
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    card = {"trained": True, "architecture": "LlavaOnevisionForConditionalGeneration", "params": n_params,
            "task": "mmkv.synthetic.hires: locate, describe and count questions about a needle in one of "
                    "3 x 3 AnyRes crops, open answers, one at a time or in one conversation",
            "prompt": f"the question alone after the image; {SIZE}x{SIZE} images, {CROP} px views: "
                      f"{SIDE * SIDE} thumbnail tokens + {GRID}x{GRID} crops of {SIDE * SIDE} + newlines = "
                      f"{batcher.n_visual} visual tokens",
            "train": {"steps": steps_done, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                      "threads": args.threads, "device": str(device), "minutes": round(train_s / 60, 1),
                      "command": "python tools/train_hires.py " + " ".join(sys.argv[1:] if argv is None else argv)},
            "validation": final, "validation_images": args.final_n,
            "validation_note": "teacher-forced exact match on held-out seeds 1,500,000+"}
    with open(os.path.join(args.out, "mmkv.json"), "w") as f:
        json.dump(card, f, indent=1)
    print(f"saved to {args.out}")
    return {"losses": losses, "validation": final, "out": args.out}


if __name__ == "__main__":
    main()
