"""Train mmkv's high-resolution image benchmark model: a tiny LLaVA-OneVision that answers the three
questions of `mmkv.synthetic.hires` (locate, describe, count) about a 252 px image seen as an
AnyRes thumbnail plus 3 x 3 crops, one question at a time or in one conversation.

    python tools/train_hires.py --vision-steps 300 --freeze-vision --rank-aux 0.5 --attn-sup 1 \
        --heads 2 --kv-heads 2 --attn-sup-heads 0 --rope-theta 1e6 --steps 3200 --time-limit 32 \
        --threads 2 --eval-every 400                              # -> mmkv/assets/mmkv-hires (run C, 29 min)
    python tools/train_hires.py --steps 40 --out /tmp/m --eval-n 0     # a quick run

The model is a real LLaVA-OneVision (saved with save_pretrained, loaded by mmkv through
from_pretrained): SigLIP tower of 84 px views (patch 14: 6 x 6 tokens a view), AnyRes pinpoints up
to 3 x 3 crops, so a 252 px image is 36 thumbnail tokens + 324 crop tokens + 18 newlines = 378
visual tokens; decoder hidden 128, 4 layers, 4 heads over 2 KV heads. Training sequences are
whole conversations (the image, question 1, answer 1, question 2, ...), built with the model's
own chat template through the mmkv adapter (the same token ids mmkv feeds at inference); the loss
is on the answer tokens and the end-of-turn token, plus training-only auxiliary heads: the colour
and shape drawn in each visual token and the crop it shows (on the projector's output: the crop is
read from the task's per-crop background tint, mmkv.synthetic.hires.tint), and which crop row and
column each crop token lies in (on the decoder's hidden state after layer 2).

What the long-video model needed carries over as options (docs/model.md): `--vision-steps N`
trains the tower and projector alone first on what each token shows, `--freeze-vision` keeps them
fixed afterwards, `--rank-aux W` adds a decoder head for each object's rank among its shape read
so far (a count is the rank of the shape's last object), and `--attn-sup W` supervises the
attention of two heads of the last decoder layer at each answer word onto the crop token that
word is read from (the needle for locate and describe, the shape's last object for a count).

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

from train_long import AttentionSupervision, optimizer_step, pack_probes, text_shape  # noqa: E402
from train_tiny import lr_at  # noqa: E402

from mmkv.models.llava_onevision import LlavaOnevisionAdapter  # noqa: E402
from mmkv.models.tiny import make_tiny  # noqa: E402
from mmkv.synthetic import SHAPES  # noqa: E402
from mmkv.synthetic.hires import (CELL, COLS, CROP, GRID, KINDS, ROWS, SIZE, make_hires_example,  # noqa: E402
                                  question_text)
from mmkv.synthetic.hires import TINT as TINT_STEP  # noqa: E402
from mmkv.synthetic.hires import VERSION as HIRES_VERSION  # noqa: E402
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


def build_model(seed: int, embed_std: float = 0.02, heads: int | None = None, kv_heads: int | None = None,
                rope_theta: float = 10000.0):
    """The decoder of TEXT, optionally with `heads` query heads over `kv_heads` KV heads (head size
    hidden / heads) and another RoPE base: content retrieval over a ~400-token prompt needs rotary
    pairs that barely turn over that distance (docs/model.md, run T of the long model)."""
    torch.manual_seed(seed)
    text = text_shape(TEXT, heads, kv_heads)
    model, proc = make_tiny("llava_onevision", seed=seed, corpus=corpus(), vocab_size=500, text_overrides=text,
                            vision_overrides=VISION, image_size=CROP, max_crops=GRID, rope_theta=rope_theta)
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
        n_cells = SIZE // CELL
        self.cell_token = torch.full((n_cells, n_cells), -1, dtype=torch.long)   # full-image cell -> visual index
        self.cell_token[coords[crop, 1], coords[crop, 2]] = self.crop_tokens
        assert bool((self.cell_token >= 0).all()), "every 14 px cell must be one crop token"

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

    def object_order(self, ex) -> list:
        """The objects in the order the decoder reads their crop tokens (AnyRes packs the crops
        into one grid, row by row over the whole image)."""
        return sorted(ex.items, key=lambda it: int(self.cell_token[it.cell]))

    def ranks(self, ex) -> torch.Tensor:
        """Per crop token (visual index order): the object's rank among the objects of its shape
        read so far (1 = the first; 0 where no object): the count of a shape is the rank of its
        last object."""
        out = torch.zeros(self.n_visual, dtype=torch.long)
        seen: dict[str, int] = {}
        for it in self.object_order(ex):
            seen[it.shape] = seen.get(it.shape, 0) + 1
            out[self.cell_token[it.cell]] = seen[it.shape]
        return out

    def probe_rows(self, ex, spans) -> tuple[list[int], list[list[int]]]:
        """For `AttentionSupervision` (tools/train_long.py): the positions that predict an answer
        word and, per row, the sequence positions of the crop tokens that word is read from.
        locate and describe: both words on the needle (the object in the asked crop is the needle);
        count: the number on the last object of the needle's shape in reading order (its rank is
        the count, taught by `AuxHeads`' rank head); the shape word, which the question gives, and
        the end-of-turn token are left out."""
        at = lambda it: len(self.head) + int(self.cell_token[it.cell])  # noqa: E731
        rows, tgt = [], []
        for (a, b), q in zip(spans, ex.questions):
            if q.kind == "count":
                same = [it for it in self.object_order(ex) if it.shape == ex.needle.shape]
                per_row = [[at(same[-1])]]
            else:
                per_row = [[at(ex.needle)]] * (b - a - 1)
            rows += [a - 1 + j for j in range(len(per_row))]
            tgt += per_row
        return rows, tgt

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
        rows, targets = pack_probes([self.probe_rows(ex, sp) for ex, sp in zip(examples, spans)], n)
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
                "probe": (rows, targets),
                "aux": {"color": torch.cat(cols).flatten(), "shape": torch.cat(shps).flatten(),
                        "crop_at": len(self.head) + self.crop_tokens,
                        "rank": torch.stack([self.ranks(ex)[self.crop_tokens] for ex in examples])}}


def check_pixels(batcher: HiresBatcher, proc) -> None:
    from PIL import Image

    ex = make_hires_example(TRAIN_SEED_LIMIT - 1)
    ref = proc.image_processor(images=[Image.fromarray(ex.image)], return_tensors="pt")
    assert ref["image_sizes"].tolist() == [[SIZE, SIZE]], ref["image_sizes"]
    torch.testing.assert_close(batcher.pixels([ex.image]), ref["pixel_values"], atol=1e-5, rtol=1e-5)


def view_positions() -> tuple[torch.Tensor, torch.Tensor]:
    """[1 + GRID^2, SIDE^2] each: the crop row and column of the part of the image each view token
    shows (the thumbnail's token (i, j) covers crop (i, j) // (SIDE / GRID); a crop's tokens, that
    crop), read from the per-crop tint (mmkv.synthetic.hires.tint)."""
    i = torch.arange(SIDE * SIDE)
    per = SIDE // GRID
    rows = [i // SIDE // per] + [torch.full_like(i, v // GRID) for v in range(GRID * GRID)]
    cols = [i % SIDE // per] + [torch.full_like(i, v % GRID) for v in range(GRID * GRID)]
    return torch.stack(rows), torch.stack(cols)


class AuxHeads(torch.nn.Module):
    """Training-only heads (never saved): the colour and shape in each visual token (projector
    output; object and background tokens averaged apart, as an object is one token of ~40), the
    crop row / column of each crop token and, with `rank`, each object's rank among the objects
    of its shape read so far (decoder hidden state after POS_LAYER; weight `rank`, 0: off)."""

    def __init__(self, model, batcher: HiresBatcher, rank: float = 0.0):
        super().__init__()
        d = model.config.text_config.hidden_size
        self.color = torch.nn.Linear(d, len(COLORS) + 1)
        self.shape = torch.nn.Linear(d, len(SHAPES) + 1)
        self.row = torch.nn.Linear(d, GRID)
        self.col = torch.nn.Linear(d, GRID)
        self.vrow = torch.nn.Linear(d, GRID)      # the crop row / column each visual token shows (the tint)
        self.vcol = torch.nn.Linear(d, GRID)
        self.rank = torch.nn.Linear(d, GRID * GRID + 1) if rank else None
        self.rank_w = rank
        self.register_buffer("crop_row", batcher.crop_row.clone())
        self.register_buffer("crop_col", batcher.crop_col.clone())
        vr, vc = view_positions()
        self.register_buffer("view_row", vr)
        self.register_buffer("view_col", vc)
        self.visual = None
        model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: setattr(self, "visual", o))

    def visual_loss(self, aux: dict) -> tuple[torch.Tensor, dict]:
        """Colour and shape of each visual token (the last projector output), and their accuracies."""
        f = torch.nn.functional.cross_entropy
        v = torch.nn.functional.layer_norm(self.visual.float(), self.visual.shape[-1:]).flatten(0, 1)
        obj, m = aux["color"] > 0, aux["shape"] > 0
        pc, ps = self.color(v), self.shape(v[m])
        loss = f(pc[obj], aux["color"][obj]) + f(pc[~obj], aux["color"][~obj]) + f(ps, aux["shape"][m])
        b = v.shape[0] // self.view_row.numel()
        pr, pcol = self.vrow(v), self.vcol(v)
        vr, vc = self.view_row.flatten().repeat(b), self.view_col.flatten().repeat(b)
        loss = loss + f(pr, vr) + f(pcol, vc)
        with torch.no_grad():
            acc = {"color": (pc[obj].argmax(-1) == aux["color"][obj]).float().mean().item(),
                   "shape": (ps.argmax(-1) == aux["shape"][m]).float().mean().item(),
                   "none": (pc[~obj].argmax(-1) == 0).float().mean().item(),
                   "crop": ((pr.argmax(-1) == vr) & (pcol.argmax(-1) == vc)).float().mean().item()}
        return loss, acc

    def loss(self, aux: dict, hidden: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional.cross_entropy
        norm = lambda x: torch.nn.functional.layer_norm(x.float(), x.shape[-1:])  # noqa: E731
        h = norm(hidden[:, aux["crop_at"]])                                    # [B, 324, D]
        b = h.shape[0]
        out = (self.visual_loss(aux)[0] + f(self.row(h).flatten(0, 1), self.crop_row.repeat(b))
               + f(self.col(h).flatten(0, 1), self.crop_col.repeat(b)))
        if self.rank is not None:
            m = aux["rank"] > 0
            out = out + self.rank_w * f(self.rank(h[m]), aux["rank"][m])
        return out


def pretrain_vision(model, batcher: HiresBatcher, heads: AuxHeads, steps: int, seed: int, device, batch: int,
                    lr: float = 2e-3, log=print) -> dict:
    """Stage 1: the vision tower and projector (and the colour / shape heads) alone, on which
    colour and shape each visual token shows: no decoder, no sequence, so a step is cheap, and
    the decoder's training starts from tokens that already say what they show (the long-video
    model's first bottleneck, docs/model.md). Returns the last step's token accuracies."""
    cfg = model.config
    params = (list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
              + list(heads.color.parameters()) + list(heads.shape.parameters())
              + list(heads.vrow.parameters()) + list(heads.vcol.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    acc: dict = {}
    for step in range(steps):
        rng = np.random.default_rng([seed, 2_000_000 + step])
        exs = [make_hires_example(int(s)) for s in rng.integers(0, TRAIN_SEED_LIMIT, batch)]
        labels = [batcher.token_labels(ex) for ex in exs]
        aux = {"color": torch.cat([c for c, _ in labels]).flatten().to(device),
               "shape": torch.cat([s for _, s in labels]).flatten().to(device)}
        model.model.get_image_features(pixel_values=batcher.pixels([ex.image for ex in exs]).to(device),
                                       image_sizes=torch.tensor([[SIZE, SIZE]] * len(exs), device=device),
                                       vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        loss, acc = heads.visual_loss(aux)
        optimizer_step(opt, loss, lr_at(step, steps, lr))
        if step % 50 == 0 or step == steps - 1:
            log(f"vision {step:4d} loss {loss.item():.3f} " + " ".join(f"{k} {a:.2f}" for k, a in acc.items()))
    return acc


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
        inputs.pop("probe")
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
    ap.add_argument("--heads", type=int, default=None,
                    help=f"decoder query heads (default {TEXT['num_attention_heads']}; 2 gives 64-dim heads)")
    ap.add_argument("--kv-heads", type=int, default=None, help=f"decoder KV heads (default {TEXT['num_key_value_heads']})")
    ap.add_argument("--rope-theta", type=float, default=10000.0, help="the decoder's RoPE base")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="stage 1: steps of the vision tower and projector alone on what each token shows (0: none)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="after stage 1, train the decoder only (the tower and projector fixed)")
    ap.add_argument("--rank-aux", type=float, default=0.0,
                    help="weight of the decoder's rank head (each object's rank among its shape so far)")
    ap.add_argument("--attn-sup", type=float, default=0.0,
                    help="weight of the attention supervision (each answer word's attention on its object)")
    ap.add_argument("--attn-sup-layer", type=int, default=4)
    ap.add_argument("--attn-sup-heads", default="0,1")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model, proc = build_model(args.seed, args.embed_std, args.heads, args.kv_heads, args.rope_theta)
    batcher = HiresBatcher(model, proc)
    check_pixels(batcher, proc)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, vocab {len(proc.tokenizer)}, steps {args.steps}, device {device}", flush=True)
    model.train()
    heads = AuxHeads(model, batcher, args.rank_aux).to(device)
    vision_acc = pretrain_vision(model, batcher, heads, args.vision_steps, args.seed, device, args.batch,
                                 log=lambda m: print(m, flush=True)) if args.vision_steps else {}
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(False)
    params = [p for p in list(model.parameters()) + list(heads.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    probe = AttentionSupervision(model, args.attn_sup_layer, [int(h) for h in args.attn_sup_heads.split(",")]) \
        if args.attn_sup else None
    att_ema = None
    val_seeds = list(range(TRAIN_SEED_LIMIT + 500_000, TRAIN_SEED_LIMIT + 500_000 + max(args.eval_n, args.final_n)))
    losses, t0, ema, aux_ema, steps_done = [], time.time(), None, None, 0
    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, step])
        exs = [make_hires_example(int(s)) for s in rng.integers(0, TRAIN_SEED_LIMIT, args.batch)]
        inputs = to_device(batcher(exs), device)
        aux = inputs.pop("aux")
        inputs.pop("spans")
        probe_rows, probe_targets = inputs.pop("probe")
        if probe:
            probe.set(probe_rows.to(device), probe_targets.to(device))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**inputs, output_hidden_states=True)
            aux_loss = heads.loss(aux, out.hidden_states[POS_LAYER])
        loss = out.loss + args.aux_weight * aux_loss
        if probe:
            loss = loss + args.attn_sup * probe.loss
            att_ema = probe.loss.item() if att_ema is None else 0.98 * att_ema + 0.02 * probe.loss.item()
            probe.rows = None                                  # evaluation and other calls: plain SDPA
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
            print(f"step {step:5d} loss {ema:.4f} tokens {acc_ema:.3f} aux {aux_ema:.3f} "
                  + (f"att {att_ema:.3f} " if probe else "") + f"lr {g['lr']:.2e} {time.time() - t0:6.0f}s",
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

    if probe:
        model.set_attn_implementation({"text_config": "sdpa"})
    model.to("cpu").float().eval()
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    card = {"trained": True, "architecture": "LlavaOnevisionForConditionalGeneration", "params": n_params,
            "task_version": HIRES_VERSION,
            "task": "mmkv.synthetic.hires: locate, describe and count questions about a needle in one of "
                    "3 x 3 AnyRes crops, open answers, one at a time or in one conversation",
            "prompt": f"the question alone after the image; {SIZE}x{SIZE} images, {CROP} px views: "
                      f"{SIDE * SIDE} thumbnail tokens + {GRID}x{GRID} crops of {SIDE * SIDE} + newlines = "
                      f"{batcher.n_visual} visual tokens",
            "train": {"steps": steps_done, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                      "threads": args.threads, "device": str(device), "minutes": round(train_s / 60, 1),
                      "command": "python tools/train_hires.py " + " ".join(sys.argv[1:] if argv is None else argv)},
            "vision_stage": {"steps": args.vision_steps, "token_accuracy": vision_acc},
            "validation": final, "validation_images": args.final_n,
            "validation_note": "teacher-forced exact match on held-out seeds 1,500,000+"}
    with open(os.path.join(args.out, "mmkv.json"), "w") as f:
        json.dump(card, f, indent=1)
    print(f"saved to {args.out}")
    return {"losses": losses, "validation": final, "out": args.out}


if __name__ == "__main__":
    main()
