"""The batch runner: encode each video once, ask its questions, append one JSON line per sample.

    out/run.json                the settings (a restart with other settings is refused)
    out/plan.json               every sample key in dataset order (what "complete" means)
    out/samples.rank<R>.jsonl   what rank R answered: append-only, flushed and fsync'd per sample
    out/samples.jsonl           the merged samples, in dataset order (rank 0 writes it at the end)
    out/summary.json            the metrics (metrics.py), also printed as a table

Resume: a restarted run reads every `samples.rank*.jsonl` in the folder and skips samples that
have a record (answered, or failed on bad data); a torn last line from a crash is cut off before
appending. run.json holds the settings and a fingerprint of the data (`fingerprint`): a restart
with other settings or on changed data is refused. Runtime failures (e.g. out of memory) are retried on restart; `retry_errors=True`
retries data failures too.

Data parallel: with `accelerate launch` (or torchrun) each process reads RANK / WORLD_SIZE /
LOCAL_RANK, takes every WORLD_SIZE-th video (all questions of a video stay together, so the
encoding is shared), and uses GPU LOCAL_RANK. No collective communication: rank 0, after its own
shard, waits until every planned sample has a record in the folder (ranks may finish hours
apart), then merges by dataset order, so the result does not depend on which rank ran what.
`mmkv eval merge OUT` merges by hand (e.g. after a rank died and was re-run).

Bad data (missing or unreadable video, malformed row, answer outside the options) becomes a
per-sample error record with a reason; the run goes on.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from ..errors import InputError, MmkvError

IGNORED_CONFIG = ("data", "mmkv_version", "convention_note", "device", "dtype", "dataset_fingerprint",
                  "dataset_samples")
STAT_FIELDS = ("frames", "visual_tokens_in", "visual_tokens_kept", "prompt_tokens", "kv_bytes", "kv_bytes_uncompressed",
               "encode_s", "prefill_s", "decode_s", "new_tokens", "peak_memory_bytes", "peak_memory_kind")


@dataclass
class Sample:
    """One question. `error`/`reason` are set when the data itself is bad (then it is not asked)."""

    key: str
    index: int                      # position in the dataset: the merge order
    cluster: str                    # questions with the same cluster share a video (and an encoding)
    group: dict = field(default_factory=dict)
    video_id: str = ""
    video: str | None = None        # path to a video file or a folder of frames
    question: str = ""
    options: list = field(default_factory=list)
    answer: str = ""                # gold letter
    error: str | None = None
    reason: str | None = None
    extra: dict = field(default_factory=dict)


class Task:
    """A benchmark: its samples, the prompt of a sample, and the score of a response."""

    name = ""
    group_keys: tuple = ()

    def samples(self) -> list[Sample]:
        raise NotImplementedError

    def prompt(self, sample: Sample, media=None, frames: int | None = None) -> str:
        raise NotImplementedError

    def score(self, sample: Sample, response: str) -> dict:  # {"pred": str, "correct": 0 | 1}
        raise NotImplementedError

    def config(self) -> dict:
        return {"task": self.name}


# ----------------------------------------------------------------------------- distribution
def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables `accelerate launch` and torchrun set."""
    def env(*names, default):
        for n in names:
            v = os.environ.get(n)
            if v not in (None, ""):
                return int(v)
        return default

    world = env("WORLD_SIZE", default=1)
    rank = env("RANK", default=0)
    local = env("LOCAL_RANK", default=rank)
    if not 0 <= rank < max(world, 1):
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, max(world, 1), local


def shard(samples: list[Sample], rank: int, world: int) -> list[Sample]:
    """The samples of `rank`: clusters (videos) in order of first appearance, dealt round-robin."""
    order: dict[str, int] = {}
    for s in samples:
        order.setdefault(s.cluster, len(order))
    return [s for s in samples if order[s.cluster] % world == rank]


# ----------------------------------------------------------------------------- records
def shard_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"samples.rank{rank}.jsonl")


def shard_files(out_dir: str) -> list[str]:
    names = [n for n in os.listdir(out_dir) if n.startswith("samples.rank") and n.endswith(".jsonl")] \
        if os.path.isdir(out_dir) else []
    return [os.path.join(out_dir, n) for n in sorted(names, key=lambda n: int(n[len("samples.rank"):-6] or 0))]


