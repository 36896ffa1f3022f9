"""Token-sparse attention over gathered indices (ZipVL's O_T = Attention(Q[T], K[T], V[T])).

ZipVL (He et al., arXiv 2410.08584) runs each layer's prefill attention on the important tokens
only, causal within the subset in original order. This module computes that without ever copying
the gathered rows: the kernel reads the query, key and value rows of the subset straight from the
full [B, H, L, D] tensors through their index lists and writes the output rows back in place
(gather and scatter fused), FlashAttention-2 style (online softmax, one pass over keys).

Index and position convention (shared by the kernel, the reference and the dispatcher):
    q [B, Hq, Lq, D]  k, v [B, Hk, Lk, D]  (Lq <= Lk, Hq % Hk == 0: GQA)
    query row i sits at key index  off + i  with  off = Lk - Lq  (the Lq queries are the last Lq
    keys: prefill of a chunk after a cached prefix), so key j is visible to query row i iff
    j <= off + i (causal by ORIGINAL position: the subsets never get re-indexed positions).
    q_idx [Nq] int: sorted query rows to compute (in 0..Lq-1)
    k_idx [Nk] int: sorted key indices to attend to (in 0..Lk-1)
    out   [B, Lq, Hq, D] in q's dtype (transformers' attention layout); rows not in q_idx, and rows
          with no visible key, are 0.

ZipVL's layer attention is `q_idx = T ∩ chunk`, `k_idx = T`; `q_idx = all rows, k_idx = T` gives
key-only sparsity. The dispatcher `sparse_attention` runs the Triton kernel on CUDA and the
PyTorch reference (gather + SDPA) elsewhere. Tests run the kernel on CPU with TRITON_INTERPRET=1.
This module imports nothing from mmkv, so a test can load a private copy of it under the
interpreter.
"""
from __future__ import annotations

import torch

try:  # triton is optional on platforms without it; the reference path needs only torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

LOG2E = 1.4426950408889634
KHI_STEP = 8  # query rows per entry of the causal key bound (the smallest tile the kernel takes)


def _check(q, k, v, q_idx, k_idx):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Hq, Lq, D], k = v [B, Hk, Lk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or k.shape[-1] != d or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match (batch, head dim, GQA groups)")
    if lq > k.shape[2]:
        raise ValueError(f"more queries ({lq}) than keys ({k.shape[2]}): the queries must be the last keys")
    if q_idx.dim() != 1 or k_idx.dim() != 1:
        raise ValueError("q_idx and k_idx must be 1-D index tensors")


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                         k_idx: torch.Tensor, scaling: float) -> torch.Tensor:
    """PyTorch reference (see the module docstring for shapes): gathers the subset and runs SDPA.

    Also the CPU production path. When the subset is aligned (Lq == Lk and q_idx == k_idx, the
    ZipVL case for a whole-prompt prefill) the gathered problem is plain causal attention."""
    _check(q, k, v, q_idx, k_idx)
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    out = q.new_zeros(b, lq, hq, d)
    if q_idx.numel() == 0 or k_idx.numel() == 0:
        return out
    q_idx, k_idx = q_idx.to(q.device, torch.long), k_idx.to(q.device, torch.long)
    qs, ks, vs = q.index_select(2, q_idx), k.index_select(2, k_idx), v.index_select(2, k_idx)
    gqa = hq != k.shape[1]
    if lq == lk and q_idx.shape == k_idx.shape and torch.equal(q_idx, k_idx):
        res = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling,
                                                               enable_gqa=gqa)
        out[:, q_idx] = res.transpose(1, 2)
        return out
    vis = k_idx[None, :] <= (q_idx + (lk - lq))[:, None]           # [Nq, Nk]
    empty = ~vis.any(1)
    if bool(empty.any()):
        vis = vis | empty[:, None]  # avoid NaN rows; zeroed below
    res = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=vis, scale=scaling, enable_gqa=gqa)
    res = res.masked_fill(empty[None, None, :, None], 0)
    out[:, q_idx] = res.transpose(1, 2)
    return out


