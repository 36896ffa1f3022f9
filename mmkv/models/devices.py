"""Devices: checking `device=` and `device_map=` before anything loads, and finding where the
parts of a dispatched model run.

`device=` puts the whole model on one device. `device_map=` hands placement to accelerate's
big-model inference (through `from_pretrained`): "auto", "balanced", "balanced_low_0" or
"sequential" split the checkpoint over the GPUs, then the CPU, then the disk (`max_memory=`
caps each, e.g. {0: "20GiB", "cpu": "64GiB"}); a dict {module name: device} places modules
explicitly ("cpu" and "disk" offload: the weights stay there and each module runs on the main
device, accelerate's hooks moving its weights in for the call). Under a map each decoder layer
computes its keys and values on its own device, so each layer of the compressed cache lives
where its layer runs; nothing here moves them.
"""
from __future__ import annotations

import torch

from ..errors import InputError, ModelError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def available_devices() -> list[str]:
    """The `device=` values this machine accepts: "auto", "cpu", and "cuda", "cuda:N" (N below the
    CUDA device count) and "mps" where those exist."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def pick_device(device: str | int | torch.device | None) -> torch.device:
    """The torch device for `device` (None or "auto": CUDA when available, else CPU). Anything this
    machine does not have ("banana", "cuda" without a GPU, "cuda:3" with two GPUs) is an
    InputError naming the devices it has."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device={device!r} is not a device; use one of: {valid}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"device={device!r}: no CUDA GPU is available on this machine; use one of: {valid}")
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device={device!r}: this machine has {n} CUDA GPU{'s' * (n > 1)} "
                             f"(cuda:0 to cuda:{n - 1}); use one of: {valid}")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device={device!r}: MPS (Apple GPU) is not available on this machine; "
                             f"use one of: {valid}")
        return dev
    raise InputError(f"device={device!r} is not supported by mmkv; use one of: {valid}")


def _map_device(d, what: str) -> None:
    """A device_map / max_memory entry: "disk", "cpu", a GPU index or a device this machine has."""
    if d == "disk":
        return
    if isinstance(d, bool) or d == "auto":
        raise InputError(f"{what}: {d!r} is not a device; use 'cpu', 'disk', a GPU index or one of: "
                         f"{', '.join(available_devices()[1:])}")
    try:
        pick_device(d)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None


def check_device_map(device_map, max_memory=None, offload_folder=None, device=None):
    """Validate accelerate's big-model options before anything loads; returns the device map
    (a strategy name or a copy of the dict) or None."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise InputError("max_memory= and offload_folder= apply with device_map= only (e.g. device_map='auto')")
        return None
    if device is not None:
        raise InputError("give device= (one device) or device_map= (split or offload the model), not both")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise InputError(f"device_map={device_map!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)}, or a "
                             "dict {module name: device}; for one device use device=")
        dm = device_map
    elif isinstance(device_map, dict) and device_map:
        for name, d in device_map.items():
            if not isinstance(name, str):
                raise InputError(f"device_map keys are module names (str), got {name!r}")
            _map_device(d, f"device_map[{name!r}]")
        dm = dict(device_map)
    else:
        raise InputError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a non-empty dict "
                         f"{{module name: device}}, got {device_map!r}")
    if max_memory is not None:
        from accelerate.utils import convert_file_size_to_int

        if not isinstance(max_memory, dict) or not max_memory:
            raise InputError(f"max_memory must be a dict {{device: size}}, e.g. {{0: '20GiB', 'cpu': '64GiB'}}, "
                             f"got {max_memory!r}")
        for d, size in max_memory.items():
            _map_device(d, f"max_memory[{d!r}]")
            try:
                convert_file_size_to_int(size)
            except (ValueError, TypeError):
                raise InputError(f"max_memory[{d!r}]={size!r} is not a size; use bytes or a string such as "
                                 "'20GiB'") from None
    if offload_folder is not None and not isinstance(offload_folder, (str, bytes)) and not hasattr(
            offload_folder, "__fspath__"):
        raise InputError(f"offload_folder must be a folder path, got {offload_folder!r}")
    return dm


def check_placement(device=None, device_map=None, max_memory=None, offload_folder=None):
    """Check `device=` and the device-map options together, before anything loads."""
    pick_device(device)
    return check_device_map(device_map, max_memory, offload_folder, device)


def main_device(device_map) -> torch.device:
    """Where a mapped model mostly runs, for choosing the dtype: the CPU when every entry is
    "cpu" or "disk", else what device=None would pick."""
    if isinstance(device_map, dict) and all(str(d) in ("cpu", "disk") for d in device_map.values()):
        return torch.device("cpu")
    return pick_device(None)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` runs: accelerate's hook's execution device under a device map (its weights
    may sit on the CPU or the disk, i.e. on "meta" here), else its first parameter's device."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prepare_offloaded(model: torch.nn.Module) -> None:
    """After a dispatch: keep on their execution device, for good, the offloaded weights read outside their own
    module's forward. accelerate loads an offloaded module's weights only around that module's
    forward, but mmkv calls the model's methods (get_video_features, the language model), not its
    forward, so the model's own parameters (LLaVA's `image_newline`) would stay on "meta"; and
    `nn.MultiheadAttention` (SigLIP's pooling head) reads `out_proj.weight` without calling
    `out_proj`. These are small (a vector, one projection)."""
    parts = [model, getattr(model, "model", None)]
    parts += [c for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention) for c in m.children()]
    for part in parts:
        if part is not None:
            _materialize_direct_params(part)
    for mod_name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        loadable = getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None
        for name, p in module.named_parameters(recurse=False):
            if p.device.type == "meta" and not loadable:
                full = f"{mod_name}.{name}" if mod_name else name
                raise ModelError(f"the device map leaves {full!r} on the disk where accelerate cannot load it back "
                                 "(it offloads whole modules, not single parameters): map it to 'cpu' or a GPU")


def _materialize_direct_params(module: torch.nn.Module) -> None:
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        return
    from accelerate.utils import set_module_tensor_to_device

    dev = execution_device(module)
    for name, p in list(module.named_parameters(recurse=False)):
        if p.device.type == "meta":
            set_module_tensor_to_device(module, name, dev, value=weights[name])
