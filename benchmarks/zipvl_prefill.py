"""ZipVL sparse prefill against dense SDPA, side by side, on CPU (or a GPU when present).

Times the language model's prefill of L random-embedding tokens (1-D positions, one chunk) through
the mmkv pipeline's prefill path, for the dense baseline (SDPA) and ZipVL recipes, alternating the
order every repeat so that machine drift hits all alike. Reports the median time, the median of the
per-repeat ratio to dense, the kept ratio ZipVL chose and the attention FLOPs it saved. Random
weights give diffuse attention, so the adaptive tau keeps nearly every token; the fixed-ratio rows
(`zipvl:ratio=r`) show the speedup at a given sparsity. A second table times one layer's attention
alone (dense SDPA vs probes + gathered sparse attention) to show where the time goes, and the
sparse attention against SDPA run on the same subset gathered beforehand (issue 5's yardstick for
the Triton kernel on a GPU: within 1.5x).

    python benchmarks/zipvl_prefill.py                                    # 0.5B-shaped, 2K and 4K
    python benchmarks/zipvl_prefill.py --lengths 512 --repeats 1 --shape tiny   # quick check
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

RECIPES = [
    ("none", "dense SDPA"),
    ("zipvl:kv=none", "ZipVL tau=0.975"),
    ("zipvl", "ZipVL tau=0.975 + 4/2-bit KV"),
    ("zipvl:kv=none,ratio=0.5,dense_above=1", "ZipVL fixed 50%, no dense fallback"),
    ("zipvl:kv=none,ratio=0.5", "ZipVL fixed 50% (past the break-even: dense)"),
    ("zipvl:kv=none,ratio=0.3", "ZipVL fixed 30%"),
    ("zipvl:kv=none,ratio=0.1", "ZipVL fixed 10%"),
]


def prefill_once(pipe, embeds, positions) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of this process, ZipVL stats) of one prefill."""
    from mmkv.cache import CompressedCache

    a = pipe.adapter
    cache = CompressedCache(a.num_layers)
    cache.set_fused(True)
    pctx = pipe._press_ctx(torch.zeros(embeds.shape[0], dtype=torch.int8))
    if a.device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    pipe._prefill(cache, embeds, positions, pctx, lambda *x: None)
    if a.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c, pctx.stats