if triton is not None:

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _sparse_attn_fwd(Q, K, V, Out, QIdx, KIdx, KHi,
                         s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
                         s_vb, s_vh, s_vn, s_vd, s_ob, s_om, s_oh, s_od,
                         n_q, off, qk_scale, H, G,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, KHI_STEP: tl.constexpr,
                         Q_BUCKET: tl.constexpr = 0, BLOCK_D2: tl.constexpr = 0):
        """One program: BLOCK_M gathered query rows of one (batch, query head) over the gathered keys.
        The head dim is one power-of-two chunk of BLOCK_D channels, or two (BLOCK_D + BLOCK_D2:
        80 = 64 + 16, 96 = 64 + 32) so that such heads are not padded to 128."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # batch and head base offsets in int64: b * s_qb passes 2**31
        h = (pid_bh % H).to(tl.int64)   # at batch 6 x 128K tokens (7B shape), h * s_qh at L >= 621K
        hk = h // G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_q
        qi = tl.load(QIdx + offs_m, mask=m_ok, other=0).to(tl.int64)  # query rows of this block
        qpos = qi + off                                               # their key indices
        q_rows = Q + b * s_qb + h * s_qh + qi[:, None] * s_qm
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_rows + offs_d[None, :] * s_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            d2_ok = offs_d2 < HEAD_DIM
            q2 = tl.load(q_rows + offs_d2[None, :] * s_qd, mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
            if UPCAST:
                q2 = q2.to(tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        # gathered keys visible to the block's last query (causal skip), kept per KHI_STEP rows
        hi = tl.load(KHi + (tl.minimum((pid_m + 1) * BLOCK_M, n_q) - 1) // KHI_STEP)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            kj = tl.load(KIdx + offs_n, mask=n_ok, other=0).to(tl.int64)
            k_rows = k_base + kj[None, :] * s_kn
            v_rows = v_base + kj[:, None] * s_vn
            kt = tl.load(k_rows + offs_d[:, None] * s_kd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [D, N]
            vb = tl.load(v_rows + offs_d[None, :] * s_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
            if UPCAST:
                kt = kt.to(tl.float32)
                vb = vb.to(tl.float32)
            s = _mm(q, kt, IEEE)
            if BLOCK_D2 > 0:
                kt2 = tl.load(k_rows + offs_d2[:, None] * s_kd, mask=n_ok[None, :] & d2_ok[:, None], other=0.0)
                vb2 = tl.load(v_rows + offs_d2[None, :] * s_vd, mask=n_ok[:, None] & d2_ok[None, :], other=0.0)
                if UPCAST:
                    kt2 = kt2.to(tl.float32)
                    vb2 = vb2.to(tl.float32)
                s += _mm(q2, kt2, IEEE)
            s = s * qk_scale                                                  # log2 domain
            vis = n_ok[None, :] & (kj[None, :] <= qpos[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p.to(vb.dtype), vb, IEEE)
            if BLOCK_D2 > 0:
                acc2 = acc2 * alpha[:, None] + _mm(p.to(vb2.dtype), vb2, IEEE)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_rows = Out + b * s_ob + qi[:, None] * s_om + h * s_oh
        tl.store(out_rows + offs_d[None, :] * s_od, (acc / l_safe).to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        if BLOCK_D2 > 0:
            tl.store(out_rows + offs_d2[None, :] * s_od, (acc2 / l_safe).to(Out.dtype.element_ty),
                     mask=m_ok[:, None] & d2_ok[None, :])

    # Autotuned tiles on a GPU (fp16/bf16, D <= 128), keyed on the head dim, the dtype path and the
    # gathered query count's bucket (Q_BUCKET: < 2048 rows or more); timed once per key on the
    # first launch. Tiles of 64-128 queries x 32-64 keys, 4-8 warps, 3-stage pipelined K/V loads.
    TUNE_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                    for bm, bn, w, st in ((64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 2))]
    _sparse_attn_tuned = triton.autotune(TUNE_CONFIGS, key=["HEAD_DIM", "Q_BUCKET", "UPCAST", "IEEE"])(_sparse_attn_fwd)


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                            k_idx: torch.Tensor, scaling: float, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Launch the fused gather-attention-scatter kernel.

    q [B, Hq, Lq, D], k/v [B, Hk, Lk, D] (any strides), q_idx [Nq] and k_idx [Nk] sorted ascending
    (int32/int64, on q's device) -> out [B, Lq, Hq, D] in q's dtype (see the module docstring).
    fp16/bf16/fp32. On CUDA fp16/bf16 the products run in the input dtype with fp32 accumulation;
    on CPU (TRITON_INTERPRET=1) and for fp32 everything is upcast to fp32 after loading (the
    interpreter's bf16 arithmetic is wrong). block_m / block_n: powers of two, >= 16 on a GPU
    (tl.dot's minimum), >= 8 under the interpreter; default on a GPU: autotuned among
    TUNE_CONFIGS for fp16/bf16 at D <= 128, else 64 x 64 (D <= 64), 64 x 32 (D <= 128), 32 x 32;
    16 x 16 on CPU."""
    tune = q.is_cuda and block_m is None and block_n is None and num_warps is None and q.dtype != torch.float32 \
        and q.shape[-1] <= 128
    out, launches = sparse_attention_launches(q, k, v, q_idx, k_idx, scaling, block_m, block_n, num_warps, tune=tune)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    return out


