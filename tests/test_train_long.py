"""The training script of the long-video model (tools/train_long.py): a short run learns and writes a
checkpoint mmkv loads; the token ids it trains on are the processor's; its training-only data (short
videos, extra questions) answers what the pixels show; its speed tricks leave the model's outputs
unchanged."""
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

import mmkv
from mmkv.synthetic.long import make_long_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_synthetic_long import answer_from_pixels, read_objects  # noqa: E402


@pytest.fixture(scope="module")
def train():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    spec = importlib.util.spec_from_file_location("train_long", os.path.join(ROOT, "tools", "train_long.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_long"] = mod            # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built(train):
    model, proc = train.build_model(0)
    return model, proc, train.LongBatcher(model, proc)


def test_short_training_run_learns_and_saves(train, tmp_path):
    out = str(tmp_path / "m")
    res = train.main(["--steps", "16", "--max-frames", "24", "--min-frames", "16", "--tokens-per-batch", "1024",
                      "--threads", "2", "--eval-n", "0", "--extra-questions", "2", "--out", out])
    losses = res["losses"]
    assert len(losses) == 16 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    card = json.load(open(os.path.join(out, "mmkv.json")))
    assert card["trained"] is True and card["train"]["steps"] == 16 and card["train"]["cpu_minutes"] > 0
    pipe = mmkv.load(out)  # the real loading path: config -> adapter -> from_pretrained
    assert pipe.note == ""
    ex = make_long_example(3, 96)
    r = pipe.generate(ex.frames, ex.questions[0].text, max_new_tokens=3)
    assert r.stats.visual_tokens_in == 48 * 16 and r.stats.prompt_tokens > 768


def test_conversation_ids_are_the_processors(train, built):
    """The ids a training conversation is built from (mmkv's adapter: prefix, question, follow-up
    turns) are the processor's tokenization of the same chat, video expanded; the patches too."""
    model, proc, batcher = built
    ex = make_long_example(7, 96)
    msgs = []
    for i, q in enumerate(ex.questions):
        content = ([{"type": "video"}] if i == 0 else []) + [{"type": "text", "text": q.text}]
        msgs += [{"role": "user", "content": content},
                 {"role": "assistant", "content": [{"type": "text", "text": q.answer}]}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    ref = proc(text=[text], videos=[ex.frames], return_tensors="pt", do_sample_frames=False,
               cap_pixels_per_frame=False)
    ids, labels, spans = batcher.conversation(train.official(ex), 48 * 16)
    want = ref["input_ids"][0].tolist()
    assert want[-1] == proc.tokenizer("\n")["input_ids"][0]   # the template's newline after the last turn
    assert ids == want[:-1]
    assert [proc.tokenizer.decode(ids[a:b]) for a, b in spans] == [q.answer + "<|im_end|>" for q in ex.questions]
    assert all(lab == -100 for i, lab in enumerate(labels) if not any(a <= i < b for a, b in spans))
    pix, grid = batcher.patchify(ex.frames)
    assert grid == ref["video_grid_thw"][0].tolist()
    torch.testing.assert_close(pix, ref["pixel_values_videos"], atol=1e-5, rtol=1e-5)


def test_speed_tricks_leave_the_vision_output_unchanged(train):
    model, proc = train.build_model(1)
    train.check_batched_vision(model, train.LongBatcher(model, proc))   # raises if they differ


def test_training_questions_are_what_the_pixels_show(train):
    """Short training videos and the extra questions of full ones: every answer is read back from
    the rendered frames; the mp4 round trip the training frames take keeps them close."""
    for seed in range(12):
        frames = [16, 40, 64, 96, 160][seed % 5]
        ex = train.example(seed, frames, codec=False)
        qs = train.training_questions(ex, np.random.default_rng(seed), 5)
        assert ex.frames.shape == (frames, 112, 112, 3) and qs
        if frames >= 96:
            assert {(q.text, q.answer) for q in ex.questions} <= {(q.text, q.answer) for q in qs}
        events = read_objects(ex.frames)
        for q in qs:
            assert answer_from_pixels(q.text, events) == q.answer, (seed, frames, q)
        if seed < 3:
            coded = train.example(seed, frames, codec=True).frames
            err = np.abs(coded.astype(int) - ex.frames.astype(int))
            assert coded.shape == ex.frames.shape and 0 < err.mean() < 8


def test_vision_stage_trains_the_tower_alone_then_freezes_it(train, tmp_path):
    """Stage 1 (`--vision-steps`) changes the vision tower and not the decoder, and its token
    accuracies are reported; with `--freeze-vision` the decoder stage leaves the tower as stage 1
    left it (no gradient reaches it) while the decoder changes."""
    model, proc = train.build_model(2)
    batcher = train.LongBatcher(model, proc)
    heads = train.AuxHeads(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = train.pretrain_vision(model, batcher, heads, steps=3, seed=0, device=torch.device("cpu"), videos=2,
                                frames=16, log=lambda m: None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.visual.") for k in changed), sorted(changed)[:5]
    assert set(acc) == {"color", "shape", "none"} and all(0 <= a <= 1 for a in acc.values())

    out = str(tmp_path / "m")
    train.main(["--steps", "3", "--vision-steps", "2", "--freeze-vision", "--max-frames", "16", "--min-frames", "16",
                "--tokens-per-batch", "512", "--eval-n", "0", "--out", out, "--seed", "5"])
    card = json.load(open(os.path.join(out, "mmkv.json")))
    assert card["vision_stage"]["steps"] == 2
    # the same seed's run without the decoder stage: its vision tower is the frozen one
    ref = str(tmp_path / "r")
    train.main(["--steps", "0", "--vision-steps", "2", "--freeze-vision", "--max-frames", "16", "--min-frames", "16",
                "--eval-n", "0", "--out", ref, "--seed", "5"])
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(ref, "model.safetensors"))
    vis = [k for k in a if "visual" in k]
    dec = [k for k in a if k.startswith("model.layers.")]          # the decoder (saved in HF's layout)
    assert vis and all(torch.equal(a[k], b[k]) for k in vis)
    assert any(not torch.equal(a[k], b[k]) for k in dec)


def test_time_schedule_ends_the_run_when_the_time_is_spent(train, tmp_path, monkeypatch):
    """`--time-schedule`: the schedules follow the elapsed share of `--time-limit`, so a run whose
    time is spent stops before its step count with the learning rate annealed; the plain
    `--time-limit` stops at the same time with the rate still high. The clock is a fake one
    (1 s per reading), so the test does not depend on the machine's speed."""
    import time as real

    def run(extra, out):
        clock = iter(range(10**6))
        monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: float(next(clock)),
                                                                 process_time=real.process_time))
        res = train.main(["--steps", "39", "--time-limit", "0.25", "--max-frames", "16", "--min-frames", "16",
                          "--tokens-per-batch", "256", "--eval-n", "0", "--out", str(tmp_path / out), *extra])
        return res, json.load(open(tmp_path / out / "mmkv.json"))

    sched, card = run(["--time-schedule"], "s")
    plain, _ = run([], "p")
    assert 1 <= card["train"]["steps"] < 39 and len(sched["losses"]) == card["train"]["steps"]
    assert sched["lrs"][-1] < 0.2 * 2e-3 < 0.5 * 2e-3 < plain["lrs"][-1]      # cosine's end is 5% of the peak


def test_time_offsets_move_only_the_videos_temporal_positions(train, built):
    """`--time-offset`: positions as if the training video were a stretch of a video of up to
    `span` frame pairs. In the transformers layout the video's temporal positions move by one
    offset per video (height / width and the text stay); in the released layout (mmkv's) the text
    after the video moves by one gap per video on all three axes, the video and the text before it
    stay. Distances inside the video never change."""
    from mmkv.models.qwen2_vl import rope_index

    model, proc, batcher = built
    exs = [train.example(s, f, codec=False) for s, f in ((3, 16), (4, 40))]
    inputs = batcher(exs, [train.training_questions(e, np.random.default_rng(0), 0) for e in exs])
    span = 100
    for layout in ("transformers", "released"):
        ref = rope_index(model, inputs["input_ids"], inputs["mm_token_type_ids"], layout=layout,
                         attention_mask=inputs["attention_mask"], video_grid_thw=inputs["video_grid_thw"])
        got = train.shift_time(model, inputs, batcher.pad_id, span, np.random.default_rng(1), layout)
        for b, ex in enumerate(exs):
            vis = inputs["input_ids"][b] == batcher.pad_id
            last = int(vis.nonzero()[-1, 0])
            real = inputs["attention_mask"][b].bool()
            if layout == "transformers":
                d = got[0, b, vis] - ref[0, b, vis]
                assert bool((d == d[0]).all()) and 0 <= int(d[0]) <= span - ex.num_frames // 2
                assert torch.equal(got[1:, b], ref[1:, b]) and torch.equal(got[0, b, ~vis], ref[0, b, ~vis])
            else:
                after = torch.arange(len(vis)) > last
                d = got[:, b, after & real] - ref[:, b, after & real]
                assert bool((d == d[0, 0]).all()) and 0 <= int(d[0, 0]) <= span - ex.num_frames // 2
                assert torch.equal(got[:, b, ~after], ref[:, b, ~after])
                assert torch.equal(got[:, b, ~real], ref[:, b, ~real])           # padding untouched
        assert not torch.equal(got, ref)
    # offsets change where the video sits, nothing else: with none the loss is the model's own
    inputs = {k: v for k, v in inputs.items() if k not in ("aux", "spans", "probe")}
    with torch.no_grad():
        same = train.shift_time(model, inputs, batcher.pad_id, 0, np.random.default_rng(1), "transformers")
        torch.testing.assert_close(model(**inputs, position_ids=same).loss, model(**inputs).loss)


def test_evaluate_a_saved_checkpoint_dense_and_sparse(train, tmp_path):
    """`--evaluate CKPT`: accuracies per kind of a saved model, on task v2 and on sparse videos
    (at most 5 objects, questions from what they show) of any length; trains nothing."""
    out = str(tmp_path / "m")
    train.main(["--steps", "1", "--max-frames", "16", "--min-frames", "16", "--tokens-per-batch", "256",
                "--eval-n", "0", "--out", out])
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    for extra in ([], ["--sparse"]):
        res = train.main(["--evaluate", out, "--final-frames", "96", "--eval-n", "2", *extra])["validation"]["96"]
        assert 0 <= res["accuracy"] <= 1 and {"turn1", "turn2"} <= set(res)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    ex = train.sparse_example(5, 128, codec=False)
    assert ex.frames.shape[0] == 128 and 1 <= len(ex.items) <= 5 and ex.questions
    events = read_objects(ex.frames)
    assert all(answer_from_pixels(q.text, events) == q.answer for q in ex.questions)


def test_step_attention_targets_are_what_each_answer_token_needs(train, built):
    """`--attn-sup-targets step`: each supervised row predicts an answer token and is pointed at the
    visual tokens that token is read from: an order answer's k-th colour (and the comma before it)
    at the k-th object of the asked shape, whose colour is that word; a count's number at the last
    object of the shape, whose rank among its shape is the number; an identify answer's words at
    the one object of the asked colour. End-of-turn rows are left out."""
    model, proc, _ = built
    batcher = train.LongBatcher(model, proc, "step")
    tok = proc.tokenizer
    colors = list(train.COLORS)
    exs = [train.example(s, f, codec=False) for s, f in ((3, 96), (11, 128))]
    qs = [train.training_questions(e, np.random.default_rng(0), 2) for e in exs]
    inputs = batcher(exs, qs)
    rows, targets = inputs["probe"]
    labels, aux = inputs["labels"], inputs["aux"]
    start = 0
    seen = {"order": 0, "count": 0, "identify": 0}
    for b, (ex, spans) in enumerate(zip(exs, inputs["spans"])):
        n_vis = int((inputs["input_ids"][b] == batcher.pad_id).sum())
        head = len(batcher.head)
        col, rank = aux["color"][start:start + n_vis], aux["rank"][start:start + n_vis]
        start += n_vis
        by_row = {int(r): targets[b, j] for j, r in enumerate(rows[b]) if r >= 0}
        for (a, e), q in zip(spans, qs[b]):
            for r in range(a - 1, e - 1):
                word = tok.decode([int(labels[b, r + 1])]).strip()
                if r == e - 2 or (q.kind == "count" and r > a - 1):
                    assert r not in by_row, (q, word)             # end of turn, the shape word: none
                    continue
                keys = by_row[r].nonzero().flatten() - head
                assert len(keys) and bool((keys >= 0).all()) and bool((keys < n_vis).all())
                if q.kind == "order" and word != ",":
                    assert {colors[int(c) - 1] for c in col[keys]} == {word}
                elif q.kind == "count":
                    assert {int(x) for x in rank[keys]} == {int(q.answer.split()[0])}
                elif q.kind == "identify":
                    assert {colors[int(c) - 1] for c in col[keys]} == {q.target}
                seen[q.kind] += 1
    assert all(seen.values()), seen
    # evaluation puts the questions alone (no target): nothing to supervise, no error
    bare = [[train.Asked(q.kind, "", q.text, q.answer) for q in ex.questions] for ex in exs]
    assert bool((batcher(exs, bare)["probe"][0] < 0).all())


def test_token_labels_rank_and_previous_colour_follow_the_objects(train, built):
    """The decoder's auxiliary labels on a task-v2 video: on every token of every object, its rank
    among the objects of its shape so far and (`--aux-prev`) the colour of the previous object of
    that shape, recomputed here from the drawn objects; 0 on every other token."""
    model, proc, batcher = built
    colors = list(train.COLORS)
    ex = train.example(21, 128, codec=False)
    _, grid = batcher.patchify(ex.frames)
    col, shp, start, rank, prev = batcher.token_labels(ex, grid)
    gh, gw = grid[1] // 2, grid[2] // 2
    on = torch.zeros_like(col, dtype=torch.bool)
    before: dict[str, list[str]] = {}
    for it in sorted(ex.items, key=lambda it: it.start):
        mates = before.setdefault(it.shape, [])
        idx = [(t * gh + it.cell[0]) * gw + it.cell[1] for t in range(it.start // 2, (it.start + it.length - 1) // 2 + 1)]
        on[idx] = True
        assert {int(r) for r in rank[idx]} == {min(len(mates), 3) + 1}
        assert {int(p) for p in prev[idx]} == {colors.index(mates[-1]) + 1 if mates else 0}
        assert int(start[idx[0]]) == 1 and all(int(start[i]) == 2 for i in idx[1:])
        mates.append(it.color)
    assert max(len(v) for v in before.values()) >= 2          # the video has a chain to check
    assert not bool(rank[~on].any() or prev[~on].any() or start[~on].any())


def test_supervised_run_with_every_auxiliary_evaluates_midway(train, tmp_path):
    """Step attention targets, the previous-colour head and a mid-run evaluation in one short run
    (the evaluation's questions carry no target: a run once stopped there)."""
    res = train.main(["--steps", "4", "--max-frames", "16", "--min-frames", "16", "--tokens-per-batch", "512",
                      "--decoder-aux", "0.5", "--aux-prev", "--attn-sup", "1", "--attn-sup-targets", "step",
                      "--eval-every", "2", "--eval-n", "1", "--eval-frames", "96", "--final-frames", "",
                      "--out", str(tmp_path / "m")])
    assert len(res["losses"]) == 4 and all(np.isfinite(res["losses"]))


def test_training_positions_are_the_ones_mmkv_generates_with(train, built, tmp_path):
    """A training conversation's M-RoPE positions (`answer_positions`) are exactly the positions
    mmkv feeds the language model when it encodes the video and answers the same questions in one
    conversation (`pipe.chat`): the first answer after the largest prompt position, the rest one
    by one. In the released layout (mmkv's Qwen adapter) get_rope_index over the whole conversation
    gives them already; in transformers 5's it does not."""
    from mmkv.io import load_media

    model, proc, batcher = built
    d = str(tmp_path / "m")
    model.save_pretrained(d)
    proc.save_pretrained(d)
    pipe = mmkv.load(d)
    ex = train.example(5, 96, codec=False)
    qs = train.official(ex)
    fed = []
    hook = pipe.adapter.text_model.register_forward_pre_hook(
        lambda m, args, kw: fed.append(kw["position_ids"][:, 0].clone()), with_kwargs=True)
    conv = pipe.chat(pipe.encode(load_media(ex.frames, video_fps=2.0)))
    for q in qs:   # as many new tokens as the answer has words: the end-of-turn token opens the next turn
        n = len(batcher.tok(q.answer, add_special_tokens=False)["input_ids"])
        assert len(conv.ask(q.text, max_new_tokens=n).tokens) == n
    hook.remove()
    fed = torch.cat(fed, dim=1)                                            # [3, tokens fed]
    inputs = batcher([ex], [qs])
    pos = train.rope_positions(model, inputs)
    plain = pos.clone()
    got = train.answer_positions(pos, inputs["spans"])[:, 0, :fed.shape[1]]
    assert fed.shape[1] == inputs["input_ids"].shape[1] - 2    # all but the last answer word and its end
    assert torch.equal(got, fed)
    # in the released layout the whole conversation's own positions are already these ...
    assert torch.equal(plain[:, 0, :fed.shape[1]], fed)
    # ... in transformers 5's they are not (the answers sit where get_rope_index puts them)
    t5 = train.rope_positions(model, inputs, "transformers")
    assert not torch.equal(t5[:, 0, :fed.shape[1]], fed)


def test_mrope_section_is_a_config_choice_that_survives_saving(train, tmp_path):
    """`--mrope-section 10,3,3`: the decoder's rotary frequencies split over time / height / width
    differently (highest first); it is the checkpoint's config (saved, loaded back, used), and a
    split that does not fill the rotary half-dimension is refused."""
    from transformers import AutoModelForImageTextToText

    model, proc = train.build_model(0, [10, 3, 3])
    d = str(tmp_path / "m")
    model.save_pretrained(d)
    back = AutoModelForImageTextToText.from_pretrained(d)
    assert back.config.text_config.rope_parameters["mrope_section"] == [10, 3, 3]
    ids = torch.tensor([[5, 6, 7, 8]])
    pos = torch.tensor([[[0, 1, 2, 3]], [[0, 0, 9, 9]], [[0, 0, 0, 0]]])     # text on t, a video-like h
    default = train.build_model(0)[0]
    with torch.no_grad():
        a = back.model.language_model(input_ids=ids, position_ids=pos).last_hidden_state
        b = default.model.language_model(input_ids=ids, position_ids=pos).last_hidden_state
    assert not torch.allclose(a, b)            # same weights (same seed), other rotary split
    with pytest.raises(ValueError, match="mrope_section"):
        train.build_model(0, [4, 4, 4])


def test_heads_set_the_head_size_and_its_rotary_frequencies(train, tmp_path):
    """`--heads 2 --kv-heads 2`: 64-dim heads (hidden 128 / 2), so 32 rotary frequencies split by
    Qwen's rule (8 / 12 / 12); saved and loaded back as that shape, and a count that does not
    divide is refused before any training."""
    from transformers import AutoModelForImageTextToText

    model, proc = train.build_model(0, heads=2, kv_heads=2)
    d = str(tmp_path / "m")
    model.save_pretrained(d)
    back = AutoModelForImageTextToText.from_pretrained(d)
    cfg = back.config.text_config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2)
    assert cfg.rope_parameters["mrope_section"] == [8, 12, 12]
    assert back.model.language_model.layers[0].self_attn.k_proj.out_features == 2 * 64
    assert train.build_model(0, [20, 6, 6], heads=2, kv_heads=1)[0].config.text_config.num_key_value_heads == 1
    with pytest.raises(ValueError, match="heads"):
        train.build_model(0, heads=3)
    with pytest.raises(ValueError, match="mrope_section"):
        train.build_model(0, [10, 3, 3], heads=2)
