"""The public entry points: `load()` a Pipeline, or `generate()` in one call."""
from __future__ import annotations

from .errors import InputError
from .models.loading import DEFAULT_MODEL, load_adapter
from .pipeline import Pipeline
from .recipe import Recipe
from .stats import Result

_PIPELINES: dict = {}


def load(model: str | None = DEFAULT_MODEL, recipe="none", *, device=None, dtype="auto",
         attn_implementation: str = "sdpa", chunk_frames: int = 32, prefill_chunk: int = 4096,
         system: str | None = None, compress_at: str = "ask", device_map=None, max_memory: dict | None = None,
         offload_folder: str | None = None) -> Pipeline:
    """Load `model` (an HF model id, a local folder, or "mmkv-tiny", the bundled default) with a
    compression `recipe` (a preset name, a recipe string such as "kivi:2", or a Recipe).
    `compress_at="encode"` compresses the KV of an encoded video before any question (see Pipeline).
    `device_map="auto"` (with optional `max_memory=`, `offload_folder=`) splits a checkpoint that
    does not fit one device over the GPUs, the CPU and the disk (accelerate's big-model inference);
    each compressed-cache layer stays on its decoder layer's device.

    The recipe and the options are checked before the model is loaded, so bad ones fail fast."""
    r = Recipe.parse(recipe)
    Pipeline.check_options(chunk_frames=chunk_frames, prefill_chunk=prefill_chunk, compress_at=compress_at)
    adapter, base = load_adapter(model, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                 device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    return Pipeline(adapter, r, base, chunk_frames=chunk_frames, prefill_chunk=prefill_chunk, system=system,
                    model_name=str(model or DEFAULT_MODEL), compress_at=compress_at)


def check_request(media, question: str, *, model: str | None = DEFAULT_MODEL, recipe: Recipe,
                  max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0) -> None:
    """Everything about one question that can be checked before a model loads: the question, the
    generation length, and whether the model's family and the recipe's stages take this input
    (a video on an image-only family, globalcom2 on a video or on a family without AnyRes view
    scores). Reads only the model's config. Raises InputError (ModelError for the model)."""
    from .models import ADAPTERS
    from .models.loading import read_model_type, resolve_model

    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty; ask something about the video")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise InputError(f"temperature must be positive when sampling, got {temperature}")
    cls = ADAPTERS[read_model_type(resolve_model(model))]
    if media.kind == "video" and cls.video_error:
        raise InputError(cls.video_error)
    for stage in recipe.stages:
        if hasattr(stage, "check_input"):
            stage.check_input(media.kind, cls)


def generate(video, question: str, *, model: str | None = DEFAULT_MODEL, recipe="none",
             max_new_tokens: int = 64, frames: int | None = None, fps: float | None = None,
             max_frames: int | None = None, video_fps: float | None = None, device=None, dtype="auto",
             attn_implementation: str = "sdpa", chunk_frames: int = 32, prefill_chunk: int = 4096,
             system: str | None = None, compress_at: str = "ask", progress=False, device_map=None,
             max_memory: dict | None = None, offload_folder: str | None = None, **kwargs) -> Result:
    """Answer `question` about `video` (a file path, a list of PIL images, a [T, H, W, 3] array,
    or a single image). Returns a Result: `str(result)` is the answer, `result.stats` the costs.
    Takes every `load` option; `kwargs` go to `Pipeline.ask` (do_sample, temperature, on_text, ...).

    Bad input, options or recipe fail before the model loads. The loaded model is kept for later
    calls with the same model, device (or device map), dtype and attention implementation."""
    from .io import load_media
    from .models.devices import check_placement

    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty; ask something about the video")
    r = Recipe.parse(recipe)
    Pipeline.check_options(chunk_frames=chunk_frames, prefill_chunk=prefill_chunk, compress_at=compress_at)
    check_placement(device, device_map, max_memory, offload_folder)
    media = load_media(video, frames=frames, fps=fps, max_frames=max_frames, video_fps=video_fps)
    check_request(media, question, model=model, recipe=r, max_new_tokens=max_new_tokens,
                  do_sample=kwargs.get("do_sample", False), temperature=kwargs.get("temperature", 1.0))
    key = (str(model), str(device), str(dtype), attn_implementation, repr(device_map), repr(max_memory),
           str(offload_folder))
    loaded = _PIPELINES.get(key)
    if loaded is None:
        _PIPELINES.clear()  # keep at most one model in memory
        loaded = _PIPELINES[key] = load(model, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                        device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    pipe = Pipeline(loaded.adapter, r, loaded.base_attn, chunk_frames=chunk_frames, prefill_chunk=prefill_chunk,
                    system=system, model_name=loaded.model_name, compress_at=compress_at)
    return pipe.generate(media, question, max_new_tokens=max_new_tokens, progress=progress, **kwargs)
