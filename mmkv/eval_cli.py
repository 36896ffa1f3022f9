"""`mmkv eval ...`: batch evaluation (Video-MME, MVBench, synthetic needles), merge and compare.

    mmkv eval videomme DATA --model M --recipe R --out runs/x [--subtitles] [--frames 32] [--limit N]
    mmkv eval mvbench DATA --model M --recipe R --out runs/y [--tasks action_sequence,...]
    mmkv eval synthetic --n 20 --num-frames 64 --out runs/z     (writes the needle set, then Video-MME)
    mmkv eval merge runs/x                                    (merge shards, write summary.json)
    mmkv eval compare runs/base runs/kivi2                    (two runs side by side)

Data parallel: `accelerate launch --num_processes 8 -m mmkv.cli eval videomme ...` (each process
takes a shard; rank 0 merges). See docs/eval.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _common(p: argparse.ArgumentParser, default_frames: int = 32) -> None:
    p.add_argument("--model", default="mmkv-tiny", help="HF model id, local folder, or mmkv-tiny")
    p.add_argument("--recipe", default="none", help="preset or recipe string (see `mmkv info`)")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a run with the same settings)")
    p.add_argument("--frames", type=int, default=default_frames,
                   help=f"frames sampled uniformly per video (default {default_frames}, lmms-eval's max_num_frames)")
    p.add_argument("--fps", type=float, default=None, help="sample this many frames per second instead of --frames")
    p.add_argument("--max-frames", type=int, default=None, help="cap on frames with --fps")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation length (lmms-eval: 16, greedy)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--attn", default="sdpa", dest="attn_implementation", help="sdpa, eager or flash_attention_2")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    p.add_argument("--retry-errors", action="store_true", help="on resume, also redo samples that failed on bad data")
    p.add_argument("--merge-timeout", type=float, default=24 * 3600,
                   help="seconds rank 0 waits for the other ranks before merging (default 24 h)")
    p.add_argument("--video-dir", default=None, help="folder holding the videos (default: found from DATA)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _videomme_args(p: argparse.ArgumentParser) -> None:
    from mmkv.evaluation.answers import CONVENTIONS, DEFAULT_CONVENTION

    p.add_argument("--subtitles", action="store_true", help="lmms-eval's videomme_w_subtitle prompt (needs .srt files)")
    p.add_argument("--subtitle-dir", default=None, help="folder of <videoID>.srt (default: DATA/subtitle)")
    p.add_argument("--subtitle-frames", type=int, default=None,
                   help="frames whose subtitles are kept (default: --frames; lmms-eval's frame_num, 32)")
    p.add_argument("--convention", default=DEFAULT_CONVENTION, choices=CONVENTIONS,
                   help="lmms-eval answer extraction: 0.7.2 (since 2026-04-11, default) or legacy (<= v0.7.1)")
    p.add_argument("--post-prompt", default=None, help="override lmms-eval's default post prompt (no-subtitle task)")
    p.add_argument("--duration", default=None,
                   help="only these durations, e.g. long or short,medium (lmms-eval's videomme_long is "
                        "--duration long --subtitles: its prompt has the subtitles of 32 frames)")


def _finish(summary, args) -> int:
    from mmkv.evaluation.metrics import format_table

    if summary is None:  # not rank 0
        return 0
    print(json.dumps(summary, indent=1, default=str) if args.json else format_table(summary))
    print(f"\nwrote {os.path.join(args.out, 'samples.jsonl')} and {os.path.join(args.out, 'summary.json')}",
          file=sys.stderr)
    return 0


def _run(task, args) -> int:
    from mmkv.evaluation.runner import run

    summary = run(task, args.out, model=args.model, recipe=args.recipe, frames=args.frames, fps=args.fps,
                  max_frames=args.max_frames, max_new_tokens=args.max_new_tokens, device=args.device,
                  dtype=args.dtype, attn_implementation=args.attn_implementation, limit=args.limit,
                  overwrite=args.overwrite, retry_errors=args.retry_errors, merge_timeout=args.merge_timeout,
                  progress=not args.quiet)
    return _finish(summary, args)


def _videomme(args) -> int:
    from mmkv.evaluation.prompts import VIDEOMME_POST_PROMPT
    from mmkv.evaluation.videomme import VideoMME

    task = VideoMME(args.data, video_dir=args.video_dir, subtitles=args.subtitles, subtitle_dir=args.subtitle_dir,
                    subtitle_frames=args.subtitle_frames, convention=args.convention,
                    post_prompt=VIDEOMME_POST_PROMPT if args.post_prompt is None else args.post_prompt,
                    durations=args.duration.split(",") if args.duration else None)
    return _run(task, args)


def _mvbench(args) -> int:
    from mmkv.evaluation.mvbench import MVBench

    task = MVBench(args.data, tasks=args.tasks.split(",") if args.tasks else None, video_dir=args.video_dir)
    return _run(task, args)


def _synthetic(args) -> int:
    from mmkv.evaluation.videomme import VideoMME
    from mmkv.models.loading import CACHE_DIR
    from mmkv.synthetic import write_dataset

    data = args.data_dir or os.path.join(CACHE_DIR, f"needle_eval_{args.num_frames}_{args.seed}_{args.n}")
    if not os.path.exists(os.path.join(data, "videomme.json")):
        write_dataset(data, args.n, args.num_frames, args.seed)
    task = VideoMME(data, convention=args.convention)
    return _run(task, args)


def _merge(args) -> int:
    from mmkv.evaluation.runner import finalize

    args.out = args.dir
    return _finish(finalize(args.dir, wait=args.wait), args)


def _compare(args) -> int:
    from mmkv.evaluation.compare import compare

    print(compare(args.a, args.b))
    return 0


def add_parser(sub, name: str, helptext: str) -> None:
    from mmkv.evaluation.answers import CONVENTIONS, DEFAULT_CONVENTION

    p = sub.add_parser(name, help=helptext, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = p.add_subparsers(dest="eval_command", required=True)

    v = esub.add_parser("videomme", help="Video-MME (lmms-eval's videomme / videomme_w_subtitle)")
    v.add_argument("data", help="folder, row file (json/jsonl/csv/parquet) or HF id lmms-eval/Video-MME")
    _common(v)
    _videomme_args(v)
    v.set_defaults(func=_videomme)

    m = esub.add_parser("mvbench", help="MVBench (lmms-eval's 20 mvbench_<task> tasks)")
    m.add_argument("data", help="folder with json/<task>.json and the video folders, or HF id OpenGVLab/MVBench")
    _common(m, default_frames=32)
    m.add_argument("--tasks", default=None, help="comma-separated subset of the 20 tasks")
    m.set_defaults(func=_mvbench)

    s = esub.add_parser("synthetic", help="synthetic needle videos (mmkv.synthetic) through the Video-MME runner")
    _common(s)
    s.add_argument("--n", type=int, default=20, help="number of videos (one question each)")
    s.add_argument("--num-frames", type=int, default=64, help="frames per synthetic video")
    s.add_argument("--seed", type=int, default=1_000_000, help="first seed (held-out seeds by default)")
    s.add_argument("--data-dir", default=None, help="where the videos are written (default: the mmkv cache)")
    s.add_argument("--convention", default=DEFAULT_CONVENTION, choices=CONVENTIONS)
    s.set_defaults(func=_synthetic)

    g = esub.add_parser("merge", help="merge the shard files of a run and write summary.json")
    g.add_argument("dir")
    g.add_argument("--wait", type=float, default=0, help="seconds to wait for missing samples")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_merge)

    c = esub.add_parser("compare", help="two runs side by side")
    c.add_argument("a", help="output folder of run A (e.g. the baseline)")
    c.add_argument("b", help="output folder of run B")
    c.set_defaults(func=_compare)


def main(argv: list[str] | None = None) -> int:
    """`mmkv eval` as a standalone program (used by eval/videomme.py and eval/mvbench.py)."""
    from mmkv.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
