"""The demo's state, without Gradio: loaded models, encodings, streamed answers.

`Demo` holds what the web app needs between requests; every handler of the Gradio app calls one
of its methods, so they can be tested without a browser:

    demo = Demo(DemoConfig())
    info = check_upload("clip.mp4", demo.config)              # InputError on a bad upload
    eid, enc = demo.encode("clip.mp4", "mmkv-tiny", "none", frames=32)   # once per video
    enc, pipe = demo.encoding(eid)                             # ... then for every question:
    for kind, value in demo.ask_stream(enc, pipe, "What happens?"):
        ...                                                    # ("text", delta) ... ("result", Result)

Encoded videos are kept in a bounded store (`max_encodings`, least recently used first out), so
that many open browser tabs cannot hold many video KV caches on the GPU.
"""
from __future__ import annotations

import contextvars
import os
import queue
import threading
import uuid
from collections import OrderedDict
from typing import Callable, Iterator

from ..errors import InputError
from .config import SAMPLE_META, DemoConfig
from .uploads import check_upload, user_message


# ----------------------------------------------------------------------------- recipes
def recipe_choices() -> list[str]:
    """Every named preset, found when called (methods register theirs on import): 'none' first."""
    from ..recipe import PRESETS, _ensure_registered

    _ensure_registered()
    return ["none"] + sorted(n for n in PRESETS if n != "none")


def stage_rows() -> list[tuple[str, str, str]]:
    """(kind, name, one-line description) of every registered stage."""
    from ..recipe import available

    return [(kind, name, doc) for kind, items in available().items() for name, doc in items]


def preset_rows() -> list[tuple[str, str, str]]:
    """(name, recipe string, description) of every preset."""
    from ..recipe import PRESET_DOCS, PRESETS

    return [(n, PRESETS[n] or "(no stages)", PRESET_DOCS.get(n, "")) for n in recipe_choices()]


def sample_question() -> str:
    import json

    try:
        with open(SAMPLE_META) as f:
            return json.load(f).get("question", "What happens in this video?")
    except (OSError, ValueError):
        return "What happens in this video?"


# ----------------------------------------------------------------------------- what a model can answer
REAL_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


def model_card(model: str) -> dict:
    """mmkv's notes on a checkpoint (its mmkv.json), read without loading it ({} for hub ids)."""
    from ..models.loading import model_card as _card, resolve_model

    try:
        return _card(resolve_model(model))
    except Exception:  # noqa: BLE001 - informative only
        return {}


def model_note(model: str) -> str:
    """Markdown for the page about what `model` can answer: for the bundled model (one letter to
    its synthetic multiple-choice questions) and untrained checkpoints, what it is and how to
    serve a real model instead; "" for any other model."""
    card = model_card(model)
    run = (f"To ask about real videos, start the demo with a real model, e.g. `mmkv demo --model {REAL_MODEL}` "
           "(a GPU is recommended; Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision checkpoints take videos).")
    if card.get("trained") is False:
        return (f"**`{model}` is untrained (random weights): its answers are meaningless**; the compression stats "
                f"are real. {run}")
    if answers_letters(card):
        params = card.get("params")
        size = f"{params / 1e6:.1f}M-parameter " if isinstance(params, (int, float)) and params else ""
        arch = {"Qwen2VL": "Qwen2-VL", "Qwen2_5_VL": "Qwen2.5-VL"}.get(
            str(card.get("architecture", "")).replace("ForConditionalGeneration", ""), "model")
        return (f"**`{model}` answers with one letter only.** It is the bundled {size}{arch} trained on synthetic "
                "videos of moving shapes to answer multiple-choice questions (colour, shape, order, count) with "
                "A, B, C or D, so any question, about any video, gets a letter: the sample's question is filled "
                f"in below. {run}")
    return ""


# ----------------------------------------------------------------------------- models and encodings
def _progress_label(stage: str) -> str:
    return {"encode": "decoding + encoding frames", "prefill": "prefilling the LLM (KV cache)",
            "decode": "generating"}.get(stage, stage)


