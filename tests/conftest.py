"""Shared fixtures: tiny checkpoints of every family, saved and loaded through from_pretrained."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mmkv.models.tiny import FAMILIES, build_tiny

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: build_tiny(fam, str(root / fam), seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def frames_for(family: str, n: int = 8, seed: int = 0) -> np.ndarray:
    """Random RGB frames sized for the family's tiny processor."""
    side = 56 if family == "llava_onevision" else 112
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def hf_models(tiny_dir):
    """Plain transformers model + processor per family (no mmkv involved). The Qwen models use
    Qwen's released M-RoPE layout (`use_released_layout`: text after a video after its largest
    position), as mmkv does; transformers 5's own layout differs for videos of more temporal slots
    than max(h, w) / merge (tests/test_rope_layout.py compares mmkv with it, unpatched)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmkv.models.qwen2_vl import use_released_layout

    out = {}
    for fam, path in tiny_dir.items():
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        if fam != "llava_onevision":
            use_released_layout(model)
        out[fam] = (model, AutoProcessor.from_pretrained(path))
    return out


@pytest.fixture(scope="session")
def pipes(tiny_dir):
    """One mmkv pipeline (empty recipe) per family, shared across tests."""
    import mmkv

    return {fam: mmkv.load(path) for fam, path in tiny_dir.items()}


def hf_inputs(family, processor, question, video=None, image=None, fps=1.0):
    """Inputs for plain `model.generate`, with the same frames and timing mmkv uses."""
    from transformers.video_utils import VideoMetadata

    kind = "video" if video is not None else "image"
    msgs = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if video is None:
        return processor(text=[text], images=[image], return_tensors="pt")
    meta = VideoMetadata(total_num_frames=len(video), fps=fps, frames_indices=list(range(len(video))))
    kw = dict(do_sample_frames=False, video_metadata=[meta])
    if family != "llava_onevision":
        kw["cap_pixels_per_frame"] = False
    return processor(text=[text], videos=[video], return_tensors="pt", **kw)


def strip_eos(tokens, eos_ids):
    out = []
    for t in tokens:
        if t in eos_ids:
            break
        out.append(t)
    return out