def layer_attention(length: int, ratios, repeats: int, hq=14, hk=2, d=64, device="cpu", dtype=torch.float32):
    """One layer's attention: dense causal SDPA vs ZipVL's probes + sparse attention at fixed ratios.

    q, k, v are in the model's dtype and in transformers' layout (projections [B, L, H, D] viewed
    as [B, H, L, D]), as the attention function receives them. The SDPA baselines get K/V repeated
    to the query heads (and the subsets gathered) beforehand, untimed, so SDPA runs its fused
    (FlashAttention) kernel rather than the GQA math path."""
    from mmkv.kernels.sparse_prefill import sparse_attention
    from mmkv.prefill.zipvl import adaptive_budget, pick_probes, probe_attention, probes_seeing, select_important

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, length, hq, d, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(1, length, hk, d, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(1, length, hk, d, generator=g).to(device, dtype).transpose(1, 2)
    kr, vr = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    sc = d ** -0.5

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=sc)

    def probes():
        rows = pick_probes(length, 64, 64, torch.Generator().manual_seed(1)).to(device)
        rec, _ = probe_attention(q, k, v, rows, sc)
        return rec, probes_seeing(length, rows)

    rec, nnz = probes()
    runs = {"dense": dense, "probes": probes}
    for r in ratios:
        keep = select_important(rec, nnz, adaptive_budget(rec, 1.0, r))
        runs[f"sparse {r:.0%}"] = (lambda keep=keep: sparse_attention(q, k, v, keep, keep, sc))
        # the yardstick for the kernel: SDPA on the same subset, gathered beforehand (not timed)
        qs, ks, vs = q[:, :, keep].contiguous(), kr[:, :, keep].contiguous(), vr[:, :, keep].contiguous()
        runs[f"SDPA on the {r:.0%} subset"] = (lambda qs=qs, ks=ks, vs=vs: torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=sc))
    for fn in runs.values():  # warm-up
        fn()
    times = {n: [] for n in runs}
    for i in range(repeats):
        for n, fn in (list(runs.items()) if i % 2 == 0 else list(runs.items())[::-1]):
            t, c = time.perf_counter(), time.process_time()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t, time.process_time() - c))
    return {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b", choices=["tiny", "0.5b"])
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--recipes", default=None, help="comma-separated subset of the recipes (default: all)")
    ap.add_argument("--skip-layer", action="store_true", help="skip the one-layer attention table")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mmkv
    from mmkv.models.tiny import build_tiny

    path = build_tiny("qwen2_vl", os.path.join(tempfile.mkdtemp(), "m"), shape=args.shape)
    recipes = RECIPES if not args.recipes else [(r.strip(), r.strip()) for r in args.recipes.split(",")]
    base = mmkv.load(path, dtype=args.dtype)  # one model, shared by every recipe's pipeline
    a = base.adapter
    pipes = {spec: mmkv.Pipeline(a, mmkv.Recipe.parse(spec), base.base_attn) for spec, _ in recipes}
    print(f"model: Qwen2-VL with a {args.shape}-shaped decoder ({a.num_layers} layers, {a.num_heads} heads, "
          f"{a.num_kv_heads} KV heads, head dim {a.head_dim}), random init, {a.dtype}, device {a.device}, "
          f"threads={torch.get_num_threads()}, repeats={args.repeats}")
    for length in [int(x) for x in args.lengths.split(",")]:
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(0, a.tokenizer.vocab_size, (length,), generator=g)
        embeds = a.embed(ids.to(a.device))
        positions = torch.arange(length)[None].expand(a.pos_dims, length)
        for spec, _ in recipes:  # warm-up of every recipe at this length (kernel compiles, autotuning, caches)
            with torch.inference_mode():
                prefill_once(pipes[spec], embeds, positions)
        wall = {s: [] for s, _ in recipes}
        cpu = {s: [] for s, _ in recipes}
        rel_wall = {s: [] for s, _ in recipes}
        rel_cpu = {s: [] for s, _ in recipes}
        stats = {}
        for i in range(args.repeats):
            order = recipes if i % 2 == 0 else recipes[::-1]
            got = {}
            for spec, _ in order:
                with torch.inference_mode():
                    w, c, stats[spec] = prefill_once(pipes[spec], embeds, positions)
                got[spec] = (w, c)
                wall[spec].append(w)
                cpu[spec].append(c)
            d = got[recipes[0][0]]
            for spec, _ in recipes:
                rel_wall[spec].append(got[spec][0] / d[0])
                rel_cpu[spec].append(got[spec][1] / d[1])
        print(f"\nprefill of {length} tokens (wall and process CPU time; ratios: median over repeats of the "
              f"ratio to dense in the same repeat)")
        print("| recipe | wall s | wall vs dense | CPU s | CPU vs dense | speedup (CPU) | kept ratio (sparse layers) "
              "| attn FLOPs saved |")
        print("|---|---|---|---|---|---|---|---|")
        for spec, label in recipes:
            s = stats[spec]
            rc = statistics.median(rel_cpu[spec])
            kept = f"{100 * s['zipvl_ratio_mean']:.1f}%" if "zipvl_ratio_mean" in s else "100%"
            saved = f"{100 * s['zipvl_attn_flops_saved']:.1f}%" if "zipvl_attn_flops_saved" in s else "0%"
            print(f"| `{spec}` ({label}) | {statistics.median(wall[spec]):.2f} | {statistics.median(rel_wall[spec]):.3f} "
                  f"| {statistics.median(cpu[spec]):.2f} | {rc:.3f} | {1 / rc:.2f}x | {kept} | {saved} |")
        if not args.skip_layer:
            lt = layer_attention(length, (0.5, 0.3, 0.1), max(3, args.repeats), a.num_heads, a.num_kv_heads,
                                 a.head_dim, str(a.device), a.dtype)
            print(f"\none layer's attention at {length} tokens ({a.num_heads} heads, {a.num_kv_heads} KV heads, "
                  f"head dim {a.head_dim}), median of {max(3, args.repeats)}")
            print("| part | wall ms | CPU ms | CPU vs dense | wall vs SDPA on the same subset |")
            print("|---|---|---|---|---|")
            for n, (w, c) in lt.items():
                sub = lt.get(f"SDPA on the {n.split()[-1]} subset") if n.startswith("sparse ") else None
                vs_sub = f"{w / sub[0]:.2f}" if sub else ""
                print(f"| {n} | {1000 * w:.1f} | {1000 * c:.1f} | {c / lt['dense'][1]:.3f} | {vs_sub} |")


if __name__ == "__main__":
    main()
