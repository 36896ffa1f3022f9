"""`mmkv demo`: serve the Gradio demo (see docs/demo.md).

    mmkv demo                                   # http://127.0.0.1:7860, the bundled tiny model
    mmkv demo --model Qwen/Qwen2.5-VL-7B-Instruct --recipe kivi:2 --max-upload 50gb --port 8000
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--model", action="append", dest="models", default=None, metavar="MODEL",
                   help="a model users may choose (repeat for several; the first is the default). "
                        "Default: mmkv-tiny")
    p.add_argument("--allow-custom-model", action="store_true",
                   help="let users type any HF model id or local folder into the model box")
    p.add_argument("--recipe", default="none", help="default recipe (preset or recipe string)")
    p.add_argument("--max-upload", default="20gb", help="largest upload, e.g. 500mb, 20gb; 'none' for no limit")
    p.add_argument("--max-duration", type=float, default=4 * 3600.0,
                   help="longest video in seconds (default 14400 = 4 h; 0 for no limit)")
    p.add_argument("--max-frames", type=int, default=512, help="most frames a user may sample")
    p.add_argument("--frames", type=int, default=256, help="default number of sampled frames (with --fps: the cap)")
    p.add_argument("--fps", type=float, default=2.0,
                   help="default frames per second sampled (2, as Qwen2-VL; 0: --frames uniformly over the video)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer a user may ask for")
    p.add_argument("--concurrency", type=int, default=1, help="model calls at once (1 per GPU); others queue")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting at most")
    p.add_argument("--max-encodings", type=int, default=4,
                   help="encoded videos kept in memory across all users (least recently used dropped)")
    p.add_argument("--upload-dir", default=None,
                   help="folder for uploads (default: a fresh temporary folder, deleted on exit)")
    p.add_argument("--upload-ttl", type=float, default=3 * 3600.0, help="delete uploads older than this (s)")
    p.add_argument("--unclaimed-ttl", type=float, default=600.0,
                   help="delete uploads no session uses (e.g. posted straight to the upload endpoint) after this (s)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--attn", default="sdpa", dest="attn_implementation",
                   help="base attention implementation: sdpa, eager or flash_attention_2")


def config_from_args(args):
    from mmkv.demo.config import DemoConfig

    return DemoConfig(models=args.models or ["mmkv-tiny"], allow_custom_model=args.allow_custom_model,
                      recipe=args.recipe, max_upload=args.max_upload,
                      max_duration=args.max_duration if args.max_duration and args.max_duration > 0 else None,
                      max_frames=args.max_frames, frames=args.frames, fps=args.fps, max_new_tokens=args.max_new_tokens,
                      concurrency=args.concurrency, queue_size=args.queue_size, max_encodings=args.max_encodings,
                      upload_dir=args.upload_dir, upload_ttl=args.upload_ttl,
                      unclaimed_ttl=args.unclaimed_ttl, device=args.device, dtype=args.dtype,
                      attn_implementation=args.attn_implementation)


def run(args) -> int:
    from mmkv.recipe import Recipe

    config = config_from_args(args)   # bad settings fail here, before anything starts
    Recipe.parse(config.recipe)
    try:
        import gradio  # noqa: F401
    except ImportError:
        from mmkv.errors import MmkvError

        raise MmkvError("the demo needs gradio: pip install 'mmkv[demo]'") from None
    from mmkv.demo.app import launch

    launch(config, host=args.host, port=args.port, share=args.share, block=True)
    return 0


def add_parser(sub, name: str, helptext: str) -> None:
    p = sub.add_parser(name, help=helptext, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python apps/demo.py [options]`: the same as `mmkv demo [options]`."""
    from mmkv.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])
