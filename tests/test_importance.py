"""Query-agnostic importance (mmkv.cache.importance): observed attention normalized by the rows
that see each key (H2O + ZipVL Eq. 7), SnapKV window scores, Expected Attention's closed form and
its M-RoPE un-rotation, and the triangle-only score rows, each against an independent reference
(the plain eager model, or a direct loop)."""
import pytest
import torch

import mmkv
from conftest import frames_for
from kvref import capture, eager_attentions, eager_model
from mmkv.cache import ExpectedAttention, ObservedAttention, PressContext, SnapKV
from mmkv.cache import scores as S
from mmkv.cache.evict import share_across_layers
from mmkv.cache.importance import ExpectedImportance, pool1d, row_counts, rotate_half

QUESTION = "What is happening in this video?"


def prefix_attentions(tiny_dir, fam, pipe, enc):
    """Per-layer eager attention [Hq, n, n] of the plain model over the encoded prefix alone."""
    ids, pos = enc.prefix.ids[enc.keep], enc.prefix.positions[:, enc.keep]
    return eager_attentions(eager_model(tiny_dir[fam]), pipe, enc, ids, pos)


# ----------------------------------------------------------------------------- score rows
def test_attention_received_computes_only_the_causal_triangle(monkeypatch):
    """With keys in sequence order, each block of rows is scored against the keys it can see:
    about half of Q K^T for one chunk (the square was computed before), with the same result
    as a dense reference at odd sizes."""
    g = torch.Generator().manual_seed(1)
    b, hq, hk, lq, lk, d = 1, 4, 2, 301, 337, 8
    q, k = torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hk, lk, d, generator=g)
    kpos = torch.arange(lk).expand(hk, lk)
    qpos = torch.arange(lk - lq, lk)
    ref = torch.zeros(hk, lk)
    for h in range(hq):
        s = (k[0, h // 2] @ q[0, h].T).T * 0.2                                  # [lq, lk]
        s[kpos[h // 2][None] > qpos[:, None]] = float("-inf")
        ref[h // 2] += s.softmax(-1).sum(0)
    work = []
    real = torch.matmul
    monkeypatch.setattr(S.torch, "matmul", lambda a, b_: work.append(a.shape[:-1].numel() * b_.shape[-1]) or real(a, b_))
    got = S.attention_received(q, k, kpos, qpos, 0.2, block=64)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    square = hq * lq * lk
    assert sum(work) < 0.75 * square


# ----------------------------------------------------------------------------- observed (H2O + Eq. 7)
@pytest.mark.parametrize("probes", [0, 5])
def test_observed_scores_equal_eager_attention_over_rows_that_see_the_key(tiny_dir, probes):
    """M-RoPE (Qwen2-VL), GQA 4 -> 2, chunked prefill (17 rows a chunk), compress at encode:
    sum of the prefix rows' attention (mean over each KV head's query heads) / rows that see it."""
    fam = "qwen2_vl"
    pipe = mmkv.load(tiny_dir[fam], prefill_chunk=17, compress_at="encode", chunk_frames=2)
    press = ObservedAttention(ratio=0.5, probes=probes)
    snaps = capture(pipe, [press])
    enc = pipe.encode(frames_for(fam, n=6, seed=3))
    atts = prefix_attentions(tiny_dir, fam, pipe, enc)
    n = enc.prefix_len
    rows = torch.zeros(n, dtype=torch.bool)
    for s in range(0, n, 17):  # the probe rows each chunk draws
        lq = min(17, n - s)
        r = press.importance().rows(lq, s, "cpu")
        sel = torch.arange(s, s + lq) if r is None else r + s
        rows[sel] = True
    if probes:
        assert 0 < rows.sum() < n
    cnt = torch.tensor([float(rows[j:].sum()) for j in range(n)])
    for layer, att in enumerate(atts):
        hq = att.shape[0]
        recv = att[:, rows].sum(1).view(2, hq // 2, -1).mean(1)                 # [Hk, n]
        got = snaps["state"][("observed", layer, "sum")]
        torch.testing.assert_close(got, recv, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(snaps["state"][("observed", layer, "cnt")], cnt)
    post = snaps["post"].layers[0]
    assert post.stored == n - n // 2 and enc.cache.lengths() == [n - n // 2] * len(atts)


def test_row_counts_count_the_rows_at_or_after_each_key():
    q = torch.tensor([3, 7, 7, 9])
    assert row_counts(q, 11).tolist() == [4, 4, 4, 4, 3, 3, 3, 3, 1, 1, 0]


def test_chunking_and_streaming_do_not_change_the_scores(tiny_dir):
    """The same video with one prefill pass or 13-row chunks, streamed 2 or 32 frames at a time,
    gives the same statistics for every scorer (kept per sequence index)."""
    fam = "qwen2_5_vl"
    video = frames_for(fam, n=8, seed=9)
    states = []
    for chunk, frames in ((4096, 32), (13, 2)):
        pipe = mmkv.load(tiny_dir[fam], prefill_chunk=chunk, chunk_frames=frames, compress_at="encode")
        presses = [ObservedAttention(), SnapKV(window=9), ExpectedAttention()]
        snaps = [capture(pipe, [p]) for p in presses][-1]
        pipe.recipe = mmkv.Recipe(presses)
        pipe._split_stages()
        pipe.encode(video)
        states.append(snaps["state"])
    a, b = states
    keys = [k for k in a if k[0] in ("observed", "snapkv", "expected") and k[-1] != "done"]
    assert len(keys) > 8
    for k in keys:
        va, vb = a[k], b[k]
        va, vb = (va if isinstance(va, tuple) else (va,)), (vb if isinstance(vb, tuple) else (vb,))
        for x, y in zip(va, vb):
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
            else:
                assert x == y


# ----------------------------------------------------------------------------- SnapKV window
def test_window_scores_equal_eager_last_rows_pooled(tiny_dir):
    fam = "llava_onevision"
    w = 11
    pipe = mmkv.load(tiny_dir[fam], prefill_chunk=19, compress_at="encode")
    snaps = capture(pipe, [SnapKV(ratio=0.5, window=w, kernel=5, pool="max")])
    enc = pipe.encode(frames_for(fam, n=6, seed=2))
    atts = prefix_attentions(tiny_dir, fam, pipe, enc)
    n = enc.prefix_len
    for layer, att in enumerate(atts):
        hq = att.shape[0]
        ref = att[:, n - w:].mean(1).view(2, hq // 2, -1).mean(1)                 # [Hk, n]
        s, rows = snaps["state"][("snapkv", "encode", layer)]
        torch.testing.assert_close(s / rows, ref, atol=1e-5, rtol=1e-4)
    post = snaps["post"].layers[1].pos
    assert bool((post >= n - w).sum(1).eq(w).all())                               # the window is kept
    x = torch.tensor([[0.0, 5, 0, 0, 1, 0, 0]])
    assert pool1d(x, 3, "max").tolist() == [[5, 5, 5, 1, 1, 1, 0]]


def test_proxy_rows_are_observed_and_their_entries_dropped(tiny_dir):
    """A stand-in question after the prefix: the window is its rows (attention over prefix +
    proxy, as the eager model computes it) and the encoded cache holds no proxy entry."""
    fam = "qwen2_vl"
    pipe = mmkv.load(tiny_dir[fam], compress_at="encode")
    snaps = capture(pipe, [SnapKV(ratio=0.5, proxy=QUESTION, kernel=1)])
    enc = pipe.encode(frames_for(fam, n=6, seed=4))
    n = enc.prefix_len
    suf = pipe.adapter.suffix(QUESTION, "video", enc.prefix.next_text_position)
    ids = torch.cat([enc.prefix.ids, suf.ids])
    pos = torch.cat([enc.prefix.positions, suf.positions], 1)
    with torch.inference_mode():
        atts = eager_attentions(eager_model(tiny_dir[fam]), pipe, enc, ids, pos)
    for layer, att in enumerate(atts):
        ref = att[:, n:].mean(1).view(2, 2, -1).mean(1)
        s, rows = snaps["state"][("snapkv", "encode", layer)]
        assert rows == len(suf.ids)
        torch.testing.assert_close((s / rows)[:, :n], ref[:, :n], atol=1e-5, rtol=1e-4)
    assert all(int(layer.pos.max()) < n for layer in enc.cache.layers)
    assert enc.cache.seen == n


# ----------------------------------------------------------------------------- Expected Attention
def test_expected_attention_query_statistics_are_the_pre_rope_queries(tiny_dir):
    """The observer's post-RoPE queries, un-rotated at their 3-D M-RoPE positions, are exactly
    the q_proj outputs of the plain model (captured before RoPE)."""
    fam = "qwen2_vl"
    pipe = mmkv.load(tiny_dir[fam], prefill_chunk=23, compress_at="encode")
    snaps = capture(pipe, [ExpectedAttention()])
    enc = pipe.encode(frames_for(fam, n=6, seed=5))
    model = eager_model(tiny_dir[fam])
    got = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o, idx=idx: got.__setitem__(idx, o))
             for idx, layer in enumerate(model.model.language_model.layers)]
    eager_attentions(model, pipe, enc, enc.prefix.ids[enc.keep], enc.prefix.positions[:, enc.keep])
    for h in hooks:
        h.remove()
    for idx, q in got.items():
        n, hq = q.shape[1], 4
        pre = q[0].view(n, hq, -1).transpose(0, 1)[:, 4:].float()                # [Hq, n - sink, D]
        s1, s2, cnt = snaps["state"][("expected", idx, "q")]
        assert cnt == n - 4
        torch.testing.assert_close(s1, pre.sum(1), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(s2, pre.transpose(1, 2) @ pre, atol=1e-3, rtol=1e-4)


def test_expected_attention_closed_form_against_explicit_rotations():
    """z = s k.(R mu) + s^2/2 k^T (R S R^T) k with R the mean of explicit rotation matrices."""
    g = torch.Generator().manual_seed(3)
    hq, hk, n, d, fut = 4, 2, 9, 8, 5
    keys, values = torch.randn(1, hk, n, d, generator=g), torch.randn(1, hk, n, d, generator=g)
    qs = torch.randn(hq, 40, d, generator=g) + 0.5
    inv = 1.0 / (100 ** (torch.arange(0, d, 2).float() / d))

    def rotary(p):
        ang = p[0].float()[:, None] * inv[None]
        return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    class Layer:
        pass

    layer = Layer()
    layer.keys, layer.values, layer.pos = keys, values, torch.arange(n).expand(hk, n)
    ctx = PressContext(token_type=torch.zeros(n, dtype=torch.int8), head_dim=d, rotary=rotary,
                       positions=torch.arange(n)[None])
    imp = ExpectedImportance(future=fut)
    st = {(0, "q"): (qs.sum(1), qs.transpose(1, 2) @ qs, 40)}
    got, _ = imp.scores(st, 0, layer, ctx)
    mats = []
    for p in range(n, n + fut):
        m = torch.zeros(d, d)
        for i in range(d // 2):
            c, s = torch.cos(p * inv[i]), torch.sin(p * inv[i])
            j = i + d // 2
            m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c                      # x*cos + rotate_half(x)*sin
        mats.append(m)
    r = torch.stack(mats).mean(0)
    x = torch.randn(d, generator=g)
    c0, s0 = rotary(torch.tensor([[n]]))
    torch.testing.assert_close(mats[0] @ x, x * c0[0] + rotate_half(x) * s0[0], atol=1e-5, rtol=1e-5)
    ref = torch.zeros(hk, n)
    for h in range(hq):
        mu = qs[h].mean(0)
        cov = qs[h].T @ qs[h] / 40 - mu[:, None] * mu[None]
        k = keys[0, h // 2]
        z = d ** -0.5 * k @ (r @ mu) + 0.5 / d * ((k @ r) @ cov * (k @ r)).sum(-1)
        ref[h // 2] += z.softmax(-1) * values[0, h // 2].norm(dim=-1) / 2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- cross-layer sharing
def test_share_across_layers_mixes_each_token_mean():
    class Layer:
        def __init__(self, pos):
            self.pos = pos

    pos = torch.tensor([[0, 1, 2], [2, 0, 1]])
    a = torch.tensor([[1.0, 2, 3], [3, 1, 2]])                  # mean 2 -> token scores 0.5, 1, 1.5
    b = torch.tensor([[4.0, 0, 2], [2, 4, 0]])                  # mean 2 -> token scores 2, 0, 1
    out = share_across_layers([(0, Layer(pos), a, None, None), (1, Layer(pos), b, None, None)], 1.0)
    tok = torch.tensor([1.25, 0.5, 1.25])
    for _, lay, s, _, _ in out:
        torch.testing.assert_close(s, tok[pos])
    half = share_across_layers([(0, Layer(pos), a, None, None), (1, Layer(pos), b, None, None)], 0.5)
    torch.testing.assert_close(half[0][2], 0.5 * a / 2 + 0.5 * tok[pos])
