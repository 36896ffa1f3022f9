"""Vision presses (issue 4): PVC, EVS, pooling, random keep, GlobalCom², streaming and positions.

Unit tests run the presses on hand-built VisualTokens (exact expectations); the model tests run
them through the pipeline on tiny checkpoints and check positions against the plain HF model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmkv
from conftest import frames_for, hf_inputs
from mmkv import RecipeError
from mmkv.errors import InputError
from mmkv.models.base import build_tokens, grid_coords
from mmkv.models.vit_scores import last_encoder_layer
from mmkv.recipe import Recipe
from mmkv.vision import EVS, PVC, GlobalCom2, Pool, RandomKeep, VisionContext
from mmkv.vision.globalcom2 import crop_ratios, region_sums

QUESTION = "What is happening in this video?"


def video_tokens(x: torch.Tensor) -> "mmkv.vision.VisualTokens":
    """VisualTokens of a [T, H, W, D] embedding grid."""
    T, H, W, D = x.shape
    return build_tokens(x.reshape(-1, D).clone(), grid_coords(0, T, H, W), 0, (T, H, W), np.arange(T, dtype=float),
                        "video")


def run_stream(press, vt, chunk_slots):
    """Run a streaming press slot-chunk by slot-chunk, as the pipeline does, and join the chunks."""
    T, H, W = vt.grid
    ctx = VisionContext()
    st = press.start(ctx)
    parts = []
    for s in range(0, T, chunk_slots):
        rows = torch.arange(s * H * W, min(T, s + chunk_slots) * H * W)
        chunk = vt.subset(rows)
        parts.append(press.step(chunk, st, ctx))
    from mmkv.vision.base import VisualTokens
    return press.finish(VisualTokens.cat(parts), st, ctx)


def kept_set(vt):
    return {tuple(c) for c in vt.coords[vt.is_patch].tolist()}


# ----------------------------------------------------------------------------- recipes and errors
@pytest.mark.parametrize("spec,needle", [
    ("pvc:0", "budget"), ("pvc:budget=-3", "budget"), ("pvc:threshold=2", "threshold"),
    ("pvc:threshold=-0.1", "threshold"), ("pvc:4,min_keep=5", "min_keep"), ("pvc:first=0", "first"),
    ("evs:0", "keep"), ("evs:1.5", "keep"), ("random:0", "keep"), ("random:-1", "keep"), ("pool:1", "size"),
    ("globalcom2:0", "retention"), ("globalcom2:1.2", "retention"), ("globalcom2:temperature=0", "temperature"),
    ("pvc:many", "not a valid int"),
])
def test_bad_budgets_are_clear(spec, needle):
    with pytest.raises(RecipeError, match=needle):
        Recipe.parse(spec)


def test_recipes_parse():
    r = Recipe.parse("pvc:16+pool2x2")
    assert [type(s) for s in r.stages] == [PVC, Pool] and r.stages[0].budget == 16 and r.stages[0].first_budget == 64
    assert Recipe.parse("globalcom:0.1").stages == [GlobalCom2(retention=0.1)]
    assert Recipe.parse("evs:0.3").stages == [EVS(keep=0.3)] and Recipe.parse("random:0.5").stages[0].keep == 0.5
    assert Recipe.parse(Recipe.parse("pvc:8,threshold=0.2,first=none").spec()).stages[0].threshold == 0.2


# ----------------------------------------------------------------------------- PVC on hand-built tokens
def test_pvc_static_video_keeps_one_frame():
    """Identical frames: the first frame is kept, every later token merges into it."""
    torch.manual_seed(0)
    frame = torch.randn(1, 4, 5, 16)
    vt = video_tokens(frame.repeat(9, 1, 1, 1))
    out = run_stream(PVC(budget=64), vt, chunk_slots=2)
    assert out.num == 20 and set(out.coords[:, 0].tolist()) == {0}
    assert torch.equal(out.weight, torch.full((20,), 9.0))           # each stands for its 9 copies
    torch.testing.assert_close(out.embeds, frame.reshape(20, 16))    # the average of identical tokens


def test_pvc_keeps_the_changed_tokens_of_one_changed_frame():
    torch.manual_seed(1)
    x = torch.randn(1, 4, 4, 16).repeat(8, 1, 1, 1)
    x[5, 1, 2] = torch.randn(16)                                     # one frame changes at two positions
    x[5, 3, 0] = torch.randn(16)
    out = run_stream(PVC(), video_tokens(x), chunk_slots=3)
    later = kept_set(out) - {(0, h, w) for h in range(4) for w in range(4)}
    # the change is new in frame 5; in frame 6 the position returns to what frame 5 replaced
    assert later == {(5, 1, 2), (5, 3, 0), (6, 1, 2), (6, 3, 0)}


def test_pvc_budgets_are_respected():
    torch.manual_seed(2)
    vt = video_tokens(torch.randn(7, 6, 5, 8))                       # everything is new in every frame
    p = PVC(budget=5, first=12)
    out = run_stream(p, vt, chunk_slots=2)
    counts = out.per_slot_counts().tolist()
    assert counts == [12] + [5] * 6
    out = run_stream(PVC(budget=5), vt, chunk_slots=7)              # first defaults to 4 * budget
    assert out.per_slot_counts().tolist() == [20] + [5] * 6


def test_pvc_ratio_caps_the_whole_video():
    """`ratio` is a cap over the video: what a slot leaves unused carries over (rounding up per
    slot kept 33% of a 3-token grid at ratio=0.125), and the stats say the fraction kept."""
    torch.manual_seed(3)
    vt = video_tokens(torch.randn(6, 6, 5, 8))                       # 30 tokens per slot, all new
    out = run_stream(PVC(ratio=0.25), vt, chunk_slots=4)
    assert out.per_slot_counts().tolist() == [8, 7, 8, 7, 8, 7]      # ceil(0.25 * 30 t) - ceil(0.25 * 30 (t-1))
    out = run_stream(PVC(ratio=0.2, first=30), vt, chunk_slots=6)    # `first` still sets the first slot
    assert out.per_slot_counts().tolist() == [30] + [6] * 5
    small = video_tokens(torch.randn(16, 1, 3, 8))                   # 3 tokens per slot, all new
    for ratio in (0.125, 0.2, 0.5):
        for cs in (1, 5, 16):
            ctx = VisionContext()
            p = PVC(ratio=ratio, threshold=0.0)
            st = p.start(ctx)
            parts = [p.step(small.subset(torch.arange(3 * s, 3 * min(16, s + cs))), st, ctx) for s in range(0, 16, cs)]
            from mmkv.vision.base import VisualTokens
            counts = p.finish(VisualTokens.cat(parts), st, ctx).per_slot_counts()
            seen = 3 * torch.arange(1, 17)
            assert torch.equal(counts.cumsum(0), torch.ceil(ratio * seen - 1e-9).long())  # never above the cap
            assert ctx.stats["pvc_kept_fraction"] == pytest.approx(int(counts.sum()) / 48)
            assert ctx.stats["pvc_kept_fraction"] <= ratio + 1 / 48
    # what still slots leave unused is spent where the video changes (4-token grid at 0.125: a
    # per-slot share would leave slot 9 with no token, ceil per slot would keep 25% of every slot)
    x = torch.randn(1, 2, 2, 8).repeat(12, 1, 1, 1)
    x[9:] = torch.randn(1, 2, 2, 8)                                  # every token changes in slot 9, then stays
    counts = run_stream(PVC(ratio=0.125), video_tokens(x), 4).per_slot_counts().tolist()
    assert counts == [1] + [0] * 8 + [4, 0, 0]                       # ceil(0.125 * 40) - 1 = 4 left for slot 9
    x[10] = torch.randn(1, 2, 2, 8)                                  # another change right after: allowance spent
    counts = run_stream(PVC(ratio=0.125), video_tokens(x), 4).per_slot_counts().tolist()
    assert counts[:11] == [1] + [0] * 8 + [4, 1] and sum(counts) <= math.ceil(0.125 * 48)
    with pytest.raises(RecipeError, match="ratio"):
        Recipe.parse("pvc:ratio=1.5")


SETTINGS = [PVC(), PVC(budget=3), PVC(budget=2, first=5), PVC(ratio=0.125), PVC(ratio=0.25), PVC(ratio=0.5),
            PVC(ratio=0.125, threshold=0.0), PVC(ratio=0.25, merge=False), PVC(ratio=0.2, first=3),
            PVC(budget=4, threshold=0.3)]


@pytest.mark.parametrize("press", SETTINGS, ids=lambda p: p.spec())
def test_pvc_identical_frames_cost_nothing_under_every_setting(press):
    """A static video keeps tokens in its first slot only; so does a video that stops changing;
    merging conserves the weighted sum of the embeddings."""
    torch.manual_seed(30)
    static = video_tokens(torch.randn(1, 5, 7, 16).expand(8, -1, -1, -1))
    for cs in (1, 3, 8):
        counts = run_stream(press, static, cs).per_slot_counts().tolist()
        assert counts[0] > 0 and counts[1:] == [0] * 7, counts
    x = torch.randn(8, 5, 7, 16)
    x[3:] = x[2]                                                     # three different frames, then still
    vt = video_tokens(x)
    out = run_stream(press, vt, 3)
    assert out.per_slot_counts()[3:].tolist() == [0] * 5
    if press.merge:
        assert out.weight.sum() == vt.num
        torch.testing.assert_close((out.embeds * out.weight[:, None]).sum(0), vt.embeds.sum(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("press", SETTINGS, ids=lambda p: p.spec())
def test_pvc_one_changed_region_costs_only_that_region(press):
    torch.manual_seed(31)
    x = torch.randn(1, 5, 7, 16).repeat(8, 1, 1, 1)
    region = [(1, 2), (1, 3), (2, 2), (2, 3)]
    for h, w in region:
        x[3:, h, w] = torch.randn(16)                                # changes in slot 3, then stays
    out = run_stream(press, video_tokens(x), 3)
    counts = out.per_slot_counts().tolist()
    assert counts[1:3] == [0, 0] and counts[4:] == [0] * 4, counts
    later = {(h, w) for t, h, w in kept_set(out) if t > 0}
    assert 0 < len(later) and later <= set(region)
    if press.ratio is None:                                          # as much of it as the budget allows
        assert len(later) == min(press.budget, len(region))


@pytest.mark.parametrize("press", SETTINGS, ids=lambda p: p.spec())
def test_pvc_content_that_returns_is_kept_again(press):
    """A -> B -> A at the same positions: the return is new against what the model last saw there
    (B), so it is kept again, as much as B was; repeats of either cost nothing."""
    torch.manual_seed(32)
    a, b = torch.randn(2, 1, 5, 7, 16)
    x = torch.cat([a, a, b, b, a, a])                                # slots: A A B B A A
    counts = run_stream(press, video_tokens(x), 2).per_slot_counts().tolist()
    assert counts[1] == counts[3] == counts[5] == 0, counts
    assert counts[0] > 0 and counts[2] > 0 and counts[4] > 0, counts
    if press.first is None and press.ratio is None:
        assert counts[2] == counts[4] == min(35, press.budget)


def test_pvc_threshold_and_min_keep():
    torch.manual_seed(3)
    base = torch.randn(1, 3, 3, 32)
    x = base + 0.01 * torch.randn(6, 3, 3, 32)                       # tiny noise: nothing is new after frame 0
    assert run_stream(PVC(), video_tokens(x), 6).per_slot_counts().tolist() == [9, 0, 0, 0, 0, 0]
    assert run_stream(PVC(threshold=0.0), video_tokens(x), 6).per_slot_counts().tolist() == [9] * 6
    assert run_stream(PVC(min_keep=2), video_tokens(x), 6).per_slot_counts().tolist() == [9, 2, 2, 2, 2, 2]


def test_pvc_detects_slow_drift_that_evs_misses():
    """A token drifting a little every frame is kept again once it has drifted past the threshold
    from the KEPT token; frame-to-frame dissimilarity (EVS's score) stays tiny throughout."""
    D = 8
    e0, e1 = torch.eye(D)[0], torch.eye(D)[1]
    x = torch.zeros(12, 1, 1, D)
    for t in range(12):
        a = t * 0.12                                                 # 0.12 rad per frame
        x[t, 0, 0] = np.cos(a) * e0 + np.sin(a) * e1
    out = run_stream(PVC(threshold=0.1), video_tokens(x), 4)
    kept_t = out.coords[:, 0].tolist()
    assert kept_t[0] == 0 and len(kept_t) > 2                         # re-kept as the angle accumulates
    for a, b in zip(kept_t, kept_t[1:]):                             # each once 1 - cos(angle) > 0.1
        assert 1 - np.cos((b - a) * 0.12) > 0.1 and 1 - np.cos((b - a - 1) * 0.12) <= 0.1
    from mmkv.vision.evs import evs_scores
    vt = video_tokens(x)
    score = evs_scores(vt, torch.arange(12))
    assert score[0] == 255 and float(score[1:].max()) < 0.01


def test_pvc_merging_math():
    """Dropped tokens are averaged into their nearest kept token, weights count the originals, and
    the weighted sum of all embeddings is conserved."""
    torch.manual_seed(4)
    x = torch.randn(10, 3, 4, 16)
    x[1:] = x[:1] + 0.4 * torch.randn(9, 3, 4, 16)                   # some tokens pass the threshold, most not
    vt = video_tokens(x)
    out = run_stream(PVC(budget=3), vt, chunk_slots=4)
    assert out.weight.sum() == vt.num
    torch.testing.assert_close((out.embeds * out.weight[:, None]).sum(0), vt.embeds.sum(0), atol=1e-4, rtol=1e-4)
    # exact check of one group: a kept frame-0 token that nothing else at its position replaced
    plain = run_stream(PVC(budget=3, merge=False), vt, chunk_slots=4)
    assert torch.equal(plain.index, out.index) and torch.equal(plain.weight, torch.ones(plain.num))
    torch.testing.assert_close(plain.embeds, vt.embeds[plain.index])
    assert not torch.allclose(out.embeds, plain.embeds)


def test_pvc_merge_target_is_the_nearest_kept_token():
    D = 4
    e = torch.eye(D)
    x = torch.zeros(2, 1, 2, D)
    x[0, 0, 0], x[0, 0, 1] = e[0], e[1]                              # frame 0: two different tokens
    x[1, 0, 0] = e[2]                                                # frame 1: position 0 becomes new (kept)
    x[1, 0, 1] = 0.9 * e[2] + 0.1 * e[1]                             # position 1: nearest is the NEW token, not e1
    out = run_stream(PVC(budget=1, threshold=0.05), video_tokens(x), 2)
    assert out.coords.tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert out.weight.tolist() == [1.0, 1.0, 2.0]
    torch.testing.assert_close(out.embeds[2], (e[2] + 0.9 * e[2] + 0.1 * e[1]) / 2)


def test_pvc_streaming_equals_whole_and_state_is_bounded():
    torch.manual_seed(5)
    x = torch.randn(1, 4, 4, 8).repeat(16, 1, 1, 1)
    x[:, :, 2:] += 0.8 * torch.randn(16, 4, 2, 8)                    # half the frame moves
    vt = video_tokens(x)
    whole = PVC(budget=6).compress(vt, VisionContext())
    for cs in (1, 3, 16):
        part = run_stream(PVC(budget=6), vt, cs)
        assert torch.equal(part.index, whole.index)
        torch.testing.assert_close(part.embeds, whole.embeds)
    p, ctx = PVC(budget=6), VisionContext()
    st = p.start(ctx)
    p.step(vt, st, ctx)
    assert st.ref.shape == (16, 8)                                   # one row per spatial position
    assert st.sums.data.shape[0] <= max(64, 2 * st.sums.n)           # running sums: kept tokens only


def test_pvc_leaves_images_alone_unless_asked():
    torch.manual_seed(6)
    img = build_tokens(torch.randn(36, 8), grid_coords(0, 1, 6, 6), 0, (1, 6, 6), [0.0], "image")
    assert PVC(budget=2).compress(img, VisionContext()) is img
    out = PVC(budget=2, images=True).compress(img, VisionContext())
    assert out.num == 8                                              # first = 4 * budget


# ----------------------------------------------------------------------------- baselines
def test_evs_is_vllms_rule():
    torch.manual_seed(7)
    T, H, W, D = 6, 3, 4, 8
    x = torch.randn(T, H, W, D)
    x[2:4] = x[1:2] + 0.05 * torch.randn(2, H, W, D)
    vt = video_tokens(x)
    for keep in (0.1, 0.3, 0.55, 1.0):
        out = EVS(keep=keep).compress(vt, VisionContext())
        n = max(H * W, int(T * H * W * keep))
        assert out.num == n
        # reference: the rule written on the dense grid
        dis = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
        dis = torch.cat([torch.full((1, H, W), 255.0), dis]).flatten()
        want = torch.argsort(dis, descending=True, stable=True)[:n].sort().values
        assert torch.equal(out.index, want)
        assert set(range(H * W)) <= set(out.index.tolist())         # frame 0 whole
    img = build_tokens(torch.randn(4, 8), grid_coords(0, 1, 2, 2), 0, (1, 2, 2), [0.0], "image")
    assert EVS(keep=0.25).compress(img, VisionContext()) is img


def vllm_retained(tokens_per_frame, num_frames, q):
    """vLLM's compute_retained_tokens_count (vllm/multimodal/evs.py), as written there."""
    total_tokens = tokens_per_frame * num_frames
    return max(tokens_per_frame, int(total_tokens * (1 - q)))


@pytest.mark.parametrize("keep,rate", [("0.1", "0.9"), ("0.2", "0.8"), ("0.25", "0.75"), ("0.07", "0.93"),
                                       ("0.3", "0.7"), ("0.125", "0.875"), ("0.05", "0.95"), ("0.9", "0.1")])
def test_evs_count_is_vllms_float_arithmetic(keep, rate):
    """keep=K is `--video-pruning-rate 1-K`; the count is vLLM's int(total * (1 - q)) in floats,
    one less than int(total * keep) where 1 - q rounds below keep (total 80, keep 0.1: 7)."""
    from mmkv.vision.evs import evs_retained
    for tpf in (1, 2, 4, 16):
        for frames in range(1, 101):
            assert evs_retained(tpf, tpf * frames, float(keep)) == vllm_retained(tpf, frames, float(rate))
    if keep in ("0.1", "0.2"):
        torch.manual_seed(9)
        vt = video_tokens(torch.randn(20, 2, 2, 8))                   # 80 tokens, 4 per frame
        assert EVS(keep=float(keep)).compress(vt, VisionContext()).num == {"0.1": 7, "0.2": 15}[keep]


def test_pool_averages_blocks_at_the_top_left_position():
    torch.manual_seed(8)
    x = torch.randn(2, 3, 5, 4)                                      # odd grid: border blocks are smaller
    vt = video_tokens(x)
    out = run_stream(Pool(), vt, 1)
    assert out.num == 2 * 2 * 3
    for (t, h, w), e, wt in zip(out.coords.tolist(), out.embeds, out.weight):
        assert h % 2 == 0 and w % 2 == 0
        block = x[t, h:h + 2, w:w + 2].reshape(-1, 4)
        assert wt == block.shape[0]
        torch.testing.assert_close(e, block.mean(0))
    pooled_twice = Pool().compress(out, VisionContext())             # weights carry through
    torch.testing.assert_close((pooled_twice.embeds * pooled_twice.weight[:, None]).sum(0), vt.embeds.sum(0),
                               atol=1e-5, rtol=1e-5)


def test_random_keep_counts_and_seed():
    vt = video_tokens(torch.randn(5, 4, 4, 8))
    a = run_stream(RandomKeep(keep=0.3), vt, 2)
    assert a.per_slot_counts().tolist() == [5] * 5                   # round(0.3 * 16)
    assert torch.equal(run_stream(RandomKeep(keep=0.3), vt, 5).index, a.index)
    assert not torch.equal(run_stream(RandomKeep(keep=0.3, seed=1), vt, 2).index, a.index)


# ----------------------------------------------------------------------------- GlobalCom² math
def test_globalcom2_retention_formula():
    S = torch.tensor([3.0, -1.0, 40.0, 7.5, 0.0, 12.0])
    R, T, N = 0.25, 10.0, 6
    sigma = torch.exp(S.double() / T) / torch.exp(S.double() / T).sum()
    want = torch.clamp(R * (1 + sigma - 1.0 / N), max=1.0)
    got = crop_ratios(S, R)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(crop_ratios(S, R, temperature=1e9).mean(), torch.tensor(R, dtype=torch.float64))
    torch.testing.assert_close(got.mean(), torch.tensor(R, dtype=torch.float64))   # no clipping at R = 0.25
    assert float(crop_ratios(S, 0.9).max()) == 1.0                   # clipped at 1
    assert crop_ratios(torch.tensor([5.0]), 0.3).tolist() == [pytest.approx(0.3)]  # one crop: r = R
    # thumbnail regions: side 5, 2 x 3 crops -> rows [0,1 | 2,3,4], cols [0 | 1 | 2,3,4]
    sg = torch.arange(25.0).view(5, 5)
    S = region_sums(sg, 2, 3)
    assert S.tolist() == [sg[:2, :1].sum(), sg[:2, 1:2].sum(), sg[:2, 2:].sum(),
                          sg[2:, :1].sum(), sg[2:, 1:2].sum(), sg[2:, 2:].sum()]


def test_globalcom2_errors(tiny_dir):
    vt = video_tokens(torch.randn(2, 2, 2, 4))
    with pytest.raises(InputError, match="video"):
        GlobalCom2().compress(vt, VisionContext())
    pipe = mmkv.load(tiny_dir["qwen2_vl"], recipe="globalcom2")
    from PIL import Image
    with pytest.raises(InputError, match="qwen2-vl"):
        pipe.generate(Image.new("RGB", (60, 40)), "What?", max_new_tokens=1)


def test_globalcom2_on_onevision_image(tiny_dir):
    """SigLIP substitute score: thumbnail keeps the top ⌊n R⌋ by the mean-query score, each crop
    ⌊n_i r_i⌋, in spatial order; separators stay."""
    from PIL import Image
    fam = "llava_onevision"
    rng = np.random.default_rng(9)
    image = Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))
    base = mmkv.load(tiny_dir[fam]).encode(image, prefill=False).visual
    R = 0.3
    pipe = mmkv.load(tiny_dir[fam], recipe=f"globalcom2:{R}")
    enc = pipe.encode(image, prefill=False)
    check_globalcom2(base, enc.visual, R, enc.stats.extra["globalcom2_crop_ratios"])


