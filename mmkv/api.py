"""The public entry points: `load()` a Pipeline, or `generate()` in one call."""
from __future__ import annotations

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

    The recipe is checked before the model is loaded, so a bad recipe fails fast."""
    r = Recipe.parse(recipe)
    adapter, base = load_adapter(model, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                 device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    return Pipeline(adapter, r, base, chunk_frames=chunk_frames, prefill_chunk=prefill_chunk, system=system,
                    model_name=str(model or DEFAULT_MODEL), compress_at=compress_at)


def generate(video, question: str, *, model: str | None = DEFAULT_MODEL, recipe="none",
             max_new_tokens: int = 64, frames: int | None = None, fps: float | None = None,
             max_frames: int | None = None, video_fps: float | None = None, device=None, dtype="auto",
             attn_implementation: str = "sdpa", progress=False, device_map=None, max_memory: dict | None = None,
             offload_folder: str | None = None, **kwargs) -> Result:
    """Answer `question` about `video` (a file path, a list of PIL images, a [T, H, W, 3] array,
    or a single image). Returns a Result: `str(result)` is the answer, `result.stats` the costs.

    The loaded model is kept for later calls with the same model, recipe, device and dtype."""
    from .errors import InputError
    from .io import load_media
    from .models.devices import check_placement

    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty; ask something about the video")
    r = Recipe.parse(recipe)  # bad recipe, device, video or question fail here, before the model loads
    check_placement(device, device_map, max_memory, offload_folder)
    media = load_media(video, frames=frames, fps=fps, max_frames=max_frames, video_fps=video_fps)
    key = (str(model), r.spec(), str(device), str(dtype), attn_implementation, repr(device_map), repr(max_memory),
           str(offload_folder))
    pipe = _PIPELINES.get(key)
    if pipe is None:
        if media.kind == "video":  # an image-only family fails here, before its weights load
            from .models import ADAPTERS
            from .models.loading import read_model_type, resolve_model

            err = ADAPTERS[read_model_type(resolve_model(model))].video_error
            if err:
                raise InputError(err)
        _PIPELINES.clear()  # keep at most one model in memory
        pipe = _PIPELINES[key] = load(model, r, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                      device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    return pipe.generate(media, question, max_new_tokens=max_new_tokens, progress=progress, **kwargs)
