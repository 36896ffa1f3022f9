"""The `mmkv` command line.

    mmkv generate [VIDEO] [QUESTION] [--model M] [--recipe R] [--frames N | --fps F] [--json]
    mmkv info
    mmkv bench ...     benchmarks (see `mmkv bench -h`)
    mmkv eval ...      batch evaluation (see `mmkv eval -h`)
    mmkv demo          the Gradio app

Errors print one line and exit non-zero (2 for bad input, 1 otherwise); --debug shows tracebacks.
stdout holds the answer (and the stats); warnings go to stderr, one `mmkv: warning:` line each.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

SAMPLE_VIDEO = os.path.join(os.path.dirname(__file__), "assets", "sample.mp4")
SAMPLE_QUESTION_FILE = os.path.join(os.path.dirname(__file__), "assets", "sample.json")


def _sample() -> dict:
    try:
        with open(SAMPLE_QUESTION_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"question": "What happens in this video?"}


def _max_memory(text: str | None) -> dict | None:
    """"0=20GiB,cpu=64GiB" -> {0: "20GiB", "cpu": "64GiB"} (accelerate's max_memory)."""
    if text is None:
        return None
    from mmkv.errors import InputError

    out: dict = {}
    for item in text.split(","):
        dev, sep, size = item.strip().partition("=")
        if not sep or not dev or not size:
            raise InputError(f"--max-memory {text!r}: use DEVICE=SIZE,..., e.g. 0=20GiB,cpu=64GiB")
        out[int(dev) if dev.isdigit() else dev] = int(size) if size.isdigit() else size
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mmkv-tiny", help="HF model id, local folder, or mmkv-tiny (bundled default)")
    p.add_argument("--recipe", default="none", help="preset or recipe string, e.g. 'kivi:2' (see `mmkv info`)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--device-map", default=None, help="auto (or balanced, balanced_low_0, sequential): split a "
                   "model too big for one device over the GPUs, the CPU and the disk (accelerate)")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: folder for weights offloaded to disk")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--attn", default="sdpa", dest="attn_implementation",
                   help="base attention implementation: sdpa, eager or flash_attention_2")


def _escape(text: str) -> str:
    """Text safe for a terminal: control characters (NUL, ESC, CR, ...), U+FFFD (bytes that were
    not UTF-8) and unassigned or private code points are written as escapes (\\x00, \\ufffd);
    newlines and tabs stay."""
    import unicodedata

    out = []
    for ch in text:
        if ch in "\n\t" or (ch != "\ufffd" and unicodedata.category(ch) not in ("Cc", "Cs", "Co", "Cn")):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _generate(args) -> int:
    import mmkv
    from mmkv.api import check_request
    from mmkv.io import load_media
    from mmkv.models.devices import check_placement

    video = args.video or SAMPLE_VIDEO
    sample = _sample() if not args.video else {}
    question = args.question or sample.get("question")
    if args.frames is None and args.fps is None and sample.get("frames"):
        args.frames = sample["frames"]  # the sample is short: use all its frames
    if not question:
        raise mmkv.InputError("give a QUESTION after the VIDEO")
    # everything that can be checked is checked before the model loads
    recipe = mmkv.Recipe.parse(args.recipe)
    mmkv.Pipeline.check_options(chunk_frames=args.chunk_frames)
    placement = dict(device_map=args.device_map, max_memory=_max_memory(args.max_memory),
                     offload_folder=args.offload_folder)
    check_placement(args.device, **placement)
    media = load_media(video, frames=args.frames, fps=args.fps, max_frames=args.max_frames)
    check_request(media, question, model=args.model, recipe=recipe, max_new_tokens=args.max_new_tokens)
    pipe = mmkv.load(args.model, recipe, device=args.device, dtype=args.dtype,
                     attn_implementation=args.attn_implementation, chunk_frames=args.chunk_frames, **placement)
    streamed, header = [], []

    def start_answer():  # "Q: .. A:" once the answer starts: what the run printed on stderr comes first
        if not header and not args.json:
            header.append(True)
            print(f"Q: {_escape(question)}\nA: ", end="", flush=True)

    def on_text(delta):
        streamed.append(delta)
        if not args.json:
            start_answer()
            print(_escape(delta), end="", flush=True)

    show = not args.no_progress and not args.json and sys.stderr.isatty()
    result = pipe.generate(media, question, max_new_tokens=args.max_new_tokens, progress=show, on_text=on_text)
    if args.json:
        print(result.to_json())
        return 0
    start_answer()
    done = "".join(streamed).strip()
    if result.text.startswith(done):  # text the stream held back (an incomplete character at the end)
        print(_escape(result.text[len(done):]), end="")
    print("\n")
    print(result.stats.table())
    if result.note:
        print("\n" + result.note)
    return 0


