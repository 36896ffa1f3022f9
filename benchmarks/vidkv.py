"""VidKV storage and fidelity: true bits per element from the stored tensors, and reconstruction
and attention-output errors, side by side with KIVI, on one decoder layer's cache.

The cache (B=1, Hk KV heads, head dim D, T tokens + the 128-token window) holds synthetic
post-RoPE-like keys: Gaussian with a per-(head, channel) scale drawn log-normally and a few
outlier channels per head (different per head, as RoPE frequencies and M-RoPE make them), and
Gaussian values. Errors on synthetic data only rank the formats; real numbers need a real model.
Bytes are real: every figure is the sum of the stored tensors' nbytes.

    python benchmarks/vidkv.py                          # D=128, Hk=4, T=8192
    python benchmarks/vidkv.py --context 32768 --kv-heads 2 --head-dim 64

With --pipeline it instead runs the whole pipeline (random-init Qwen2-VL with a 4-layer decoder of
head dim 64 and 2 KV heads as Qwen2-0.5B, bf16, so the full-precision window is 2 bytes like fp16)
on a synthetic video and prints the KV bytes each recipe stores after prefill against the fp16
cache of the same prompt, all layers:

    python benchmarks/vidkv.py --pipeline --frames 512
"""
from __future__ import annotations

import argparse

import torch

RESIDUAL = 128
CONFIGS = [
    ("kivi:4", "KIVI 4-bit"),
    ("kivi:2", "KIVI 2-bit"),
    ("vidkv:stp=0,value_bits=2", "VidKV 1.5 / 2"),
    ("vidkv:stp=0,stats=16", "VidKV 1.5 / 1.58, fp16 statistics (the paper's format)"),
    ("vidkv:stp=0", "VidKV 1.5 / 1.58, 8-bit statistics (mmkv default)"),
    ("vidkv:stats=16", "VidKV 1.5 / 1.58 + STP 20% (1.66), fp16 statistics"),
    ("vidkv", "VidKV 1.5 / 1.58 + STP 20% (1.66), 8-bit statistics"),
    ("vidkv:stp=0,channels=head", "VidKV 1.5 / 1.58, channels ranked per head"),
    ("vidkv:1.25,stp=0", "VidKV 1.25 / 1.58"),
    ("vidkv:2,stp=0", "VidKV 2 / 1.58 (no FFT channels)"),
    ("vidkv:stp=0,group=64", "VidKV 1.5 / 1.58, groups of 64"),
]


def synthetic(hk: int, t: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(hk, d, generator=g))
    for h in range(hk):  # 4 outlier channels per head, at head-specific indices
        scale[h, torch.randperm(d, generator=g)[:4]] *= 8
    offset = 0.3 * torch.randn(hk, d, generator=g) * scale
    k = torch.randn(1, hk, t, d, generator=g) * scale[None, :, None] + offset[None, :, None]
    v = torch.randn(1, hk, t, d, generator=g)
    return k, v


def context_all_visual(n: int, d_model: int = 32, seed: int = 1):
    """A PressContext where every token is a visual patch (for STP), with random embeddings."""
    from mmkv.cache import VISUAL, PressContext

    g = torch.Generator().manual_seed(seed)
    return PressContext(token_type=torch.full((n,), VISUAL, dtype=torch.int8),
                        question_embeds=torch.randn(5, d_model, generator=g),
                        visual_embeds=torch.randn(n, d_model, generator=g))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


PIPELINE_RECIPES = ["none", "kivi:2", "vidkv:stp=0,stats=16", "vidkv:stats=16", "vidkv:stp=0", "vidkv",
                    "vidkv:stp=0,group=64", "lookm", "lookm+kivi:2", "lookm+vidkv:stats=16", "lookm+vidkv"]


