"""Loading a model: an HF model id, a local folder, or the bundled default.

The family is read from the config first (cheap), so an unsupported model fails before any
weights are read; the device (and device map) is checked before that. Device: CUDA when
available, else CPU; `device_map=` splits or offloads the model instead (mmkv.models.devices).
dtype "auto": bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU (faster than bf16 on
CPUs without AMX).
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from ..errors import ModelError
from .base import ADAPTERS, Adapter
from .devices import check_device_map, main_device, prepare_offloaded, pick_device

DEFAULT_MODEL = "mmkv-tiny"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
CACHE_DIR = os.environ.get("MMKV_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmkv"))


def bundled_model_path() -> str:
    """The bundled default model: the trained checkpoint shipped in mmkv/assets if present,
    else an untrained tiny Qwen2-VL built from a config on first use (and cached)."""
    shipped = os.path.join(ASSETS, DEFAULT_MODEL)
    if os.path.isfile(os.path.join(shipped, "config.json")):
        return shipped
    path = os.path.join(CACHE_DIR, "mmkv-tiny-untrained")
    if not os.path.isfile(os.path.join(path, "config.json")):
        from .tiny import build_tiny
        build_tiny("qwen2_vl", path)
        with open(os.path.join(path, "mmkv.json"), "w") as f:
            json.dump({"trained": False, "note": "random weights built from a config: answers are meaningless"}, f)
    return path


# Other checkpoints shipped in mmkv/assets, by name: the benchmark models (docs/model.md).
BUNDLED = ("mmkv-long", "mmkv-hires")


def resolve_model(model: str | None) -> str:
    if model is None or model == DEFAULT_MODEL:
        return bundled_model_path()
    if model in BUNDLED:
        path = os.path.join(ASSETS, model)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"the bundled model {model!r} is not in this installation ({path}); train it with "
                             f"the script named in docs/model.md")
        return path
    return os.fspath(model)


def model_card(path: str) -> dict:
    """mmkv's own notes on a checkpoint (mmkv.json), e.g. {"trained": false}."""
    try:
        with open(os.path.join(path, "mmkv.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


def read_model_type(path: str) -> str:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(path) else "model id"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {where} {path!r}: {msg}") from None
    mt = getattr(cfg, "model_type", None)
    if mt not in ADAPTERS:
        raise ModelError(f"model {path!r} is a {mt!r} model, which mmkv does not support; supported families: "
                         f"{', '.join(sorted(ADAPTERS))}")
    return mt


def load_adapter(model: str | None = None, *, device=None, dtype="auto", attn_implementation: str = "sdpa",
                 processor_kwargs: dict | None = None, device_map=None, max_memory: dict | None = None,
                 offload_folder: str | None = None) -> tuple[Adapter, str]:
    """Load model + processor and wrap them in the family's adapter. `device_map`, `max_memory`
    and `offload_folder` are accelerate's big-model inference options (see mmkv.models.devices).

    Returns (adapter, base attention implementation). The language model is switched to the
    `mmkv` attention implementation, which calls the base one for plain dense attention."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    from .. import attention  # noqa: F401 - registers the "mmkv" attention implementation

    dev = pick_device(device)  # a bad device or map fails before anything is read
    dm = check_device_map(device_map, max_memory, offload_folder, device)
    path = resolve_model(model)
    mt = read_model_type(path)
    dt = pick_dtype(dtype, dev if dm is None else main_device(dm))
    placement = {} if dm is None else {"device_map": dm, "max_memory": max_memory, "offload_folder": offload_folder}
    if attn_implementation == attention.NAME:
        raise ModelError("attn_implementation='mmkv' is set by mmkv itself; pass the base implementation "
                         "(sdpa, eager or flash_attention_2)")
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = AutoModelForImageTextToText.from_pretrained(path, dtype=dt, attn_implementation=attn_implementation,
                                                            **placement)
            proc = AutoProcessor.from_pretrained(path, **(processor_kwargs or {}))
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"cannot load {path!r}: {str(e).strip().splitlines()[0]}") from None
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    if dm is None:
        m = m.to(dev)
    else:
        prepare_offloaded(m)
    m = m.eval()
    base = m.config.get_text_config()._attn_implementation or "sdpa"
    m.set_attn_implementation({"text_config": attention.NAME})
    adapter = ADAPTERS[mt](m, proc)
    adapter.path = path
    adapter.card = model_card(path)
    layout = (adapter.card.get("train") or {}).get("rope_layout")
    if layout is not None and hasattr(adapter, "rope_layout"):   # a checkpoint trained in that M-RoPE layout
        from .qwen2_vl import ROPE_LAYOUTS
        if layout not in ROPE_LAYOUTS:
            raise ModelError(f"{path}/mmkv.json: train.rope_layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
        adapter.rope_layout = layout
    return adapter, base