def _info(args) -> int:
    import torch
    import transformers

    import mmkv
    from mmkv.models import supported_model_types
    from mmkv.recipe import PRESET_DOCS, PRESETS, available, stage_help, stage_info

    if args.json:
        if args.name:
            raise mmkv.InputError("--json lists every stage; leave out NAME")
        print(json.dumps(stage_info(), indent=1))
        return 0
    if getattr(args, "name", None):
        print(stage_help(args.name))
        return 0
    print(f"mmkv {mmkv.__version__}  (torch {torch.__version__}, transformers {transformers.__version__}, "
          f"cuda: {torch.cuda.is_available()})")
    print("\nSupported model families (config model_type):")
    for mt in supported_model_types():
        print(f"  {mt}")
    print("\nPresets:")
    for name in sorted(PRESETS):
        print(f"  {name:<12} {PRESETS[name] or '(no stages)':<40} {PRESET_DOCS.get(name, '')}")
    print("\nStages (recipe string: name, name:VALUE or name:key=value,...; join with '+'; "
          "`mmkv info NAME` lists a stage's parameters):")
    for kind, items in available().items():
        for name, doc in items:
            print(f"  [{kind:<7}] {name:<12} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkv", description="Question answering over long videos with compressed "
                                "visual tokens and KV cache.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a question about a video or image")
    g.add_argument("video", nargs="?", help="video file, image file (default: the bundled sample video)")
    g.add_argument("question", nargs="?", help="the question (default: the sample's question)")
    _add_model_args(g)
    g.add_argument("--frames", type=int, default=None, help="number of frames sampled uniformly (default 32)")
    g.add_argument("--fps", type=float, default=None, help="sample this many frames per second instead")
    g.add_argument("--max-frames", type=int, default=None, help="cap on the number of sampled frames")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chunk-frames", type=int, default=32, help="frames encoded at a time (bounds memory)")
    g.add_argument("--json", action="store_true", help="print the result (text + stats) as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.set_defaults(func=_generate)

    i = sub.add_parser("info", help="supported models, presets and stages; `mmkv info NAME`: one stage's "
                       "parameters and defaults, or a preset's stages")
    i.add_argument("name", nargs="?", help="a stage (e.g. vidkv) or a preset (e.g. balanced)")
    i.add_argument("--json", action="store_true", help="every stage as JSON: name, kind, main, params "
                   "(with defaults), needs_question, doc")
    i.set_defaults(func=_info)

    for name, module, helptext in (("bench", "benchmarks_cli", "run benchmarks"),
                                   ("eval", "eval_cli", "batch evaluation (Video-MME, MVBench, synthetic)"),
                                   ("demo", "demo_cli", "launch the Gradio demo")):
        try:
            mod = __import__(f"mmkv.{module}", fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub, name, helptext)
    return p


@contextlib.contextmanager
def _terminal(debug: bool):
    """stdout holds the answer only: mmkv's warnings print as one `mmkv: warning:` line on stderr;
    library warnings (transformers' deprecations, ...) are silenced unless --debug."""
    from mmkv.errors import MmkvWarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        if issubclass(category, MmkvWarning):
            print(f"mmkv: warning: {text}", file=sys.stderr)
        else:
            print(f"mmkv: warning: {category.__name__}: {text} ({filename}:{lineno})", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        if debug:
            yield
            return
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", MmkvWarning)
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    from mmkv.errors import MmkvError

    try:
        with _terminal(debug):
            return int(args.func(args) or 0)
    except MmkvError as e:
        if debug:
            raise
        print(f"mmkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmkv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"mmkv: error: {type(e).__name__}: {msg} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
