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
(the colour and shape drawn in each visual token). An optional first stage (`--vision-steps`)
trains the vision tower alone on those labels (it sees one frame pair at a time, so a step is
cheap), and `--freeze-vision` keeps it fixed afterwards: in the joint run the shape labels stay
near chance for the first hundreds of steps, and no decoder can retrieve an object its tokens do
not yet describe. Videos grow from --min-frames (shorter ones are training-only runs of task v2's
objects) to --max-frames over the first 70% of the steps; the same number of visual tokens per
batch throughout.

Seeded and deterministic for a given machine and thread count: step i's data comes from seeds
derived from (--seed, i); with `--time-schedule` the curriculum and the learning rate follow the
elapsed share of `--time-limit` instead, so which lengths a step gets depends on the speed.
Training seeds are below 1,000,000; held-out sets use 1,000,000 and up.
Uses the GPU when one is present (the same steps, bf16 autocast).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from train_tiny import Batcher, lr_at  # noqa: E402

from mmkv.models.qwen2_vl import ROPE_LAYOUTS, QwenVLAdapter, rope_index  # noqa: E402
from mmkv.models.tiny import QWEN_SPECIAL, make_tiny  # noqa: E402
from mmkv.synthetic import SHAPES, Needle, render  # noqa: E402
from mmkv.synthetic.long import (  # noqa: E402
    CELL, COLORS, FPS, GAP, MIN_FRAMES, PLURAL, SIZE, LongExample, Question, _place, answers, make_long_example,
    question_text,
)

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "mmkv", "assets", "mmkv-long")
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
VISION = dict(embed_dim=64, num_heads=4, depth=2, mlp_ratio=2)
ROPE_THETA = 1e6
TOKENS_PER_BATCH = 8192  # visual tokens per step
AUX_WEIGHT = 0.5
TRAIN_SEED_LIMIT = 1_000_000
TOKENS_PER_SLOT = (SIZE // CELL) ** 2   # 16 visual tokens per 2 frames
TEXT_PER_QUESTION = 22                   # about: a question turn and its answer


def corpus() -> list[str]:
    """Text the tokenizer learns: every question and answer word, the chat template's words."""
    words = list(COLORS) + list(SHAPES) + list(PLURAL.values()) + ["1", "2", "3"]
    qs = [question_text(k, t) for k in ("order", "count") for t in SHAPES] + \
         [question_text("identify", c) for c in COLORS]
    answers = [f"{c} {s}" for c in COLORS for s in SHAPES] + [", ".join(p) for p in zip(COLORS, list(COLORS)[1:])]
    return (qs * 20 + answers * 10 + words * 20 + ["user", "assistant", "system"] * 20)


@dataclass
class Asked:
    """A question put to the model in training: task v2's kind and its target (a shape for order
    and count, a colour for identify), the text and the exact answer."""

    kind: str
    target: str
    text: str
    answer: str


def official(ex) -> list[Asked]:
    """The example's own three questions (the held-out task), in its conversation order."""
    tgt = {it.role: (it.color if it.role == "identify" else it.shape) for it in ex.items if it.role != "distractor"}
    return [Asked(q.kind, tgt[q.kind], q.text, q.answer) for q in ex.questions]


def question_pool(items, exclude=()) -> list[Asked]:
    """Every question of task v2's three kinds that `items` answer in the task's own form: order
    and count of any shape with 1-3 objects, identify of any colour with exactly one object
    (less the (kind, target) pairs in `exclude`)."""
    out = []
    for shape in SHAPES:
        if 1 <= sum(it.shape == shape for it in items) <= 3:
            out += [Asked(k, shape, question_text(k, shape), answers(items, k, shape))
                    for k in ("order", "count") if (k, shape) not in exclude]
    for color in COLORS:
        if sum(it.color == color for it in items) == 1 and ("identify", color) not in exclude:
            out.append(Asked("identify", color, question_text("identify", color), answers(items, "identify", color)))
    return out


def training_questions(ex, rng: np.random.Generator, extra: int) -> list[Asked]:
    """A training conversation, in a random order: a task-v2 video's three questions plus up to
    `extra` others from its pool (more answers per encoded video; the held-out questions are the
    example's own three); a short video's (`short_example`) up to 3 + `extra` from its pool."""
    own = official(ex) if ex.questions else []
    pool = question_pool(ex.items, {(q.kind, q.target) for q in own})
    k = min(len(pool), extra + (0 if own else 3))
    qs = own + [pool[i] for i in rng.choice(len(pool), k, replace=False)]
    return [qs[i] for i in rng.permutation(len(qs))]


def short_example(seed: int, frames: int):
    """A training-only video shorter than task v2's shortest (MIN_FRAMES): a run of consecutive
    objects of a task-v2 video, placed over `frames` frames as task v2 places them, on task v2's
    background; no questions of its own (`training_questions` draws them from its pool). Short
    contexts first: in a from-scratch model attention starts uniform, so over 768+ visual tokens
    the gradient that teaches it to look anywhere in particular (even at the question) is tiny."""
    base = make_long_example(seed, MIN_FRAMES, render_frames=False)
    rng = np.random.default_rng([seed, frames, 2])
    items = sorted(base.items, key=lambda it: it.start)
    i = int(rng.integers(len(items)))
    want, run, used = int(rng.integers(1, 6)), [], -GAP
    for it in items[i:] + items[:i]:
        if len(run) == want or used + GAP + it.length > frames:
            break
        run.append(it)
        used += GAP + it.length
    run = run or [min(items, key=lambda it: it.length)]
    placed = _place(rng, frames, [(it.color, it.shape, it.role) for it in run], [it.length for it in run])
    needles = [Needle(it.start, it.length, it.color, it.shape, it.x, it.y, it.size) for it in placed]
    return LongExample(seed, frames, placed, [], render(frames, needles, rng, SIZE, palette=COLORS))


def text_shape(base: dict, heads: int | None, kv_heads: int | None) -> dict:
    """`base` (a decoder config) with `heads` query heads over `kv_heads` KV heads where given;
    a count that does not divide the hidden size (or the query heads) is a ValueError."""
    text = dict(base, **({"num_attention_heads": heads} if heads else {}),
                **({"num_key_value_heads": kv_heads} if kv_heads else {}))
    if text["hidden_size"] % text["num_attention_heads"] or text["num_attention_heads"] % text["num_key_value_heads"]:
        raise ValueError(f"heads must divide hidden size {text['hidden_size']} and be a multiple of the KV heads, "
                         f"got {text['num_attention_heads']} over {text['num_key_value_heads']}")
    return text


def pack_probes(per: list[tuple[list[int], list[list[int]]]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (rows, each row's target positions) as AttentionSupervision's tensors:
    rows [B, R] (-1 = none) and targets [B, R, n] bool."""
    r = max(1, max(len(x[0]) for x in per))
    rows = torch.full((len(per), r), -1, dtype=torch.long)
    targets = torch.zeros((len(per), r, n), dtype=torch.bool)
    for i, (rw, tg) in enumerate(per):
        rows[i, :len(rw)] = torch.tensor(rw, dtype=torch.long)
        for j, k in enumerate(tg):
            targets[i, j, k] = True
    return rows, targets


def build_model(seed: int, mrope_section: list[int] | None = None, heads: int | None = None,
                kv_heads: int | None = None):
    """The decoder of TEXT, optionally with `heads` query heads over `kv_heads` KV heads (Qwen2-VL's
    head size is hidden / heads: 2 heads give 64-dim heads, 32 rotary frequencies instead of 16)."""
    torch.manual_seed(seed)
    text = text_shape(TEXT, heads, kv_heads)
    return make_tiny("qwen2_vl", seed=seed, corpus=corpus(), vocab_size=600, split_lines=False,
                     text_overrides=text, vision_overrides=VISION, min_pixels=SIZE * SIZE,
                     max_pixels=SIZE * SIZE, rope_theta=ROPE_THETA, mrope_section=mrope_section)


class LongBatcher(Batcher):
    """Conversations of task v2 as model inputs. Token ids come from the mmkv adapter (prefix,
    question suffix, follow-up turn), so training sees exactly what mmkv feeds at inference."""

    def __init__(self, model, proc, sup_targets: str = "objects"):
        super().__init__(proc)
        self.sup_targets = sup_targets
        self.adapter = QwenVLAdapter(model, proc)
        prefix = self.adapter._split_template("video", None)[0]
        ids = self.adapter._tokenize(prefix)
        at = ids.index(self.pad_id)
        self.head, self.tail = ids[:at], ids[at + 1:]

    @staticmethod
    def token_labels(ex, grid):
        """Per merged visual token (vision-tower output order t, h, w): the colour (1..6) and shape
        (1..4) drawn in it, 0 where none; on object tokens also whether it is the object's first
        frame pair (1) or a later one (2), the object's rank among the objects of its shape
        so far (1: the first, 2, 3, 4: the fourth or later) and the colour of the previous object
        of its shape (1..6; 0: it is the first), 0 elsewhere."""
        gt, gh, gw = grid[0], grid[1] // 2, grid[2] // 2
        col, shp, start, rank, prev = (torch.zeros(gt, gh, gw, dtype=torch.long) for _ in range(5))
        seen: dict[str, int] = {}
        last: dict[str, int] = {}
        for it in sorted(ex.items, key=lambda it: it.start):
            t0, t1 = it.start // 2, (it.start + it.length - 1) // 2
            y, x = it.cell
            col[t0:t1 + 1, y, x] = list(COLORS).index(it.color) + 1
            shp[t0:t1 + 1, y, x] = SHAPES.index(it.shape) + 1
            start[t0, y, x], start[t0 + 1:t1 + 1, y, x] = 1, 2
            rank[t0:t1 + 1, y, x] = min(seen.get(it.shape, 0), 3) + 1
            prev[t0:t1 + 1, y, x] = last.get(it.shape, 0)
            seen[it.shape] = seen.get(it.shape, 0) + 1
            last[it.shape] = list(COLORS).index(it.color) + 1
        return col.flatten(), shp.flatten(), start.flatten(), rank.flatten(), prev.flatten()

    def conversation(self, questions: list[Asked], n_visual: int) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """ids, labels (-100 outside the answers) and each answer's (start, end) label span."""
        a = self.adapter
        ids = self.head + [self.pad_id] * n_visual + self.tail
        labels = [-100] * len(ids)
        spans = []
        for i, q in enumerate(questions):
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

    def probe_rows(self, examples, questions, grids, spans, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For AttentionSupervision: the positions that predict an answer token ([B, R], -1 = none)
        and, per row, the visual tokens it should read ([B, R, n] bool). `self.sup_targets`:
        "objects": every row of an answer gets every object the question is about (order and
        count: the objects of the asked shape; identify: the object of the asked colour);
        "step": each row gets what its own next token needs: an order answer's k-th colour and
        the comma before it the k-th object, a count's number the last object of the shape (its
        rank among the objects of its shape is the count; `AuxHeads`' rank head teaches it),
        an identify answer's colour and shape its object; rows that need no object (the
        end-of-turn token, a count's shape word) are left out."""
        per = []
        for ex, qs, g, sp in zip(examples, questions, grids, spans):
            gh, gw = g[1] // 2, g[2] // 2

            def keys(objs):
                return [len(self.head) + (t * gh + it.cell[0]) * gw + it.cell[1]
                        for it in objs for t in range(it.start // 2, (it.start + it.length - 1) // 2 + 1)]

            rows, tgt = [], []
            for (a, b), q in zip(sp, qs):
                if not q.target:                   # evaluation: the question alone, nothing supervised
                    continue
                objs = sorted((it for it in ex.items if (it.color if q.kind == "identify" else it.shape) == q.target),
                              key=lambda it: it.start)
                if self.sup_targets == "objects":
                    rows += list(range(a - 1, b - 1))
                    tgt += [keys(objs)] * (b - a)
                    continue
                if q.kind == "order":
                    if b - a != 2 * len(objs):
                        raise ValueError(f"order answer {q.answer!r}: {b - a} tokens for {len(objs)} objects")
                    per_row = [keys([objs[(j + 1) // 2]]) for j in range(2 * len(objs) - 1)]
                elif q.kind == "count":
                    per_row = [keys(objs[-1:])]        # the last one: its rank among its shape is the count
                else:
                    per_row = [keys(objs)] * 2
                rows += [a - 1 + j for j in range(len(per_row))]
                tgt += per_row
            per.append((rows, tgt))
        return pack_probes(per, n)

    def __call__(self, examples, questions: list[list[Asked]] | None = None):
        """Model inputs for `examples`, each a conversation of `questions` (default: the example's
        own three)."""
        questions = questions or [official(ex) for ex in examples]
        seqs, labels, pix, grids, spans, aux = [], [], [], [], [], []
        for ex, qs in zip(examples, questions):
            p, g = self.patchify(ex.frames)
            pix.append(p)
            grids.append(g)
            aux.append(self.token_labels(ex, g))
            ids, lab, sp = self.conversation(qs, g[0] * g[1] * g[2] // 4)
            seqs.append(ids)
            labels.append(lab)
            spans.append(sp)
        n = max(map(len, seqs))
        rows, targets = self.probe_rows(examples, questions, grids, spans, n)
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
                "spans": spans, "probe": (rows, targets), "aux": {k: torch.cat(v) for k, v in zip(("color", "shape", "start", "rank", "prev"), zip(*aux))}}


class AuxHeads(torch.nn.Module):
    """Training-only heads, never saved with the model (dense signal early on):
    - on the vision tower's output, the colour (every visual token: which colour, or none) and the
      shape (object tokens only) drawn in each visual token;
    - on the decoder's hidden state after layer `layer` at the visual tokens (object tokens only),
      whether the token is its object's first frame pair and the object's rank among the objects
      of its shape so far: the two facts that counting and ordering need, which no single frame
      pair shows (weight `decoder`, 0: off); with `prev`, also the colour of the previous object
      of the same shape (none for the first): an ordered answer is then a chain of lookups (the
      object of the asked shape whose predecessor has the colour just written), not a count of the
      colours written so far."""

    def __init__(self, model, decoder: float = 0.0, layer: int = 2, prev: bool = False):
        super().__init__()
        d = model.config.text_config.hidden_size
        self.color = torch.nn.Linear(d, len(COLORS) + 1)
        self.shape = torch.nn.Linear(d, len(SHAPES) + 1)
        self.start = torch.nn.Linear(d, 3)
        self.rank = torch.nn.Linear(d, 5)
        self.prev = torch.nn.Linear(d, len(COLORS) + 1) if prev else None
        self.decoder = decoder
        self.visual = self.hidden = None
        model.model.visual.merger.register_forward_hook(lambda m, i, o: setattr(self, "visual", o))
        if decoder:
            hook = lambda m, i, o: setattr(self, "hidden", o[0] if isinstance(o, tuple) else o)  # noqa: E731
            model.model.language_model.layers[layer - 1].register_forward_hook(hook)

    def loss(self, aux: dict, visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`visual_mask` [B, L]: where the visual tokens are in the decoder's input."""
        f = torch.nn.functional.cross_entropy
        v = self.visual.float()
        m = aux["shape"] > 0
        c = self.color(v)   # object and background tokens apart: objects are ~1% of the tokens
        out = f(c[m], aux["color"][m]) + f(c[~m], aux["color"][~m]) + f(self.shape(v[m]), aux["shape"][m])
        if self.decoder and visual_mask is not None:
            h = self.hidden[visual_mask].float()[m]                              # [N_obj, d]
            out = out + self.decoder * (f(self.start(h), aux["start"][m]) + f(self.rank(h), aux["rank"][m]))
            if self.prev is not None:
                out = out + self.decoder * f(self.prev(h), aux["prev"][m])
        return out


class AttentionSupervision:
    """Training-only auxiliary loss on the decoder's attention (no parameters, nothing saved):
    at every position that predicts an answer token, the query heads `heads` of decoder layer
    `layer` (1-based) should put their attention on the visual tokens of the objects the question
    is about (order: every object of the asked shape; count: likewise; identify: the one object of
    the asked colour). The loss is -log(mass on those tokens), averaged over rows and heads.

    It runs inside the model's own attention call (a registered transformers attention function
    that computes SDPA as usual and, for that one layer, the softmax of the few supervised rows
    against every key: rows x keys, never keys x keys)."""

    NAME = "mmkv_train_probe"

    def __init__(self, model, layer: int, heads: list[int]):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        self.layer, self.heads = layer - 1, list(heads)
        self.rows = self.targets = self.loss = None

        def attention(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == self.layer and self.rows is not None:
                self._capture(module, query, key, kwargs.get("scaling") or module.scaling)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.NAME, attention)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)
        model.set_attn_implementation({"text_config": self.NAME})

    def set(self, rows: torch.Tensor, targets: torch.Tensor) -> None:
        """rows [B, R] (positions, -1 = none), targets [B, R, L] bool (the keys each row should attend)."""
        self.rows, self.targets, self.loss = rows, targets, None

    def _capture(self, module, query, key, scaling: float) -> None:
        b, hq, n, d = query.shape
        g = hq // key.shape[1]
        heads = torch.tensor(self.heads, device=query.device)
        rows = self.rows.clamp_min(0)                                              # [B, R]
        q = query[:, heads].gather(2, rows[:, None, :, None].expand(b, len(heads), -1, d))  # [B, h, R, d]
        k = key[:, heads // g]                                                     # [B, h, L, d]
        sc = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling         # [B, h, R, L]
        causal = torch.arange(n, device=query.device)[None, None, :] <= rows[:, :, None]   # [B, R, L]
        sc = sc.masked_fill(~causal[:, None], float("-inf"))
        logp = sc.log_softmax(-1)
        tgt = self.targets[:, None]                                                # [B, 1, R, L]
        mass = logp.masked_fill(~tgt, float("-inf")).logsumexp(-1)                 # [B, h, R] log mass
        valid = (self.rows >= 0)[:, None].expand_as(mass)
        self.loss = -(mass[valid]).mean()


def batch_vision_attention(model) -> None:
    """Training speed (the patch embedding as one matmul, below, too): transformers' Qwen2-VL vision attention (without flash-attention) runs one
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

    def patch_embed(self, hidden_states):
        # Conv3d with kernel = stride over a whole patch is one matmul with the flattened kernel:
        # the same result, and its weight gradient is ~3x cheaper on CPU than the convolution's.
        w = self.proj.weight
        return F.linear(hidden_states.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)

    pe = model.model.visual.patch_embed
    pe.forward = types.MethodType(patch_embed, pe)


def check_batched_vision(model, batcher) -> None:
    ex = make_long_example(TRAIN_SEED_LIMIT - 1, 96)
    pix, grid = batcher.patchify(ex.frames)
    thw = torch.tensor([grid])
    with torch.no_grad():
        ref = model.model.get_video_features(pix, thw, return_dict=True).pooler_output[0]
        batch_vision_attention(model)
        got = model.model.get_video_features(pix, thw, return_dict=True).pooler_output[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def optimizer_step(opt, loss: torch.Tensor, lr: float) -> None:
    """One plain step at learning rate `lr` (the vision stages; no clipping)."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def pretrain_vision(model, batcher, heads, steps: int, seed: int, device, lr: float = 2e-3, videos: int = 8,
                    frames: int = 32, log=print) -> dict:
    """Stage 1: the vision tower (and the colour / shape heads) alone, on the frame pairs of short
    training videos: which colour and shape each visual token shows. The vision tower sees one
    frame pair at a time, so this needs no decoder and no long sequence (a step is ~0.2 s on two
    CPU cores), and the decoder's training then starts from tokens that already say what they
    show. Colour and shape are scored on the object tokens, "no object" on the rest, each term
    averaged on its own (an object covers ~1% of the tokens: a pooled loss learns "none" first).
    Returns the last step's token accuracies."""
    f = torch.nn.functional.cross_entropy
    vis = model.model.visual
    params = list(vis.parameters()) + list(heads.color.parameters()) + list(heads.shape.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    acc = {}
    for step in range(steps):
        rng = np.random.default_rng([seed, 1_000_000 + step])
        exs = [example(int(s), frames) for s in rng.integers(0, TRAIN_SEED_LIMIT, videos)]
        pix, grids, col, shp = [], [], [], []
        for ex in exs:
            p, g = batcher.patchify(ex.frames)
            c, sh = batcher.token_labels(ex, g)[:2]
            pix.append(p), grids.append(g), col.append(c), shp.append(sh)
        col, shp = torch.cat(col).to(device), torch.cat(shp).to(device)
        v = model.model.get_video_features(torch.cat(pix).to(device), torch.tensor(grids, device=device),
                                           return_dict=True).pooler_output
        v = (torch.cat(list(v)) if isinstance(v, (list, tuple)) else v).float()
        m = shp > 0
        pc, ps = heads.color(v), heads.shape(v)
        loss = f(pc[m], col[m]) + f(ps[m], shp[m]) + f(pc[~m], col[~m]) + f(ps[~m], shp[~m])
        optimizer_step(opt, loss, lr_at(step, steps, lr))
        if step % 50 == 0 or step == steps - 1:
            acc = {"color": (pc[m].argmax(-1) == col[m]).float().mean().item(),
                   "shape": (ps[m].argmax(-1) == shp[m]).float().mean().item(),
                   "none": ((pc[~m].argmax(-1) == 0) & (ps[~m].argmax(-1) == 0)).float().mean().item()}
            log(f"vision {step:4d} loss {loss.item():.3f} " + " ".join(f"{k} {a:.2f}" for k, a in acc.items()))
    return acc


def frames_for_step(step: int, steps: int, max_frames: int, rng: np.random.Generator, min_frames: int = 16,
                    full_at: float = 0.7) -> int:
    """Curriculum: videos of `min_frames` first; the longest grows quadratically to `max_frames`
    at `full_at` of the steps; each step draws its length uniformly up to that (multiples of 8).
    Below MIN_FRAMES the videos are `short_example`s."""
    f = min(1.0, step / (full_at * steps)) ** 2
    hi = min_frames + (max_frames - min_frames) * f
    return int(rng.integers(min_frames // 8, int(hi) // 8 + 1)) * 8


def example(seed: int, frames: int, codec: bool = True, sparse: bool = False):
    """Task v2's example of (`seed`, `frames`) (`sparse` or below MIN_FRAMES: a `short_example`).
    With `codec` its frames go through the mp4 round trip the held-out videos take
    (mmkv.synthetic.write_video, MPEG-4 part 2, then decoded as mmkv.io decodes it): the model
    trains on the pixels it is tested on, ringing included."""
    sparse = sparse or frames < MIN_FRAMES
    ex = short_example(int(seed), frames) if sparse else make_long_example(int(seed), frames)
    if codec:
        import tempfile

        import cv2

        from mmkv.synthetic import write_video

        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
            path = os.path.join(d, "v.mp4")
            write_video(path, ex.frames, FPS)
            cap, out = cv2.VideoCapture(path), []
            while True:
                ok, f = cap.read()
                if not ok:
                    break
                out.append(f[:, :, ::-1])
            cap.release()
        if len(out) != frames:
            raise RuntimeError(f"the mp4 round trip gave {len(out)} frames, not {frames}")
        ex.frames = np.ascontiguousarray(np.stack(out))
    return ex


def rope_positions(model, inputs: dict, layout: str = "released") -> torch.Tensor:
    """The M-RoPE positions of `inputs` as mmkv's Qwen adapter computes them (the model's own
    get_rope_index in `layout`, `mmkv.models.qwen2_vl.rope_index`): [3, B, L]."""
    return rope_index(model, inputs["input_ids"], inputs["mm_token_type_ids"], layout=layout,
                      attention_mask=inputs["attention_mask"], video_grid_thw=inputs["video_grid_thw"])


def shift_time(model, inputs: dict, pad_id: int, span: int, rng: np.random.Generator,
               layout: str = "released") -> torch.Tensor:
    """M-RoPE positions of `inputs` as if each (short) training video were a stretch of one of
    up to `span` frame pairs: the question-to-needle distances of the long held-out videos.

    Why: trained only on short videos, a from-scratch model has never seen the rotations between
    a question and a needle hundreds of temporal slots before it, and fails at length (runs B-I:
    chance at 256+ frames). Random offsets teach the distances the long held-out videos have (in
    the spirit of randomized positional encodings, Ruoss et al., 2023), while distances inside the
    video are unchanged. In the "released" layout (text after a video at the video's largest
    position + 1, on all three axes) everything after the video moves by one random gap in
    [0, span - slots]: the positions a video of that many more slots would give the text. In the
    "transformers" layout (the text at the video's start + its height/width extent, whatever its
    length) the video's temporal positions move by that offset instead.
    Returns position_ids [3, B, L]."""
    pos = rope_positions(model, inputs, layout)
    for b in range(pos.shape[1]):
        vis = inputs["input_ids"][b] == pad_id
        t = int(inputs["video_grid_thw"][b][0])
        r = int(rng.integers(0, max(0, span - t) + 1))
        if layout == "released":
            after = torch.arange(len(vis), device=vis.device) > vis.nonzero()[-1, 0]
            pos[:, b, after & inputs["attention_mask"][b].bool()] += r
        else:
            pos[0, b, vis] += r
    return pos


def answer_positions(pos: torch.Tensor, spans: list[list[tuple[int, int]]]) -> torch.Tensor:
    """The M-RoPE positions of a training conversation as mmkv (and transformers' generate, through
    its rope_deltas) gives them at inference: the first answer token is fed at the largest prompt
    position + 1, and everything after it (the answer, the follow-up turns and their answers)
    continues one by one from there. `get_rope_index` over a whole conversation instead continues
    the answer from the question's own text position, which for a video sits below the video's
    temporal positions: a model trained on that reads its answers' second and later tokens at
    positions it never meets when it generates (M and earlier runs: right first words, broken
    rest). In the released layout, where all text after the video is contiguous, this changes
    nothing. pos [3, B, L] (changed in place and returned); spans: each conversation's answer spans."""
    for b, sp in enumerate(spans):
        a0 = sp[0][0]
        pos[:, b, a0:] += pos[:, b, :a0].max() + 1 - pos[0, b, a0]
    return pos


def to_device(inputs: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}


def sparse_example(seed: int, frames: int, codec: bool = True):
    """A training-style video (`short_example`: a run of at most 5 of task v2's objects, no extra
    distractors) of any length, with three questions from its pool: the diagnostic that tells
    length apart from density (`--evaluate CKPT --sparse`)."""
    ex = example(seed, frames, codec, sparse=True)
    qs = training_questions(ex, np.random.default_rng([seed, 3]), 0)
    ex.questions = [Question(q.kind, q.text, q.answer) for q in qs]
    return ex


@torch.no_grad()
def evaluate(model, batcher, seeds, frames: int, device, batch: int = 2, codec: bool = True, layout: str = "released",
             sparse: bool = False) -> dict:
    """Exact-match accuracy per question kind under teacher forcing (an answer counts only if
    every one of its tokens, and the end-of-turn token, is the argmax: exactly what greedy
    decoding would produce given the earlier turns, at the positions mmkv generates with:
    `answer_positions`, in `layout`, mmkv's Qwen adapter's `rope_layout`). `sparse`:
    `sparse_example`s instead."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for s in range(0, len(seeds), batch):
        exs = [(sparse_example if sparse else example)(int(x), frames, codec) for x in seeds[s:s + batch]]
        inputs = to_device(batcher(exs, [[Asked(q.kind, "", q.text, q.answer) for q in ex.questions] for ex in exs]),
                           device)
        spans = inputs.pop("spans")
        inputs.pop("aux")
        inputs.pop("probe")
        labels = inputs.pop("labels")
        inputs["position_ids"] = answer_positions(rope_positions(model, inputs, layout), spans).to(device)
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


def evaluate_checkpoint(args, device) -> dict:
    """`--evaluate CKPT`: the held-out accuracy of a saved model, per length, as one JSON line each."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.evaluate).to(device).eval()
    batcher = LongBatcher(model, AutoProcessor.from_pretrained(args.evaluate))
    seeds = list(range(TRAIN_SEED_LIMIT + 600_000, TRAIN_SEED_LIMIT + 600_000 + (args.eval_n or 24)))
    out = {}
    for f in [int(x) for x in args.final_frames.split(",") if x]:
        out[str(f)] = evaluate(model, batcher, seeds, f, device, batch=1, codec=args.codec, sparse=args.sparse,
                               layout=args.rope_layout)
        print(json.dumps({"checkpoint": args.evaluate, "frames": f, "sparse": args.sparse, "n": len(seeds),
                          **{k: round(v, 3) for k, v in out[str(f)].items()}}), flush=True)
    return {"validation": out}


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
    ap.add_argument("--decoder-aux", type=float, default=0.0, help="weight of the decoder's auxiliary heads")
    ap.add_argument("--decoder-aux-layer", type=int, default=2)
    ap.add_argument("--aux-prev", action="store_true",
                    help="decoder auxiliary head on the colour of the previous object of the same shape")
    ap.add_argument("--attn-sup", type=float, default=0.0, help="weight of the attention supervision")
    ap.add_argument("--attn-sup-layer", type=int, default=4)
    ap.add_argument("--attn-sup-heads", default="0,1")
    ap.add_argument("--attn-sup-targets", choices=("objects", "step"), default="objects",
                    help="what each supervised answer row should attend: every object the question is about, "
                         "or (step) what its own next token needs (an order answer's k-th object)")
    ap.add_argument("--min-frames", type=int, default=16, help="the curriculum's first video length")
    ap.add_argument("--extra-questions", type=int, default=0,
                    help="training conversations: the video's three questions and up to this many others")
    ap.add_argument("--codec", action=argparse.BooleanOptionalAction, default=True,
                    help="train on frames after the mp4 round trip the held-out videos take")
    ap.add_argument("--eval-frames", type=int, default=256)
    ap.add_argument("--evaluate", metavar="CKPT", help="evaluate a saved checkpoint at --final-frames (--eval-n "
                                                        "held-out videos each) and exit; trains nothing")
    ap.add_argument("--sparse", action="store_true",
                    help="with --evaluate: training-style videos (at most 5 objects, no extra distractors)")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="stage 1: steps of the vision tower alone on what each token shows (0: none)")
    ap.add_argument("--generation-positions", action=argparse.BooleanOptionalAction, default=True,
                    help="train on the positions mmkv generates with (answers after the largest prompt "
                         "position, as transformers' rope_deltas); --no-generation-positions: get_rope_index's "
                         "positions over the whole conversation (runs up to M; their answers break at inference). "
                         "Training only: validation always uses mmkv's positions")
    ap.add_argument("--rope-layout", choices=ROPE_LAYOUTS, default="released",
                    help="M-RoPE layout of training and validation: 'released' (text after a video continues "
                         "after its largest position, as Qwen's own code and mmkv's Qwen adapter) or 'transformers' "
                         "(transformers 5's get_rope_index as it is: runs up to P; mmkv reads such a checkpoint "
                         "with pipe.adapter.rope_layout = 'transformers'). Validation and --evaluate use it too")
    ap.add_argument("--heads", type=int, default=None,
                    help=f"decoder query heads (default {TEXT['num_attention_heads']}; head size = hidden "
                         f"{TEXT['hidden_size']} / heads, so 2 gives 64-dim heads with 32 rotary frequencies)")
    ap.add_argument("--kv-heads", type=int, default=None, help=f"decoder KV heads (default {TEXT['num_key_value_heads']})")
    ap.add_argument("--mrope-section", default="",
                    help="the decoder's rotary frequencies (highest first) per temporal, height, width axis, "
                         "summing to head_dim / 2 (16 with 4 heads), e.g. 10,3,3 (default: Qwen's split scaled, 4,6,6)")
    ap.add_argument("--time-offset", type=int, default=0,
                    help="frame pairs: each training video's temporal positions start at a random offset "
                         "inside this span (0: none; 1024 covers held-out videos of 2,048 frames)")
    ap.add_argument("--dense-share", type=float, default=0.0,
                    help="share of the curriculum's short steps that get task v2's own (dense) videos "
                         f"of {MIN_FRAMES}+ frames instead: its distractors from the start")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="after stage 1, train the decoder only (no backward through the vision tower)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop early after this many minutes (0: none)")
    ap.add_argument("--time-schedule", action="store_true",
                    help="with --time-limit: the curriculum and the learning rate follow the elapsed time "
                         "when it runs ahead of the step count, so a slow machine still ends annealed on long "
                         "videos (the data of each step stays seeded; which lengths it gets depends on speed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.evaluate:
        return evaluate_checkpoint(args, device)

    model, proc = build_model(args.seed, [int(x) for x in args.mrope_section.split(",")] if args.mrope_section else None,
                              args.heads, args.kv_heads)
    batcher = LongBatcher(model, proc, args.attn_sup_targets)
    check_batched_vision(model, batcher)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, vocab {len(proc.tokenizer)}, steps {args.steps}, device {device}", flush=True)
    model.train()
    heads = AuxHeads(model, args.decoder_aux, args.decoder_aux_layer, args.aux_prev).to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    val_seeds = list(range(TRAIN_SEED_LIMIT + 500_000, TRAIN_SEED_LIMIT + 500_000 + args.eval_n))
    probe = AttentionSupervision(model, args.attn_sup_layer, [int(h) for h in args.attn_sup_heads.split(",")]) \
        if args.attn_sup else None
    loads: list[float] = []
    lrs: list[float] = []
    losses, t0, c0, ema, aux_ema, att_ema, steps_done = [], time.time(), time.process_time(), None, None, None, 0
    vision_acc = pretrain_vision(model, batcher, heads, args.vision_steps, args.seed, device,
                                 log=lambda m: print(m, flush=True)) if args.vision_steps else {}
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, step])
        at = step      # where the schedules are: the step, or the elapsed time's share of the limit
        if args.time_schedule and args.time_limit:
            at = max(step, int(args.steps * (time.time() - t0) / (60 * args.time_limit)))
            if at >= args.steps:
                print(f"time limit reached after {step} steps", flush=True)
                break
        frames = frames_for_step(at, args.steps, args.max_frames, rng, args.min_frames)
        if args.dense_share and frames < MIN_FRAMES and rng.random() < args.dense_share:
            frames = int(rng.integers(MIN_FRAMES // 8, max(MIN_FRAMES, frames * 2) // 8 + 1)) * 8  # task v2's density
        bsz = max(1, args.tokens_per_batch // (frames // 2 * TOKENS_PER_SLOT + TEXT_PER_QUESTION * (3 + args.extra_questions)))
        exs = [example(int(s), frames, args.codec) for s in rng.integers(0, TRAIN_SEED_LIMIT, bsz)]
        inputs = to_device(batcher(exs, [training_questions(ex, rng, args.extra_questions) for ex in exs]), device)
        aux = inputs.pop("aux")
        spans = inputs.pop("spans")
        pos = shift_time(model, inputs, batcher.pad_id, args.time_offset, rng, args.rope_layout) if args.time_offset \
            else rope_positions(model, inputs, args.rope_layout)
        inputs["position_ids"] = (answer_positions(pos, spans) if args.generation_positions else pos).to(device)
        probe_rows, probe_targets = inputs.pop("probe")
        if probe:
            probe.set(probe_rows.to(device), probe_targets.to(device))
        for g in opt.param_groups:
            g["lr"] = lr_at(at, args.steps, args.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**inputs)
            aux_loss = heads.loss(aux, inputs["input_ids"] == batcher.pad_id)
        loss = out.loss + AUX_WEIGHT * aux_loss
        if probe:
            att_loss = probe.loss
            probe.rows = None                                  # evaluation and other calls: plain SDPA
            loss = loss + args.attn_sup * att_loss
            att_ema = att_loss.item() if att_ema is None else 0.98 * att_ema + 0.02 * att_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = out.loss.item() if ema is None else 0.98 * ema + 0.02 * out.loss.item()
        aux_ema = aux_loss.item() if aux_ema is None else 0.98 * aux_ema + 0.02 * aux_loss.item()
        losses.append(out.loss.item())
        lrs.append(g["lr"])
        steps_done = step + 1
        if step % 25 == 0:
            loads.append(os.getloadavg()[0])
            print(f"step {step:5d} frames {frames:4d} bsz {bsz:2d} loss {ema:.4f} aux {aux_ema:.3f} "
                  + (f"att {att_ema:.3f} " if probe else "") +
                  f"lr {g['lr']:.2e} {time.time() - t0:6.0f}s cpu {time.process_time() - c0:6.0f}s", flush=True)
        if args.eval_n and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            res = evaluate(model, batcher, val_seeds, args.eval_frames, device, codec=args.codec, layout=args.rope_layout)
            print(f"  eval@{step + 1} ({args.eval_frames} frames): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
        if args.time_limit and time.time() - t0 > 60 * args.time_limit:
            print(f"time limit reached after {step + 1} steps", flush=True)
            break
    train_s, train_cpu = time.time() - t0, time.process_time() - c0
    final = {}
    if args.eval_n:
        for f in [int(x) for x in args.final_frames.split(",") if x]:
            final[str(f)] = evaluate(model, batcher, val_seeds, f, device, batch=1, codec=args.codec, layout=args.rope_layout)
            print(f"  final ({f} frames): " + ", ".join(f"{k} {v:.3f}" for k, v in final[str(f)].items()), flush=True)
    print(f"trained in {train_s / 60:.1f} min", flush=True)

    if probe:
        model.set_attn_implementation({"text_config": "sdpa"})
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
                      "cpu_minutes": round(train_cpu / 60, 1), "load_average": round(float(np.mean(loads)), 1),
                      "tokens_per_batch": args.tokens_per_batch, "rope_layout": args.rope_layout,
                      "command": "python tools/train_long.py " + " ".join(sys.argv[1:] if argv is None else argv)},
            "vision_stage": {"steps": args.vision_steps, "token_accuracy": vision_acc},
            "validation": final, "validation_note": "teacher-forced exact match on held-out seeds 1,500,000+"}
    with open(os.path.join(args.out, "mmkv.json"), "w") as f:
        json.dump(card, f, indent=1)
    print(f"saved to {args.out}")
    return {"losses": losses, "lrs": lrs, "validation": final, "out": args.out}


if __name__ == "__main__":
    main()