def read_records(path: str) -> list[dict]:
    """Complete JSON lines of `path`; a torn last line (no newline: the writer died) is ignored."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    for line in data.split("\n")[:-1]:  # the part after the last newline is incomplete
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _better(new: dict, old: dict | None) -> bool:
    if old is None:
        return True
    if (new.get("status") == "ok") != (old.get("status") == "ok"):
        return new.get("status") == "ok"
    return True  # same status: the later record wins


def collect(out_dir: str) -> dict[str, dict]:
    """The best record per sample key over every shard file (an answer beats an error; else the last)."""
    best: dict[str, dict] = {}
    for path in shard_files(out_dir):
        for rec in read_records(path):
            k = rec.get("key")
            if k is not None and _better(rec, best.get(k)):
                best[k] = rec
    return best


class RecordWriter:
    """Append-only JSONL: each record is one line, flushed and fsync'd before the next sample."""

    def __init__(self, path: str):
        self.path = path
        if os.path.exists(path):  # cut a torn last line, so appends start on a fresh line
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finished(rec: dict | None, retry_errors: bool) -> bool:
    if rec is None:
        return False
    if rec.get("status") == "ok":
        return True
    return rec.get("error_kind") == "data" and not retry_errors


# ----------------------------------------------------------------------------- the run
def _base_record(task: Task, s: Sample, rank: int) -> dict:
    return {"key": s.key, "index": s.index, "task": task.name, "video_id": s.video_id, "group": s.group,
            "answer": s.answer, "rank": rank}


def _error_record(task, s, rank, kind, reason, error) -> dict:
    return {**_base_record(task, s, rank), "status": "error", "error_kind": kind, "reason": reason,
            "error": error, "response": None, "pred": None, "correct": None}


def _stats(stats) -> dict:
    d = {}
    for k in STAT_FIELDS:
        d[k] = getattr(stats, k, None)
    return d


def _span(total: int, fps: float, segment) -> tuple[int, int]:
    """First and last frame index of `segment` ([start, end] seconds; None: the whole video)."""
    if segment is None or not fps > 0:
        return 0, total - 1
    lo = min(max(int(round(float(segment[0]) * fps)), 0), total - 1)
    return lo, min(max(int(round(float(segment[1]) * fps)), lo), total - 1)


def _video_input(path: str, enc_kw: dict | None = None, segment=None, frame_fps: float | None = None):
    """What to encode: a video file's path (the pipeline samples it), or a Media of the frames the
    sampling (`enc_kw`: frames / fps / max_frames) picks from the `segment` [start, end] seconds of
    a file, or from a folder of images (sorted by name; only the sampled ones are read; `frame_fps`
    is the folder's frame rate, 1 by default). Timestamps start at 0 at the segment's start, as in
    a clip cut from it."""
    import dataclasses

    from ..io.video import load_media, sample_indices

    enc_kw = enc_kw or {}
    if os.path.isdir(path):
        import numpy as np
        from PIL import Image

        names = sorted(n for n in os.listdir(path) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        if not names:
            raise InputError(f"{path!r} is a folder with no .jpg/.png frames")
        fps = float(frame_fps or 1.0)
        lo, hi = _span(len(names), fps, segment)
        sel = lo + sample_indices(hi - lo + 1, fps, **enc_kw)
        arr = np.stack([np.asarray(Image.open(os.path.join(path, names[i])).convert("RGB")) for i in sel])
        media = load_media(arr, video_fps=fps)
        return dataclasses.replace(media, timestamps=(sel - lo) / fps, total_frames=hi - lo + 1)
    if segment is None:
        return path
    media = load_media(path, frames=1)
    lo, hi = _span(media.total_frames, media.source_fps, segment)
    idx = lo + sample_indices(hi - lo + 1, media.source_fps, **enc_kw)
    return dataclasses.replace(media, indices=idx, timestamps=(idx - lo) / media.source_fps, total_frames=hi - lo + 1)


def _runtime_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:500]


