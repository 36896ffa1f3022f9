"""Decode attention over a quantized layer, side by side with dense SDPA over the same tokens.

For each batch size, context length and press, one decoder layer's cache (B sequences, Hk KV
heads, head dim D, T tokens) is filled with random keys/values on the device, compressed by the
press (KIVI 2-bit, VidKV), and one decode step's attention (one query token per head) is timed:

  dense SDPA  torch SDPA over the uncompressed K/V in the model dtype (K/V repeated to the query
              heads beforehand, untimed, so that SDPA runs its fused kernel, not the GQA math path)
  kernel      the Triton launches alone (split kernel + reduction) on the packed segment, the
              query already in stored-key coordinates: on CUDA replayed from a CUDA graph between
              two CUDA events, so no host work is in it (dense SDPA is timed the same way)
  layer       KVLayer.attend, what the model runs: VidKV's query transform, the launches, the
              fp16 residual window and the lse merge, with all their host work, eager: the library
              does not capture decode steps in CUDA graphs (the cache's segment list and its
              decode-time flushes are Python state that changes between steps)
  torch path  the PyTorch path alone on the packed segment (block-wise dequantization)

Before every timed repeat, on CUDA, a 256 MB buffer is written (an L2 flush: H100/H200 have
50-60 MB of L2), so each repeat reads the segment from HBM. Times are medians of --repeats.
"kernel bytes" is everything the launches move: the segment as stored (codes, statistics,
anchors), the query, and the split partials written by the first kernel and read back by the
reduction (with their log-sum-exps), plus the output; GB/s is those bytes over the kernel time.

    python benchmarks/quant_decode.py                                    # GPU: 7B-VLM layer, bf16, B = 1 and 8
    python benchmarks/quant_decode.py --device cpu --dtype fp32 --contexts 8192,32768 --batches 1 \\
        --heads 14 --kv-heads 2 --head-dim 64                           # CPU, Qwen2-0.5B layer shape
    python benchmarks/quant_decode.py --peak-gbps 4800                   # also print % of the card's bandwidth
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESIDUAL = 128
FLUSH_BYTES = 256 * 2**20


class Timer:
    """Median seconds of fn() over `repeats` runs after warm-up. On CUDA: CUDA events around the
    call, an L2 flush before each repeat; `graph=True` captures fn in a CUDA graph first and times
    the replay (device time of the launches alone). On CPU: wall clock, or process CPU time."""

    def __init__(self, device, repeats: int, stat: str = "median"):
        self.device, self.repeats, self.stat = device, repeats, stat
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn, graph: bool = False) -> float:
        for _ in range(3):
            fn()
        if self.device.type != "cuda":
            clock = time.process_time if self.stat == "cpu" else time.perf_counter
            times = []
            for _ in range(self.repeats):
                t0 = clock()
                fn()
                times.append(clock() - t0)
            return min(times) if self.stat == "min" else statistics.median(times)
        run = fn
        if graph:
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
            run()
        times = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times) if self.stat == "min" else statistics.median(times)


def build(press_spec: str, b: int, hk: int, t: int, d: int, dtype, device, seed: int = 0):
    from mmkv.cache import CompressedCache
    from mmkv.recipe import Recipe

    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(b, hk, t + RESIDUAL, d, generator=g, device=device, dtype=torch.float32)
    k = (k * torch.linspace(0.5, 2, d, device=device)).to(dtype)
    v = torch.randn(b, hk, t + RESIDUAL, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    cache = CompressedCache(1)
    cache.set_fused(True)
    cache.update(k, v, 0)
    press = Recipe.parse(press_spec).kv[0]
    press.compress(cache, None)
    return cache.layers[0], k, v


def kernel_bytes(seg, qt, out, launches) -> int:
    """Bytes the launches read and write: segment, query, partials (written, then read), output."""
    main, reduce = launches
    op, lp = main[2][1], main[2][2]
    return seg.nbytes + qt.numel() * 4 + 2 * (op.nbytes + lp.nbytes) + out[0].nbytes + out[1].nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="model dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--heads", type=int, default=28, help="query heads (Qwen2.5-VL-7B: 28)")
    ap.add_argument("--kv-heads", type=int, default=4, help="KV heads (Qwen2.5-VL-7B: 4)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--presses", default="kivi:2;vidkv:stp=0,stats=16;vidkv:stp=0;vidkv:stp=0,value_bits=2",
                    help="';'-separated KV press specs")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stat", default="median", choices=["median", "min", "cpu"],
                    help="min: min time; cpu: median process CPU time (CPU only; use with --threads 1)")
    ap.add_argument("--splits-per-sm", default="2",
                    help="comma-separated: token splits (programs) per SM for the kernel column; each value adds a row")
    ap.add_argument("--peak-gbps", type=float, default=None, help="the card's memory bandwidth, for a %% column")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from mmkv.kernels import quant_decode as qd

    hq, hk, d = args.heads, args.kv_heads, args.head_dim
    scaling = d ** -0.5
    on_gpu = device.type == "cuda" and qd.triton is not None
    timer = Timer(device, args.repeats, args.stat)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"dtype {dtype}, Hq={hq}, Hk={hk}, D={d}, residual window {RESIDUAL}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.repeats} repeats"
          + (", L2 flushed before each repeat, kernel and dense SDPA replayed from CUDA graphs" if on_gpu else ""))
    hdr = "| press | batch | context | dense SDPA ms | layer ms | layer / dense |" \
        + (" splits/SM | splits | kernel ms | kernel / dense | kernel MB | kernel GB/s |" if on_gpu else "") \
        + " torch path ms | segment MB | bits/elem |"
    if on_gpu and args.peak_gbps:
        hdr += " % of peak |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for b in [int(x) for x in args.batches.split(",")]:
        for t in [int(x) for x in args.contexts.split(",")]:
            for spec in args.presses.split(";"):
                layer, k, v = build(spec, b, hk, t, d, dtype, device)
                seg = layer.segments[0]
                q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
                kr, vr = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
                dense = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, scale=scaling),
                              graph=True)
                del kr, vr
                lay = timer(lambda: layer.attend(q, scaling))
                if hasattr(seg.keys, "transform_query"):
                    planes, qt = seg.keys.planes(), seg.keys.transform_query(q)
                else:
                    planes, qt = [seg.keys], q
                tp = timer(lambda: qd.quant_attention_torch(qt, planes, seg.values, scaling))
                bits = 8 * seg.nbytes / (2 * b * seg.values.shape[1] * seg.num_tokens * d)
                head = f"| `{spec}` | {b} | {t} | {dense * 1e3:.3f} | {lay * 1e3:.3f} | {lay / dense:.2f} |"
                tail = f" {tp * 1e3:.3f} | {seg.nbytes / 2**20:.1f} | {bits:.3f} |"
                if not on_gpu:
                    print(head + tail, flush=True)
                for per_sm in ([int(x) for x in args.splits_per_sm.split(",")] if on_gpu else []):
                    out, lse, launches = qd.quant_attention_launches(qt, planes, seg.values, scaling, dtype=dtype,
                                                                     splits_per_sm=per_sm)

                    def run(launches=launches):
                        for kernel, grid, a, kw in launches:
                            kernel[grid](*a, **kw)

                    kt = timer(run, graph=True)
                    nbytes = kernel_bytes(seg, qt, (out, lse), launches)
                    gbps = nbytes / kt / 1e9
                    row = head + f" {per_sm} | {launches[0][1][1]} | {kt * 1e3:.3f} | {kt / dense:.2f} | " \
                        f"{nbytes / 2**20:.1f} | {gbps:.0f} |" + tail
                    if args.peak_gbps:
                        row += f" {100 * gbps / args.peak_gbps:.0f}% |"
                    print(row, flush=True)
                del layer, k, v, seg


if __name__ == "__main__":
    main()