class Demo:
    """Loaded models (one at a time), pipelines per recipe, and the store of encoded videos."""

    def __init__(self, config: DemoConfig | None = None):
        self.config = config or DemoConfig()
        self._lock = threading.RLock()
        self._model: str | None = None
        self._base = None                 # the Pipeline loaded for _model (owns the adapter)
        self._pipes: dict[str, object] = {}
        self._encodings: OrderedDict[str, tuple] = OrderedDict()  # id -> (Encoded, settings key, Pipeline)

    # ---- models
    def check_model(self, model: str | None) -> str:
        model = (model or "").strip() or self.config.models[0]
        if model not in self.config.models and not self.config.allow_custom_model:
            raise InputError(f"model {model!r} is not offered by this demo; choose one of: "
                             f"{', '.join(self.config.models)}")
        return model

    def pipeline(self, model: str | None, recipe: str | None, progress: Callable | None = None):
        """The Pipeline for (model, recipe). Recipes share the loaded model; a different model
        replaces it (one model in memory at a time)."""
        import mmkv
        from ..pipeline import Pipeline
        from ..recipe import Recipe

        model = self.check_model(model)
        r = Recipe.parse((recipe or "").strip() or "none")  # RecipeError before any loading
        spec = r.spec()
        with self._lock:
            if self._model != model:
                self._release_model()
                if progress:
                    progress(0.0, f"loading model {model}")
                c = self.config
                self._base = mmkv.load(model, "none", device=c.device, dtype=c.dtype,
                                       attn_implementation=c.attn_implementation)
                self._model = model
            pipe = self._pipes.get(spec)
            if pipe is None:
                b = self._base
                pipe = Pipeline(b.adapter, r, b.base_attn, chunk_frames=b.chunk_frames, prefill_chunk=b.prefill_chunk,
                                model_name=b.model_name, compress_at=b.compress_at)
                self._pipes[spec] = pipe
            return pipe

    def _release_model(self) -> None:
        self._pipes.clear()
        self._encodings.clear()
        self._base, self._model = None, None
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- encodings
    def settings_key(self, path: str, model: str | None, recipe: str | None, frames: int, fps: float | None) -> tuple:
        from ..recipe import Recipe

        model = self.check_model(model)
        spec = Recipe.parse((recipe or "").strip() or "none").spec()
        # uploads have unique paths (Gradio names them by content hash), so the path names the video
        return (os.path.realpath(path) if path else None, model, spec, int(frames), float(fps or 0))

    def check_frames(self, frames, fps) -> tuple[int, float | None]:
        try:
            frames = int(frames)
        except (TypeError, ValueError):
            raise InputError(f"frames must be a whole number, got {frames!r}") from None
        if not 1 <= frames <= self.config.max_frames:
            raise InputError(f"frames must be between 1 and {self.config.max_frames}, got {frames}")
        fps = float(fps) if fps not in (None, "") else 0.0
        if fps < 0 or fps != fps:
            raise InputError(f"fps must be 0 (uniform sampling) or positive, got {fps}")
        return frames, (fps or None)

    def encode(self, path: str, model: str | None, recipe: str | None, frames: int = 32, fps: float | None = None,
               progress: Callable[[float, str], None] | None = None, name: str | None = None):
        """Encode a checked upload once; returns (encoding id, Encoded). With fps, `frames` caps the
        number of sampled frames; without, `frames` are spread uniformly over the video."""
        frames, fps = self.check_frames(frames, fps)
        check_upload(path, self.config, name)
        key = self.settings_key(path, model, recipe, frames, fps)
        pipe = self.pipeline(model, recipe, progress)

        def report(stage, done, total):
            if progress:
                progress(done / max(total, 1), f"{_progress_label(stage)} ({done}/{total})")

        if progress:
            progress(0.0, "decoding + encoding frames")
        kw = {"fps": fps, "max_frames": frames} if fps else {"frames": frames}
        try:
            enc = pipe.encode(path, progress=report, **kw)
        except InputError as e:
            raise InputError(user_message(e, {path: name or os.path.basename(path)})) from None
        eid = uuid.uuid4().hex
        with self._lock:
            self._encodings[eid] = (enc, key, pipe)
            while len(self._encodings) > self.config.max_encodings:
                self._encodings.popitem(last=False)
        return eid, enc

    def encoding(self, eid: str | None, key: tuple | None = None):
        """(Encoded, Pipeline) of a stored encoding, or None when it was dropped or the settings changed."""
        with self._lock:
            item = self._encodings.get(eid) if eid else None
            if item is None or (key is not None and item[1] != key):
                return None
            self._encodings.move_to_end(eid)
            return item[0], item[2]

    def drop(self, eid: str | None) -> None:
        with self._lock:
            self._encodings.pop(eid, None)

    def encode_stream(self, path: str, model: str | None, recipe: str | None, frames: int = 32,
                      fps: float | None = None, name: str | None = None) -> Iterator[tuple[str, object]]:
        """`encode` in a worker thread: yields ("progress", (fraction, label)) while it runs, then
        ("encoded", (encoding id, Encoded)). Errors are raised here; closing the generator stops
        the encoding at its next progress step."""
        def work(emit):
            return self.encode(path, model, recipe, frames, fps, name=name,
                               progress=lambda f, d: emit("progress", (f, d)))

        for kind, value in _stream(work, "mmkv-demo-encode"):
            yield ("encoded", value) if kind == "done" else (kind, value)

    # ---- answers
    def answer_limit(self, pipe) -> int | None:
        """Most new tokens a complete answer of this model takes, when the model says (None: its
        stop tokens end the answer, up to the user's max new tokens). The bundled model answers
        one letter."""
        card = getattr(pipe.adapter, "card", {}) or {}
        return 1 if answers_letters(card) else None

    def ask_stream(self, enc, pipe, question: str, *, max_new_tokens: int = 64,
                   progress: Callable[[float, str], None] | None = None,
                   progress_events: bool = False) -> Iterator[tuple[str, object]]:
        """Yield ("text", delta) while the answer is generated, then ("result", Result).
        The generation runs in a worker thread; errors are raised here, in the caller.
        `progress(fraction, label)` hears the prefill of the question and the decoding steps; with
        `progress_events` they are also yielded, as ("progress", (fraction, label)).
        Generation stops at the model's stop tokens, at `max_new_tokens`, or once the answer is
        complete (`answer_limit`: one letter for the bundled model)."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty; type a question about the video")
        try:
            max_new_tokens = int(max_new_tokens)
        except (TypeError, ValueError):
            raise InputError(f"max new tokens must be a whole number, got {max_new_tokens!r}") from None
        if not 1 <= max_new_tokens <= self.config.max_new_tokens:
            raise InputError(f"max new tokens must be between 1 and {self.config.max_new_tokens}")
        limit = self.answer_limit(pipe)
        if limit is not None:
            max_new_tokens = min(max_new_tokens, limit)

        def work(emit):
            def report(stage, done, total):
                label = f"{_progress_label(stage)} ({done}/{total})"
                if progress:
                    progress(done / max(total, 1), label)
                if progress_events:
                    emit("progress", (done / max(total, 1), label))

            return pipe.ask(enc, question.strip(), max_new_tokens=max_new_tokens,
                            on_text=lambda delta: emit("text", delta), progress=report)

        for kind, value in _stream(work, "mmkv-demo-ask"):
            yield ("result", value) if kind == "done" else (kind, value)


def answers_letters(card: dict) -> bool:
    """Whether a checkpoint's mmkv.json says it answers multiple-choice questions with a letter."""
    return "multiple choice" in str(card.get("task", "")).lower()


def _stream(work: Callable, name: str) -> Iterator[tuple[str, object]]:
    """Run `work(emit)` in a worker thread; yield every (kind, value) it emits, then ("done",
    what it returned). Its exception is raised here. Closing this generator (the page went away)
    makes the next `emit` stop the work, and waits for the thread, so nothing keeps running
    beside the next request."""
    q: queue.Queue = queue.Queue()
    stop = threading.Event()

    def emit(kind, value):
        if stop.is_set():
            raise _Cancelled()
        q.put((kind, value))

    def run():
        try:
            q.put(("done", work(emit)))
        except _Cancelled:
            q.put(("cancelled", None))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            q.put(("error", e))

    ctx = contextvars.copy_context()
    worker = threading.Thread(target=ctx.run, args=(run,), daemon=True, name=name)
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "error":
                raise value
            if kind == "cancelled":
                return
            yield kind, value
            if kind == "done":
                return
    finally:
        stop.set()
        worker.join()


class _Cancelled(Exception):
    pass