def _file_id(path) -> list | None:
    """(name, size) of a file, so moving a dataset keeps its fingerprint and editing it does not."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    return [os.path.basename(path), os.path.getsize(path)]


def fingerprint(samples: list[Sample]) -> str:
    """A hash of what the samples ask: keys, questions, options, answers, groups, data errors and
    the name and size of each video and subtitle file (not their folder, so a moved copy of the
    data resumes). A restart whose data hashes differently is refused (check_config)."""
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        item = [s.key, s.index, s.cluster, s.video_id, s.question, s.options, s.answer, s.group, s.reason,
                _file_id(s.video), sorted((k, _file_id(v) if isinstance(v, str) else v) for k, v in s.extra.items())]
        h.update(json.dumps(item, ensure_ascii=False, default=str, sort_keys=True).encode() + b"\n")
    return h.hexdigest()[:16]


def check_config(out_dir: str, config: dict, overwrite: bool) -> None:
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path) and not overwrite:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(config) if k not in IGNORED_CONFIG and old.get(k) != config.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff[:4])
            raise InputError(f"{out_dir} holds a run with other settings ({shown}); use another --out, "
                             "or --overwrite to start it again")
        fp_old, fp_new = old.get("dataset_fingerprint"), config.get("dataset_fingerprint")
        if fp_old is not None and fp_new is not None and fp_old != fp_new:
            raise InputError(
                f"{out_dir} holds a run on other data: the dataset changed since it started (fingerprint "
                f"{fp_old}, {old.get('dataset_samples')} samples -> {fp_new}, {config.get('dataset_samples')} samples: "
                "questions, options, answers or video files differ), so its finished answers may be to other "
                "questions. Use another --out, or --overwrite to start again on the new data")
    _atomic_json(path, config)


def run(task: Task, out_dir: str, *, model: str = "mmkv-tiny", recipe="none", frames: int | None = 32,
        fps: float | None = None, max_frames: int | None = None, max_new_tokens: int = 16, device=None,
        dtype: str = "auto", attn_implementation: str = "sdpa", limit: int | None = None,
        rank: int | None = None, world_size: int | None = None, local_rank: int | None = None,
        overwrite: bool = False, retry_errors: bool = False, merge_timeout: float = 24 * 3600,
        pipe=None, progress: bool = True, log=None) -> dict | None:
    """Evaluate `task` with `model` + `recipe`, writing into `out_dir`. Returns the summary on
    rank 0 (None on other ranks). `pipe` (an mmkv Pipeline) skips loading a model."""
    import mmkv

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if rank is None or world_size is None:
        r, w, lr = dist_info()
        rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
        local_rank = lr if local_rank is None else local_rank
    local_rank = rank if local_rank is None else local_rank
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive integer, got {limit}")
    if pipe is not None and isinstance(getattr(pipe, "recipe", None), mmkv.Recipe):
        recipe = pipe.recipe  # a given pipeline's own recipe is what runs
    recipe_spec = (recipe if isinstance(recipe, mmkv.Recipe) else mmkv.Recipe.parse(recipe)).spec()
    if fps is not None:
        frames = None
    samples = task.samples()
    config = {**task.config(), "model": str(model if pipe is None else pipe.model_name), "recipe": recipe_spec,
              "frames": frames, "fps": fps, "max_frames": max_frames, "max_new_tokens": max_new_tokens,
              "dataset_fingerprint": fingerprint(samples), "dataset_samples": len(samples),
              "mmkv_version": mmkv.__version__}
    os.makedirs(out_dir, exist_ok=True)
    if overwrite and rank == 0:
        for p in shard_files(out_dir) + [os.path.join(out_dir, n) for n in ("samples.jsonl", "summary.json")]:
            if os.path.exists(p):
                os.remove(p)
    check_config(out_dir, config, overwrite)

    if limit is not None:
        samples = samples[:limit]
    _atomic_json(os.path.join(out_dir, "plan.json"),
                 {"task": task.name, "n": len(samples), "keys": [s.key for s in samples]})
    mine = shard(samples, rank, world_size)
    done = collect(out_dir)
    todo = [s for s in mine if not _finished(done.get(s.key), retry_errors)]
    log(f"[rank {rank}/{world_size}] {task.name}: {len(samples)} samples, {len(mine)} in this shard, "
        f"{len(mine) - len(todo)} already done, {len(todo)} to run")

    if device is None and world_size > 1:
        import torch
        if torch.cuda.is_available():
            device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    enc_kw = {"frames": frames, "fps": fps, "max_frames": max_frames}
    t0, n_done = time.perf_counter(), 0
    with RecordWriter(shard_path(out_dir, rank)) as writer:
        clusters: dict[str, list[Sample]] = {}
        for s in todo:
            clusters.setdefault(s.cluster, []).append(s)
        for group in clusters.values():
            bad = [s for s in group if s.error]
            for s in bad:
                writer.write(_error_record(task, s, rank, "data", s.reason, s.error))
            good = [s for s in group if not s.error]
            if good:
                if pipe is None:
                    pipe = mmkv.load(model, recipe_spec, device=device, dtype=dtype,
                                     attn_implementation=attn_implementation)
                _run_video(task, pipe, good, writer, rank, enc_kw, max_new_tokens, frames)
            n_done += len(group)
            if progress:
                el = time.perf_counter() - t0
                log(f"[rank {rank}] {n_done}/{len(todo)} samples ({el:.0f} s)")

    if rank != 0:
        return None
    return finalize(out_dir, wait=merge_timeout if world_size > 1 else 0, log=log)


def _run_video(task: Task, pipe, group: list[Sample], writer: RecordWriter, rank: int, enc_kw: dict,
               max_new_tokens: int, frames: int | None) -> None:
    """Encode the group's video once and ask each of its questions."""
    import torch

    first = group[0]
    try:
        enc = pipe.encode(_video_input(first.video, enc_kw, first.extra.get("segment"),
                                       first.extra.get("frame_fps")), **enc_kw)
    except (InputError, MmkvError) as e:
        for s in group:
            writer.write(_error_record(task, s, rank, "data", "unreadable video", str(e)))
        return
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - out of memory and the like: recorded, retried on restart
        _free(torch)
        for s in group:
            writer.write(_error_record(task, s, rank, "runtime", "runtime error", _runtime_error(e)))
        return
    for i, s in enumerate(group):
        try:
            prompt = task.prompt(s, enc.media, frames)
        except (OSError, ValueError) as e:
            writer.write(_error_record(task, s, rank, "data", "bad subtitle file", f"{type(e).__name__}: {e}"))
            continue
        try:
            res = pipe.ask(enc, prompt, max_new_tokens=max_new_tokens, reuse=i < len(group) - 1)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001
            _free(torch)
            writer.write(_error_record(task, s, rank, "runtime", "runtime error", _runtime_error(e)))
            continue
        scored = task.score(s, res.text)
        stats = _stats(res.stats)
        writer.write({**_base_record(task, s, rank), "status": "ok", "error_kind": None, "reason": None,
                      "error": None, "prompt": prompt, "response": res.text, "pred": scored["pred"],
                      "correct": int(scored["correct"]), "shared_encode": i > 0, "stats": stats})
    del enc