def head_chunks(d: int) -> dict:
    """The head dim as power-of-two chunks (BLOCK_D, BLOCK_D2) of at least 16 channels (tl.dot's
    minimum): one chunk when padding to the next power of two costs nothing or the rest is under
    16 channels (d = 24 pads to 32), else two (80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16)."""
    full = max(16, triton.next_power_of_2(d))
    a = full // 2
    rest = d - a
    if d <= 16 or rest <= 0 or rest < 16 or a + triton.next_power_of_2(rest) >= full:
        return {"BLOCK_D": full, "BLOCK_D2": 0}
    return {"BLOCK_D": a, "BLOCK_D2": triton.next_power_of_2(rest)}


def _check_block(name: str, value, on_gpu: bool) -> None:
    lo = 16 if on_gpu else 8
    if not isinstance(value, int) or value < lo or value & (value - 1):
        raise ValueError(f"{name}={value!r}: tile sizes must be powers of two >= {lo} "
                         f"({'tl.dot on a GPU needs 16 per dimension' if on_gpu else 'interpreter minimum'})")


def sparse_attention_launches(q, k, v, q_idx, k_idx, scaling: float, block_m: int | None = None,
                              block_n: int | None = None, num_warps: int | None = None, on_gpu: bool | None = None,
                              tune: bool = False):
    """What `sparse_attention_triton` launches, without launching it: (out, [(kernel, grid, args,
    kwargs)]). `on_gpu` (default: q on CUDA) lets `mmkv.kernels.aot` compile a GPU launch from CPU
    or meta tensors. `tune`: the autotuned kernel, its tiles chosen at the first launch (the grid
    is then a function of them)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(q, k, v, q_idx, k_idx)
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the sparse prefill kernel")
    out = q.new_zeros(b, lq, hq, d)
    nq, nk = q_idx.numel(), k_idx.numel()
    if nq == 0 or nk == 0:
        return out, []
    on_gpu = q.is_cuda if on_gpu is None else on_gpu
    if block_m is None:
        block_m = (64 if d <= 128 else 32) if on_gpu else 16
    if block_n is None:
        block_n = (64 if d <= 64 else 32) if on_gpu else 16
    _check_block("block_m", block_m, on_gpu)
    _check_block("block_n", block_n, on_gpu)
    q_idx = q_idx.to(q.device, torch.int32).contiguous()
    k_idx = k_idx.to(q.device, torch.int32).contiguous()
    off = lk - lq
    # gathered keys visible to the last query of every KHI_STEP rows (the tiles' causal bound)
    last = torch.clamp(torch.arange(1, triton.cdiv(nq, KHI_STEP) + 1, device=q.device) * KHI_STEP, max=nq) - 1
    khi = torch.searchsorted(k_idx, q_idx[last] + off, right=True).to(torch.int32).contiguous()
    upcast = (not on_gpu) or q.dtype == torch.float32
    grid = (triton.cdiv(nq, block_m), b * hq)
    args = (q, k, v, out, q_idx, k_idx, khi, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            nq, off, scaling * LOG2E, hq, hq // hk)
    kwargs = dict(HEAD_DIM=d, **head_chunks(d), UPCAST=upcast, IEEE=q.dtype == torch.float32, KHI_STEP=KHI_STEP,
                  Q_BUCKET=int(nq >= 2048))
    if tune:
        return out, [(_sparse_attn_tuned, lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq), args, kwargs)]
    kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps or (4 if d <= 64 else 8))
    return out, [(_sparse_attn_fwd, grid, args, kwargs)]


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                     k_idx: torch.Tensor, scaling: float) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA (fp16/bf16/fp32, head dim <= 256), else the reference."""
    if triton is not None and q.is_cuda and q.shape[-1] <= 256:
        return sparse_attention_triton(q, k, v, q_idx, k_idx, scaling)
    return sparse_attention_ref(q, k, v, q_idx, k_idx, scaling)
