"""Bi-level KV (Video-XL-2) measurements: device memory against video length, prefill time
against dense, and the frames that fit one 80 GB GPU on paper, from the measured bytes.

    python benchmarks/bilevel.py memory   # 512..4096 frames: device-resident bytes, RSS with offload=disk
    python benchmarks/bilevel.py prefill  # 8K and 16K tokens: chunked prefill time / dense
    python benchmarks/bilevel.py paper    # Qwen2.5-VL-7B (bf16) frames on 80 GB, from the measured ratios

Models are random-weight checkpoints built offline (mmkv.models.tiny): the shapes and bytes are
real, the answers are not (the accuracy runs use the trained bundled model: docs/bilevel.md).
`memory` and `prefill` each run one configuration per process (a subprocess per row) so that the
peak RSS of one row is not the high-water mark of the previous one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

MIB = 2 ** 20


def _model(shape: str, layers: int | None, side: int) -> str:
    """A saved random checkpoint (Qwen2-VL family, `shape` decoder, `side` px frames)."""
    from mmkv.models.tiny import build_tiny

    key = f"{shape}_{layers}_{side}"
    path = os.path.join(tempfile.gettempdir(), f"mmkv_bilevel_bench_{key}")
    if not os.path.exists(os.path.join(path, "config.json")):
        over = {"num_hidden_layers": layers} if layers else None
        build_tiny("qwen2_vl", path, shape=shape, text_overrides=over, max_pixels=side * side,
                   min_pixels=side * side)
    return path


def _frames(n: int, side: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def one(args) -> dict:
    """One row, in this process: encode `frames` frames with `recipe`, ask one question."""
    import mmkv
    from mmkv.io import load_media

    torch.set_num_threads(args.threads)
    path = _model(args.shape, args.layers, args.side)
    pipe = mmkv.load(path, recipe=args.recipe, compress_at="encode", prefill_chunk=args.prefill_chunk)
    media = load_media(_frames(args.frames, args.side), video_fps=2.0)
    cpu = [0.0]
    prefill_ = pipe._prefill

    def timed(*a, **kw):  # process CPU time of the prefix prefill (other jobs disturb it far less than wall time)
        c = time.process_time()
        out = prefill_(*a, **kw)
        cpu[0] += time.process_time() - c
        return out

    pipe._prefill = timed
    t0 = time.perf_counter()
    enc = pipe.encode(media)
    pipe._prefill = prefill_
    encode_wall = time.perf_counter() - t0
    enc_device = enc.cache.nbytes()
    res = pipe.ask(enc, "What happens in the video?", max_new_tokens=2)
    s, ex = res.stats, res.stats.extra
    a = pipe.adapter
    per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * a.dtype.itemsize
    return {"recipe": args.recipe, "frames": args.frames, "prompt_tokens": s.prompt_tokens,
            "uncompressed_bytes": per_token * s.prompt_tokens, "bytes_per_token": per_token,
            "encoded_device_bytes": enc_device + ex.get("bilevel_summary_bytes", 0),
            "prefill_peak_device_bytes": ex.get("bilevel_prefill_peak_device_bytes", enc_device),
            "answer_device_bytes": s.kv_bytes + ex.get("bilevel_summary_bytes", 0),
            "offloaded_bytes": ex.get("bilevel_offloaded_bytes", 0), "reloaded_bytes": ex.get("bilevel_reloaded_bytes", 0),
            "reload_s": ex.get("bilevel_reload_s", 0.0), "prefill_s": enc.stats.prefill_s, "prefill_cpu_s": cpu[0],
            "encode_s": encode_wall, "peak_rss": _rss(), "chunks": ex.get("bilevel_chunks", 0)}


def _run_row(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "one", *argv], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rows(args) -> list[dict]:
    """One subprocess per (frames, recipe); each row echoed to stderr as it completes."""
    rows = []
    for frames in args.frame_counts:
        for recipe in args.recipes:
            r = _run_row(["--recipe", recipe, "--frames", str(frames), "--shape", args.shape, "--layers",
                          str(args.layers), "--side", str(args.side), "--threads", str(args.threads)])
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def memory(args) -> None:
    rows = _rows(args)
    print(f"{args.shape}-shaped decoder, {args.layers} layers, {args.side} px frames, fp32, "
          f"{rows[0]['bytes_per_token']} KV bytes per token uncompressed; one run each\n")
    print("| recipe | frames | prompt tokens | uncompressed KV MiB | device KV MiB (peak during the prefill / encoded / "
          "answering) | offloaded MiB | reloaded MiB | peak RSS MiB | prefill s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['recipe']}` | {r['frames']} | {r['prompt_tokens']} | {r['uncompressed_bytes'] / MIB:.1f} | "
              f"{r['prefill_peak_device_bytes'] / MIB:.2f} / {r['encoded_device_bytes'] / MIB:.2f} / "
              f"{r['answer_device_bytes'] / MIB:.2f} | "
              f"{r['offloaded_bytes'] / MIB:.1f} | {r['reloaded_bytes'] / MIB:.2f} | {r['peak_rss'] / MIB:.0f} | "
              f"{r['prefill_s']:.1f} |")


def prefill(args) -> None:
    rows = _rows(args)
    print(f"{args.shape}-shaped decoder ({args.layers} layers: the time ratio is per layer), {args.side} px frames, "
          f"fp32, {args.threads} thread(s); prefill of the video prefix at encode (process CPU time, and wall "
          "time); one run each\n")
    print("| recipe | frames | prompt tokens | chunks | device KV / uncompressed | prefill CPU s | / dense | wall s | / dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    dense = {r["frames"]: r for r in rows if r["recipe"] == "none"}
    for r in rows:
        d = dense.get(r["frames"])
        cr = r["prefill_cpu_s"] / d["prefill_cpu_s"] if d else float("nan")
        wr = r["prefill_s"] / d["prefill_s"] if d else float("nan")
        print(f"| `{r['recipe']}` | {r['frames']} | {r['prompt_tokens']} | {r['chunks']} | "
              f"{r['encoded_device_bytes'] / r['uncompressed_bytes']:.3f} | {r['prefill_cpu_s']:.1f} | {cr:.2f} | "
              f"{r['prefill_s']:.1f} | {wr:.2f} |")


def paper(args) -> None:
    """Frames of Qwen2.5-VL-7B (bf16) on one 80 GB GPU: weights + per-token device bytes."""
    layers, kv_heads, head_dim, hidden, params = 28, 4, 128, 3584, 8.29e9   # public config
    kv = 2 * layers * kv_heads * head_dim * 2                                 # bytes per token, bf16
    free = 80e9 - params * 2 - args.reserve_gb * 1e9
    print(f"Qwen2.5-VL-7B bf16: {kv} KV bytes per token uncompressed, {params * 2 / 1e9:.1f} GB weights, "
          f"{args.reserve_gb:g} GB reserved for activations; device fraction {args.fraction:.4f} of the KV "
          f"(measured), embeddings {hidden * 2} bytes per token if held on the device\n")
    print("| tokens per frame | uncompressed: frames | bilevel (KV only): frames | bilevel + input embeddings on device: frames |")
    print("|---|---|---|---|")
    for tpf in args.tokens_per_frame:
        full = free / (kv * tpf)
        bl = free / (kv * args.fraction * tpf)
        bl_emb = free / ((kv * args.fraction + hidden * 2) * tpf)
        print(f"| {tpf} | {full:,.0f} | {bl:,.0f} | {bl_emb:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("one")
    o.add_argument("--recipe", required=True)
    o.add_argument("--frames", type=int, required=True)
    o.add_argument("--shape", default="0.5b")
    o.add_argument("--layers", type=int, default=0)
    o.add_argument("--side", type=int, default=56)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--prefill-chunk", type=int, default=4096)
    m = sub.add_parser("memory")
    m.add_argument("--frame-counts", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024, 2048, 4096])
    m.add_argument("--recipes", type=lambda s: s.split(";"),
                   default=["bilevel:512,keep=512,offload=disk", "bilevel:512,keep=512,offload=cpu"])
    m.add_argument("--shape", default="0.5b")
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--side", type=int, default=56)
    m.add_argument("--threads", type=int, default=2)
    f = sub.add_parser("prefill")
    f.add_argument("--frame-counts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048])
    f.add_argument("--recipes", type=lambda s: s.split(";"), default=["none", "bilevel", "bilevel:keep=0.25"])
    f.add_argument("--shape", default="0.5b")
    f.add_argument("--layers", type=int, default=4)
    f.add_argument("--side", type=int, default=112)
    f.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("paper")
    q.add_argument("--fraction", type=float, required=True, help="measured device-resident KV / uncompressed")
    q.add_argument("--tokens-per-frame", type=lambda s: [int(x) for x in s.split(",")], default=[36, 64, 128])
    q.add_argument("--reserve-gb", type=float, default=8.0)
    args = p.parse_args()
    if args.cmd == "one":
        print(json.dumps(one(args)))
    else:
        {"memory": memory, "prefill": prefill, "paper": paper}[args.cmd](args)


if __name__ == "__main__":
    main()