def _free(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- merge
def finalize(out_dir: str, *, wait: float = 0, poll: float = 5.0, log=None) -> dict:
    """Wait up to `wait` seconds until every planned sample has a record, then merge the shards
    into samples.jsonl (dataset order) and summary.json. Returns the summary."""
    from . import metrics

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    plan_path = os.path.join(out_dir, "plan.json")
    if not os.path.exists(plan_path):
        raise InputError(f"{out_dir} has no plan.json: it is not an mmkv eval output folder")
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    keys = plan["keys"]
    deadline = time.monotonic() + wait
    while True:
        best = collect(out_dir)
        missing = [k for k in keys if k not in best]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
    if missing:
        log(f"warning: {len(missing)} of {len(keys)} planned samples have no record yet "
            f"(first: {missing[0]}); the summary is marked incomplete")
    wanted = set(keys)
    records = sorted((r for k, r in best.items() if k in wanted), key=lambda r: (r.get("index", 0), r["key"]))
    tmp = os.path.join(out_dir, f"samples.jsonl.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, "samples.jsonl"))
    with open(os.path.join(out_dir, "run.json"), encoding="utf-8") as f:
        config = json.load(f)
    summary = metrics.summarize(records, config, expected=len(keys))
    _atomic_json(os.path.join(out_dir, "summary.json"), summary)
    return summary
