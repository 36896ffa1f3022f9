"""Devices: `device=` checked before anything loads, and `device_map=` (accelerate's big-model
inference) with layers offloaded to the CPU and the disk, giving the plain run's tokens."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import mmkv
from mmkv.errors import InputError, ModelError
from mmkv.models.devices import available_devices, check_device_map, pick_device
from mmkv.pipeline import Pipeline
from mmkv.recipe import Recipe

from conftest import frames_for

QUESTION = "What is in the video?"
COMPRESSING = "pvc+kivi:bits=2,group=8,residual=8"  # a small window, so the short prompt is quantized


def _boom(*a, **k):
    raise AssertionError("something was loaded before the device was checked")


# ---------------------------------------------------------------------------------- device=
@pytest.mark.parametrize("device", ["banana", "CPU", "cuda:-1", "meta", "xla"])
def test_bad_device_names_the_valid_ones(device):
    with pytest.raises(InputError, match=r"device=.*use one of: auto, cpu"):
        pick_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda", 1)])
def test_cuda_without_a_gpu_is_clear(device):
    with pytest.raises(InputError, match="no CUDA GPU is available"):
        pick_device(device)


def test_mps_where_absent():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(InputError, match="MPS"):
        pick_device("mps")


def test_cuda_index_beyond_the_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_devices()[:5] == ["auto", "cpu", "cuda", "cuda:0", "cuda:1"]
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device(None) == torch.device("cuda")
    with pytest.raises(InputError, match=r"2 CUDA GPUs \(cuda:0 to cuda:1\).*cuda:1"):
        pick_device("cuda:2")
    with pytest.raises(InputError, match="device_map"):
        check_device_map({"model.language_model.layers.0": 2})


def test_load_checks_the_device_before_anything_loads(monkeypatch):
    import mmkv.models.loading as loading

    monkeypatch.setattr(loading, "resolve_model", _boom)
    monkeypatch.setattr(loading, "read_model_type", _boom)
    for bad in ("banana", "cuda:7"):
        with pytest.raises(InputError, match="use one of"):
            mmkv.load("mmkv-tiny", device=bad)
    assert pick_device("cpu") == torch.device("cpu")


def test_generate_checks_the_device_before_the_video(tmp_path, monkeypatch):
    import mmkv.api as api

    monkeypatch.setattr(api, "load_adapter", _boom)
    with pytest.raises(InputError, match="banana.*use one of"):
        mmkv.generate(str(tmp_path / "missing.mp4"), QUESTION, device="banana")
    with pytest.raises(InputError, match="device_map='everywhere'"):
        mmkv.generate(str(tmp_path / "missing.mp4"), QUESTION, device_map="everywhere")


# ---------------------------------------------------------------------------------- device_map= checks
@pytest.mark.parametrize("kwargs,needle", [
    (dict(device_map="everywhere"), "use one of auto, balanced"),
    (dict(device_map="cpu"), "for one device use device="),
    (dict(device_map={}), "non-empty dict"),
    (dict(device_map={"lm_head": "banana"}), r"device_map\['lm_head'\].*not a device"),
    (dict(device_map={"lm_head": "auto"}), "not a device"),
    (dict(device_map={3: "cpu"}), "module names"),
    (dict(device_map="auto", device="cpu"), "not both"),
    (dict(max_memory={"cpu": "1GiB"}), "with device_map= only"),
    (dict(offload_folder="/tmp/x"), "with device_map= only"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), "not a size"),
    (dict(device_map="auto", max_memory={"banana": "1GiB"}), r"max_memory\['banana'\]"),
    (dict(device_map="auto", max_memory=["cpu"]), "must be a dict"),
])
def test_device_map_options_are_checked(kwargs, needle, monkeypatch):
    import mmkv.models.loading as loading

    monkeypatch.setattr(loading, "resolve_model", _boom)
    with pytest.raises(InputError, match=needle):
        mmkv.load("mmkv-tiny", **kwargs)


def test_device_map_accepts_offload_targets():
    dm = {"model.visual": "disk", "model.language_model": "cpu", "lm_head": "cpu"}
    assert check_device_map(dm, {"cpu": "1GiB", "disk": 10**9}) == dm
    assert check_device_map("auto") == "auto" and check_device_map(None) is None


# ---------------------------------------------------------------------------------- the CLI
def _cli(capsys, *args):
    from mmkv.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.strip()]


@pytest.mark.parametrize("args,needle", [
    (["--device", "banana"], "device='banana' is not a device; use one of: auto, cpu"),
    (["--device-map", "everywhere"], "device_map='everywhere'"),
    (["--device-map", "auto", "--device", "cpu"], "not both"),
    (["--device-map", "auto", "--max-memory", "cpu"], "DEVICE=SIZE"),
    (["--max-memory", "cpu=1GiB"], "with device_map= only"),
])
def test_cli_device_errors_are_one_line(capsys, monkeypatch, args, needle):
    import mmkv.models.loading as loading

    monkeypatch.setattr(loading, "resolve_model", _boom)
    code, out, err = _cli(capsys, "generate", *args)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert out == ""  # nothing printed (no "Q: ... A:") before the error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu(capsys):
    code, _, err = _cli(capsys, "generate", "--device", "cuda")
    assert code == 2 and len(err) == 1 and "no CUDA GPU is available" in err[0]


def test_cli_device_map_runs(tiny_dir, capsys):
    import json

    code, out, err = _cli(capsys, "generate", "--model", tiny_dir["qwen2_vl"], "--device-map", "auto",
                          "--max-memory", "cpu=64GiB", "--frames", "4", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["stats"]["frames"] == 4


# ---------------------------------------------------------------------------------- offloaded runs
def offload_map(family: str) -> dict:
    """Vision tower, decoder layer 1 and lm_head on the disk; the rest on the CPU."""
    vision = {"model.vision_tower": "disk", "model.multi_modal_projector": "disk", "model.image_newline": "cpu"} \
        if family == "llava_onevision" else {"model.visual": "disk"}
    return {**vision, "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
            "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
            "model.language_model.rotary_emb": "cpu", "lm_head": "disk"}


def _tensors(obj, seen=None):
    """Every tensor a cache layer (or a segment, recursively) holds."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x, seen)]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name), seen)]
    if hasattr(obj, "segments"):
        return [t for v in vars(obj).values() for t in _tensors(v, seen)]
    return []