def pipeline(frames: int, recipes: list[str]) -> None:
    import os
    import tempfile

    import numpy as np

    import mmkv
    from mmkv.models.tiny import build_tiny

    # bytes per element depend on the head dim and the number of tokens, not on the model's width or depth:
    # a small decoder with Qwen2-0.5B's attention shape (2 KV heads, head dim 64) keeps the run short on CPU
    path = build_tiny("qwen2_vl", os.path.join(tempfile.mkdtemp(), "m"), shape="0.5b",
                      text_overrides=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2))
    video = np.random.default_rng(0).integers(0, 256, (frames, 112, 112, 3), dtype=np.uint8)
    print(f"Qwen2-VL decoder, 4 layers, 4 heads, 2 KV heads, head dim 64, random init, bf16, {frames} frames")
    # the baseline: the model's own (bf16) uncompressed cache of the same prompt (Stats.kv_bytes_uncompressed)
    print("| recipe | prompt tokens | KV entries per layer | KV MiB | uncompressed bf16 MiB | x smaller | "
          "bits/elem (all) | bits/elem (VidKV part) |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in recipes:
        res = mmkv.load(path, recipe=spec, dtype=torch.bfloat16).generate(video, "What happens?", max_new_tokens=1)
        s = res.stats
        part = s.extra.get("vidkv_bits_per_element")
        print(f"| `{spec}` | {s.prompt_tokens} | {max(s.kv_len_per_layer)} | {s.kv_bytes / 2**20:.2f} | "
              f"{s.kv_bytes_uncompressed / 2**20:.2f} | {s.kv_bytes_uncompressed / s.kv_bytes:.1f} | "
              f"{s.bits_per_element:.3f} | "
              f"{'' if part is None else f'{part:.3f}'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=16, help="decode queries per head for the attention error")
    ap.add_argument("--pipeline", action="store_true", help="KV bytes of whole-pipeline runs instead")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--recipes", default=";".join(PIPELINE_RECIPES), help="';'-separated")
    args = ap.parse_args()
    if args.pipeline:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        return pipeline(args.frames, args.recipes.split(";"))
    from mmkv.cache import CompressedCache
    from mmkv.cache.attend import causal_mask, partial_attention
    from mmkv.recipe import Recipe

    hk, hq, d, t = args.kv_heads, args.heads, args.head_dim, args.context
    n = t + RESIDUAL
    k, v = synthetic(hk, n, d)
    # decode queries that each look for one earlier token (its key plus noise), so that attention
    # is peaked as in retrieval, and the output error is not measured against a near-zero average
    gq = torch.Generator().manual_seed(2)
    pick = torch.randint(0, n, (hq, args.queries), generator=gq)
    q = torch.stack([k[0, h // (hq // hk), pick[h]] for h in range(hq)])[None]        # [1, Hq, Lq, D]
    q = q + 0.5 * q.std() * torch.randn(q.shape, generator=gq)
    scaling = d ** -0.5
    # KVLayer.attend treats the Lq queries as the last Lq tokens (causal within the window): same here
    exact, _ = partial_attention(q, k, v, scaling, causal_mask(args.queries, n, "cpu"))
    print(f"one layer: Hk={hk}, D={d}, {t} quantizable tokens + {RESIDUAL}-token window; fp32 data, "
          f"byte counts with an fp16 window; attention error over {hq}x{args.queries} "
          "retrieval-like queries")
    print("| recipe | bits/elem, quantized part | bits/elem, layer (fp16 window) | x smaller than fp16 | "
          "key rel. err | value rel. err | attention out rel. err |")
    print("|---|---|---|---|---|---|---|")
    for spec, label in CONFIGS:
        cache = CompressedCache(1)
        cache.update(k.half(), v.half(), 0)
        press = Recipe.parse(spec).kv[0]
        press.compress(cache, context_all_visual(n) if getattr(press, "stp", 0) else None)
        layer = cache.layers[0]
        seg_bytes = sum(s.nbytes for s in layer.segments)
        seg_elems = sum(2 * hk * s.num_tokens * d for s in layer.segments)
        layer_bits = 8 * layer.nbytes / (2 * hk * n * d)
        order = layer.positions()[0].long()
        kd, vd = layer.dequantized(torch.float32)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(n)
        kd, vd = kd[:, :, inv], vd[:, :, inv]  # back to sequence order (heads share positions here)
        out = layer.attend(q, scaling).transpose(1, 2).float()
        print(f"| `{spec}` ({label}) | {8 * seg_bytes / seg_elems:.3f} | {layer_bits:.3f} | {16 / layer_bits:.2f} | "
              f"{rel(kd, k):.3f} | {rel(vd, v):.3f} | {rel(out, exact):.4f} |")


if __name__ == "__main__":
    main()
