"""Decode attention over a quantized layer, side by side with dense SDPA over the same tokens.

For each context length, one decoder layer's cache (B=1, Hk KV heads, head dim D, T tokens) is
filled with random keys/values, compressed by a press (KIVI 2-bit, VidKV), and one decode step's
attention (one query token per head) is timed through:

  dense     torch SDPA over the uncompressed K/V in the model dtype (enable_gqa, no copy)
  layer     KVLayer.attend: what the model runs (segment + fp16 residual window, lse merge);
            on CUDA the segment goes through the Triton kernel, elsewhere the PyTorch path
  kernel    the Triton kernel alone on the packed segment (CUDA only)
  torch     the PyTorch path alone on the packed segment (block-wise dequantization)

and prints times (median of --repeats after warm-up), the ratio to dense, the bytes the kernel
must read (codes + scales of the segment, as stored) and the bandwidth that implies.

    python benchmarks/quant_decode.py                                   # GPU, 7B-VLM layer shape, 8K/32K/128K
    python benchmarks/quant_decode.py --device cpu --dtype fp32 --contexts 8192,32768 \\
        --heads 14 --kv-heads 2 --head-dim 64                          # CPU, Qwen2-0.5B layer shape
    python benchmarks/quant_decode.py --peak-gbps 3350                  # also print % of the card's bandwidth
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESIDUAL = 128


def timeit(fn, repeats: int, device, stat: str = "median") -> float:
    """Median (or min) seconds of fn() over `repeats` runs, after 3 warm-up runs. stat="cpu" times
    the process's CPU time instead of the wall clock (CPU only; meaningful with one thread)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            clock = time.process_time if stat == "cpu" else time.perf_counter
            t0 = clock()
            fn()
            times.append(clock() - t0)
    return min(times) if stat == "min" else statistics.median(times)  # "cpu": median of CPU time


def build(press_spec: str, hk: int, t: int, d: int, dtype, device, seed: int = 0):
    from mmkv.cache import CompressedCache
    from mmkv.recipe import Recipe

    g = torch.Generator(device="cpu").manual_seed(seed)
    k = (torch.randn(1, hk, t + RESIDUAL, d, generator=g) * torch.linspace(0.5, 2, d)).to(device, dtype)
    v = torch.randn(1, hk, t + RESIDUAL, d, generator=g).to(device, dtype)
    cache = CompressedCache(1)
    cache.set_fused(True)
    cache.update(k, v, 0)
    press = Recipe.parse(press_spec).kv[0]
    press.compress(cache, None)
    return cache.layers[0], k, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="model dtype (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--heads", type=int, default=28, help="query heads (Qwen2.5-VL-7B: 28)")
    ap.add_argument("--kv-heads", type=int, default=4, help="KV heads (Qwen2.5-VL-7B: 4)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--presses", default="kivi:2;vidkv:stp=0,stats=16;vidkv:stp=0;vidkv:stp=0,value_bits=2",
                    help="';'-separated KV press specs")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stat", default="median", choices=["median", "min", "cpu"],
                    help="min: min wall time; cpu: median process CPU time (use with --threads 1 on a shared CPU)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="the card's memory bandwidth, for a %% column")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    from mmkv.kernels import quant_decode as qd

    hq, hk, d = args.heads, args.kv_heads, args.head_dim
    scaling = d ** -0.5
    on_gpu = device.type == "cuda" and qd.triton is not None
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"dtype {dtype}, Hq={hq}, Hk={hk}, D={d}, residual window {RESIDUAL}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    hdr = "| press | context | dense SDPA ms | layer ms | layer / dense |" \
        + (" kernel ms | kernel GB/s |" if on_gpu else "") \
        + " torch path ms | torch / dense | segment MB | bits/elem |"
    if on_gpu and args.peak_gbps:
        hdr += " % of peak |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for t in [int(x) for x in args.contexts.split(",")]:
        for spec in args.presses.split(";"):
            layer, k, v = build(spec, hk, t, d, dtype, device)
            seg = layer.segments[0]
            q = torch.randn(1, hq, 1, d, device=device, dtype=dtype)
            dense = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, scale=scaling, enable_gqa=True), args.repeats, device, args.stat)
            lay = timeit(lambda: layer.attend(q, scaling), args.repeats, device, args.stat)
            if hasattr(seg.keys, "transform_query"):
                planes, qt_fn = seg.keys.planes(), seg.keys.transform_query
            else:
                planes, qt_fn = [seg.keys], (lambda x: x)
            tp = timeit(lambda: qd.quant_attention_torch(qt_fn(q), planes, seg.values, scaling), args.repeats, device,
                        args.stat)
            bits = 8 * seg.nbytes / (2 * seg.values.shape[1] * seg.num_tokens * d)
            row = f"| `{spec}` | {t} | {dense * 1e3:.3f} | {lay * 1e3:.3f} | {lay / dense:.2f} |"
            if on_gpu:
                kt = timeit(lambda: qd.quant_attention_triton(qt_fn(q), planes, seg.values, scaling, dtype=dtype),
                            args.repeats, device, args.stat)
                gbps = seg.nbytes / kt / 1e9
                row += f" {kt * 1e3:.3f} | {gbps:.0f} |"
            row += f" {tp * 1e3:.3f} | {tp / dense:.2f} | {seg.nbytes / 2**20:.1f} | {bits:.3f} |"
            if on_gpu and args.peak_gbps:
                row += f" {100 * gbps / args.peak_gbps:.0f}% |"
            print(row, flush=True)
            del layer, k, v


if __name__ == "__main__":
    main()