def _run(pipe, frames):
    return pipe.generate(frames, QUESTION, max_new_tokens=6, output_scores=True)


def _same(a, b):
    assert a.tokens == b.tokens
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_offloaded_layers_give_the_plain_tokens(tiny_dir, family, tmp_path):
    frames = frames_for(family, n=4)
    mapped = mmkv.load(tiny_dir[family], device_map=offload_map(family), offload_folder=str(tmp_path))
    layers = mapped.adapter.layers
    assert any(p.device.type == "meta" for p in layers[1].parameters())  # layer 1 really is on the disk
    assert any(p.device.type == "meta" for p in mapped.adapter.lm_head.parameters())
    plain = mmkv.load(tiny_dir[family])
    _same(_run(mapped, frames), _run(plain, frames))
    # a vision press and 2-bit KIVI, the prefix compressed at encode: the same on both
    mk, pk = (Pipeline(p.adapter, Recipe.parse(COMPRESSING), p.base_attn, compress_at="encode") for p in (mapped, plain))
    enc = mk.encode(frames)
    assert any(layer.segments for layer in enc.cache.layers)  # really quantized
    for i, layer in enumerate(enc.cache.layers):  # each cache layer lives where its decoder layer runs
        dev = mapped.adapter.layer_device(i)
        held = _tensors(layer)
        assert held and all(t.device == dev for t in held), (i, dev, {t.device for t in held})
    _same(mk.ask(enc, QUESTION, max_new_tokens=6, output_scores=True),
          pk.ask(pk.encode(frames), QUESTION, max_new_tokens=6, output_scores=True))


def test_auto_map_with_max_memory_offloads_and_matches(tiny_dir):
    path = tiny_dir["llava_onevision"]
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    pipe = mmkv.load(path, device_map="auto", max_memory={"cpu": size * 3 // 4})
    assert "disk" in set(pipe.adapter.model.hf_device_map.values())  # the limit made accelerate offload
    frames = frames_for("llava_onevision", n=4)
    _same(_run(pipe, frames), _run(mmkv.load(path), frames))
    res = mmkv.generate(frames, QUESTION, model=path, device_map="auto", max_memory={"cpu": size // 4},
                        recipe=COMPRESSING, max_new_tokens=3)
    assert res.stats.kv_bytes > 0 and len(res.tokens) <= 3


def test_a_single_parameter_on_the_disk_is_refused(tiny_dir):
    dm = {**offload_map("llava_onevision"), "model.image_newline": "disk"}
    with pytest.raises(ModelError, match="'model.image_newline' on the disk"):
        mmkv.load(tiny_dir["llava_onevision"], device_map=dm)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_layers_split_over_two_gpus(tiny_dir):  # pragma: no cover - no GPU here
    dm = {"model.visual": 0, "model.language_model.embed_tokens": 0, "model.language_model.layers.0": 0,
          "model.language_model.layers.1": 1, "model.language_model.norm": 1, "model.language_model.rotary_emb": 0,
          "lm_head": 1}
    frames = frames_for("qwen2_vl", n=4)
    for recipe in ("none", COMPRESSING):
        split = mmkv.load(tiny_dir["qwen2_vl"], recipe, device_map=dm, dtype="fp16", compress_at="encode")
        one = mmkv.load(tiny_dir["qwen2_vl"], recipe, device="cuda:0", dtype="fp16", compress_at="encode")
        enc = split.encode(frames)
        for i, layer in enumerate(enc.cache.layers):
            assert all(t.device == torch.device("cuda", i) for t in _tensors(layer))
        assert split.ask(enc, QUESTION, max_new_tokens=6).tokens == \
            one.ask(one.encode(frames), QUESTION, max_new_tokens=6).tokens