def check_globalcom2(full, out, R, ratios):
    side_h, side_w = full.meta["base_grid"]
    nph, npw = full.meta["crop_grid"]
    scores = full.meta["view_scores"]
    assert scores.shape == (1 + nph * npw, side_h * side_w)
    # separators all kept, tokens in sequence (= spatial) order
    assert int((~out.is_patch).sum()) == int((~full.is_patch).sum())
    assert bool((out.index[1:] > out.index[:-1]).all())
    c = out.coords[out.is_patch]
    base = c[c[:, 0] == 0]
    k0 = int(side_h * side_w * R)
    top = torch.topk(scores[0], k0).indices
    assert sorted((base[:, 1] * side_w + base[:, 2]).tolist()) == sorted(top.tolist())
    S = region_sums(scores[0].view(side_h, side_w), nph, npw)
    want = crop_ratios(S, R)
    assert ratios == [round(float(r), 4) for r in want]
    fc = full.coords[full.is_patch]
    fc = fc[fc[:, 0] == 1]
    crop = c[c[:, 0] == 1]
    cid = lambda cc: (cc[:, 1] // side_h) * npw + cc[:, 2] // side_w  # noqa: E731
    for i in range(nph * npw):
        n_i = int((cid(fc) == i).sum())
        assert int((cid(crop) == i).sum()) == int(n_i * float(want[i]))


def test_globalcom2_substitute_score_is_mean_logit_received(tiny_dir, hf_models):
    """OneVision's score (mean-token query) equals the last ViT layer's pre-softmax logits averaged
    over all queries and heads, computed here from the tower's hidden states."""
    from PIL import Image
    fam = "llava_onevision"
    model, proc = hf_models[fam]
    image = Image.fromarray(np.random.default_rng(10).integers(0, 256, (70, 120, 3), dtype=np.uint8))
    vt = mmkv.load(tiny_dir[fam]).encode(image, prefill=False).visual
    pix = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    tower = model.model.vision_tower
    with torch.inference_mode():
        hs = tower(pix, output_hidden_states=True).hidden_states[-2]   # input of the last layer
        layer = last_encoder_layer(tower)
        h = layer.layer_norm1(hs)
        a = layer.self_attn
        V, L, _ = h.shape
        q = a.q_proj(h).view(V, L, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(V, L, a.num_heads, a.head_dim).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * a.scale                     # [V, heads, L, L]
    torch.testing.assert_close(vt.meta["view_scores"], logits.mean((1, 2)), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- through the pipeline
def test_pipeline_static_video_keeps_one_slot(tiny_dir):
    fam = "qwen2_vl"
    video = np.repeat(frames_for(fam, n=1, seed=12), 12, axis=0)
    res = mmkv.load(tiny_dir[fam], recipe="pvc", chunk_frames=4).generate(video, QUESTION, max_new_tokens=2)
    (_, n_in, _), (name, before, after) = res.stats.visual_tokens
    assert name == "pvc" and before == n_in == 6 * 16 and after == 16


def test_pipeline_changed_frame_is_kept(tiny_dir):
    fam = "qwen2_vl"
    video = np.repeat(frames_for(fam, n=1, seed=13), 10, axis=0)
    video[6:8, 56:, :56] = [255, 0, 0]                               # slot 3 (frames 6-7): bottom-left quarter
    vt = mmkv.load(tiny_dir[fam], recipe="pvc", chunk_frames=4).encode(video, prefill=False).visual
    later = kept_set(vt) - {(0, h, w) for h in range(4) for w in range(4)}
    changed = {(3, h, w) for h in (2, 3) for w in (0, 1)}
    assert changed <= later                                          # the changed tokens of that frame
    assert {t for t, _, _ in later} <= {3, 4}                        # and nothing from unchanged frames


@pytest.mark.parametrize("recipe", ["pvc", "pvc:ratio=0.125", "pvc:ratio=0.25"])
def test_pipeline_red_square_in_two_frames_is_kept(tiny_dir, recipe):
    """Qwen2.5-VL (2 frames per slot): a red square in frames 6-7 on a still background is kept at
    its position under every PVC setting, and nothing else after the first slot but the background
    that returns at that position in slot 4 (`ratio` used to spend its budget on the background)."""
    fam = "qwen2_5_vl"
    video = np.repeat(frames_for(fam, n=1, seed=21), 12, axis=0)
    video[6:8, 56:84, 28:56] = [255, 0, 0]                           # one 28x28 token: (h, w) = (2, 1)
    res = mmkv.load(tiny_dir[fam], recipe=recipe, chunk_frames=4).encode(video, prefill=False)
    later = kept_set(res.visual) - {(0, h, w) for h in range(4) for w in range(4)}
    assert later == {(3, 2, 1), (4, 2, 1)}


def test_pipeline_streaming_chunks_equal_whole(tiny_dir):
    fam = "llava_onevision"
    video = frames_for(fam, n=12, seed=14)
    video[4:] = video[3]                                             # static tail
    a = mmkv.load(tiny_dir[fam], recipe="pvc:2+random:0.9", chunk_frames=3).encode(video, prefill=False).visual
    b = mmkv.load(tiny_dir[fam], recipe="pvc:2+random:0.9", chunk_frames=32).encode(video, prefill=False).visual
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(a.embeds, b.embeds)


def test_streaming_presses_run_on_images_when_asked(tiny_dir):
    from PIL import Image
    fam = "llava_onevision"
    image = Image.fromarray(np.random.default_rng(15).integers(0, 256, (100, 150, 3), dtype=np.uint8))
    plain = mmkv.load(tiny_dir[fam], recipe="pvc").generate(image, "What?", max_new_tokens=1).stats.visual_tokens
    assert plain[-1][1] == plain[-1][2]                              # pvc: images untouched by default
    res = mmkv.load(tiny_dir[fam], recipe="pool:images=true").generate(image, "What?", max_new_tokens=1)
    name, before, after = res.stats.visual_tokens[-1]
    assert name == "pool" and after < before / 2


# ----------------------------------------------------------------------------- positions (invariant 2)
def kept_reference_logits(family, model, inputs, enc, generated, embeds=None):
    """The plain HF model on ONLY the kept prompt tokens at their ORIGINAL positions, then the
    generated tokens (positions continue after the uncompressed prompt's maximum)."""
    ids = inputs["input_ids"]
    with torch.inference_mode():
        if family == "llava_onevision":
            feats = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output.flatten(0, 1)
            if feats.shape[0] == int((ids == model.config.video_token_id).sum()) - 1:
                feats = torch.cat([feats, model.model.image_newline[None]])
        else:
            feats = torch.cat(model.model.get_video_features(inputs["pixel_values_videos"],
                                                             inputs["video_grid_thw"]).pooler_output)
        emb = model.get_input_embeddings()(ids)[0].clone()
        slots = (ids[0] == model.config.video_token_id).nonzero().squeeze(1)
        emb[slots] = feats
        if embeds is not None:                                       # merged embeddings of a merging press
            emb[slots[enc.visual.index]] = embeds
    if family == "llava_onevision":
        pos = torch.arange(ids.shape[1])[None]
    else:
        extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
        pos = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                         video_grid_thw=inputs["video_grid_thw"], **extra)[0][:, 0]
    p_keep = torch.ones(ids.shape[1], dtype=torch.bool)
    p_keep[slots] = False
    p_keep[slots[enc.visual.index]] = True
    nxt = int(pos.max()) + 1
    gen = torch.tensor(generated[:-1], dtype=torch.long)
    gen_pos = torch.arange(nxt, nxt + len(gen)).expand(pos.shape[0], -1)
    with torch.inference_mode():
        e = torch.cat([emb[p_keep], model.get_input_embeddings()(gen)])[None]
        P = torch.cat([pos[:, p_keep], gen_pos], 1)
        P = P if family == "llava_onevision" else P[:, None]           # [1, L] or [3, 1, L]
        out = model(inputs_embeds=e, position_ids=P)
    return out.logits[0, int(p_keep.sum()) - 1:]


@pytest.mark.parametrize("family,recipe", [("qwen2_5_vl", "evs:0.3"), ("qwen2_vl", "random:0.4"),
                                           ("llava_onevision", "evs:0.4"), ("qwen2_5_vl", "pvc:6")])
def test_pruned_run_equals_model_on_kept_tokens(family, recipe, tiny_dir, hf_models):
    model, proc = hf_models[family]
    video = frames_for(family, n=10, seed=16)
    video[3:6] = video[2]                                            # some static frames: PVC drops tokens
    pipe = mmkv.load(tiny_dir[family], recipe=recipe)
    enc = pipe.encode(video)
    assert enc.visual.num < enc.visual.n_total
    res = pipe.ask(enc, QUESTION, max_new_tokens=5, output_scores=True)
    merged = enc.visual.embeds if recipe.startswith("pvc") else None
    ref = kept_reference_logits(family, model, hf_inputs(family, proc, QUESTION, video=video), enc, res.tokens,
                                merged)
    got = torch.stack(res.scores[:len(res.tokens)])
    torch.testing.assert_close(got, ref[:len(res.tokens)], atol=2e-4, rtol=1e-4)
    if merged is None:                                               # pruning only: the model's own features
        assert torch.equal(enc.visual.weight, torch.ones(enc.visual.num))


def test_positions_sensitivity(tiny_dir, hf_models):
    """Sanity: the reference above notices wrong positions (kept tokens re-indexed 0..L'-1)."""
    family = "qwen2_5_vl"
    model, proc = hf_models[family]
    video = frames_for(family, n=10, seed=16)
    pipe = mmkv.load(tiny_dir[family], recipe="evs:0.3")
    enc = pipe.encode(video)
    res = pipe.ask(enc, QUESTION, max_new_tokens=1, output_scores=True)
    inputs = hf_inputs(family, proc, QUESTION, video=video)
    ids = inputs["input_ids"]
    slots = (ids[0] == model.config.video_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[slots] = False
    keep[slots[enc.visual.index]] = True
    with torch.inference_mode():
        feats = torch.cat(model.model.get_video_features(inputs["pixel_values_videos"],
                                                         inputs["video_grid_thw"]).pooler_output)
        emb = model.get_input_embeddings()(ids)[0].clone()
        emb[slots] = feats
        L = int(keep.sum())
        shifted = model(inputs_embeds=emb[keep][None], position_ids=torch.arange(L).expand(3, 1, L)).logits[0, -1]
    assert not torch.allclose(res.scores[0], shifted, atol=1e-3)


# ----------------------------------------------------------------------------- streaming memory
@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_video_length(tiny_dir, tmp_path):
    """Decode -> encode -> PVC, chunk by chunk: the resident set after each chunk stops growing.
    Between the third quarter of a 4N-frame video and the last it grows far less than the raw
    frames decoded in between (N frames): a leak of a quarter of the decoded frames would fail.

    The trace is read after the heap's free pages are handed back (`_settled_rss`), so it shows
    what stays live. It still climbs by 80-100 MiB over the 100-150 frames after the warm-up (the
    decoder's buffers filling; the same climb at 8N frames, so it is bounded), then stays flat to
    0.5 MiB (0.2-0.5 MiB between the second or third quarter and the last in six runs, two of them
    beside two busy processes); how long that bounded ramp lasts depends on the machine's load, and
    a ramp ending past the first quarter failed a comparison against it (in 3 of 7 suite runs on a
    loaded machine; once against the second quarter, before the trace was settled), so the levels
    compared are the medians of the third and the last quarters."""
    from mmkv.bench.longvideo import measure, write_long_video
    n, side, chunk = 96, 320, 8
    video = write_long_video(str(tmp_path / "long.mp4"), 4 * n, size=side)
    r = measure(video, tiny_dir["qwen2_vl"], "pvc", chunk_frames=chunk, threads=1, timeout=600, warmup_frames=n)
    trace = r["chunk_rss_mib"]
    assert len(trace) == 4 * n // chunk and r["frames"] == 4 * n
    raw_growth = n * side * side * 3 / 2**20                       # MiB of decoded frames between 3N and 4N
    # medians: one transient spike (an allocator arena grown while the machine is busy) is no leak
    q = n // chunk
    growth = float(np.median(trace[-q:])) - float(np.median(trace[2 * q:3 * q]))
    assert growth < 0.25 * raw_growth, (growth, raw_growth, [round(x, 1) for x in trace])
    assert r["visual_kept"] < r["visual_in"] / 2
