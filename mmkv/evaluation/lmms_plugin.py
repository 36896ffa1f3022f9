"""An lmms-eval model plugin: run any mmkv recipe inside lmms-eval (v0.7+, model registry v2).

mmkv declares the entry point `mmkv = "mmkv.evaluation.lmms_plugin:manifests"` in the group
`lmms_eval.models`; with both packages installed, lmms-eval finds the model "mmkv":

    accelerate launch --num_processes 8 -m lmms_eval --model mmkv \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,recipe=kivi:2,max_num_frames=32 \\
        --tasks videomme,mvbench --batch_size 1 --log_samples --output_path logs/

Model args: pretrained (HF id or folder, default mmkv-tiny), recipe (quote it if it contains commas:
recipe='streaming:sink=4,recent=512'), max_num_frames (32, lmms-eval's Qwen2.5-VL default), fps
(instead of max_num_frames), device, dtype, attn_implementation, system_prompt, compress_at.

Requests that share a video (Video-MME's 3 questions) are grouped, so each video is encoded once.
Grouping reads the doc (`videoID`, `video`, ... with `start`/`end`), not the visual, and visuals
are loaded one request at a time, right before their encoding: a task whose `doc_to_visual`
returns decoded frames (MVBench's frame folders) holds one video's frames at a time.
Data parallel (`accelerate launch --num_processes N`): the model builds an `Accelerator`, runs on
its device (`cuda:LOCAL_RANK`, or the CPU with gloo) and exposes what lmms-eval's evaluator reads:
`device` (where its rank-count tensors go), `accelerator`, `rank`, `world_size`.
Generation: greedy unless the task asks for temperature > 0; `until` strings cut the text,
except "\\n\\n" (dropped, as lmms-eval's Qwen2.5-VL wrapper does).

Importing this module does not import lmms_eval: the class `MMKV` (a subclass of lmms-eval's
`lmms`) is built on first access, when lmms-eval itself asks for it. `MMKVCore` holds all the
logic and works without lmms-eval.
"""
from __future__ import annotations

import os

MODEL_ID = "mmkv"
CLASS_PATH = "mmkv.evaluation.lmms_plugin.MMKV"


def manifests():
    """Entry-point payload for lmms-eval's registry (a list of ModelManifest)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


def _unquote(v):
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v


class MMKVCore:
    """The plugin's logic; `MMKV` adds lmms-eval's base class to it."""

    is_simple = True

    def __init__(self, pretrained: str = "mmkv-tiny", recipe: str = "none", max_num_frames: int | None = 32,
                 fps: float | None = None, device: str | None = None, dtype: str = "auto",
                 attn_implementation: str = "sdpa", system_prompt: str | None = None, compress_at: str = "ask",
                 batch_size=1, pipe=None, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"mmkv lmms-eval plugin: unknown model_args {sorted(kwargs)}")
        if int(batch_size) != 1:
            raise ValueError("mmkv lmms-eval plugin: batch_size must be 1 (requests sharing a video are grouped)")
        import mmkv
        import torch

        self._rank = getattr(self, "_rank", 0)
        self._world_size = getattr(self, "_world_size", 1)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun: one process per device
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            if device is None:
                device = str(self.accelerator.device)
        self.max_num_frames = int(max_num_frames) if max_num_frames not in (None, "", "None") else None
        self.fps = float(fps) if fps not in (None, "", "None") else None
        self.pipe = pipe if pipe is not None else mmkv.load(
            _unquote(pretrained), recipe=_unquote(recipe), device=device, dtype=dtype,
            attn_implementation=attn_implementation, system=system_prompt, compress_at=compress_at)
        # the evaluator's collectives (accelerator.gather of per-rank request counts) need tensors on
        # the accelerator's device; alone, the model's own device
        acc = getattr(self, "accelerator", None)
        self._device = torch.device(acc.device if acc is not None else
                                    getattr(getattr(self.pipe, "adapter", None), "device", None) or "cpu")
        self.encodes = 0  # videos encoded (for tests and logs)
        self.loads = 0    # doc_to_visual calls
        if not hasattr(self, "task_dict"):
            self.task_dict = {}

    @property
    def device(self):
        """A torch.device: the accelerator's under data parallelism, else the model's."""
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def batch_size(self) -> int:
        return 1

    # ------------------------------------------------------------------ lmms interface
    def loglikelihood(self, requests):
        raise NotImplementedError("the mmkv plugin only generates (generate_until)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the mmkv plugin only generates (generate_until)")

    def _encode(self, visuals):
        from PIL import Image

        self.encodes += 1
        if isinstance(visuals, (list, tuple)) and len(visuals) == 1:
            visuals = visuals[0]
        if isinstance(visuals, (list, tuple)):
            if visuals and all(isinstance(v, Image.Image) for v in visuals):  # frames given as images
                return self.pipe.encode(list(visuals), frames=self.max_num_frames if self.fps is None else None)
            raise ValueError(f"mmkv plugin: one video or image per request, got {len(visuals)} visuals")
        kw = {"fps": self.fps} if self.fps is not None else {"frames": self.max_num_frames}
        return self.pipe.encode(visuals, **kw)

    def generate_until(self, requests) -> list[str]:
        groups: dict = {}
        for i, req in enumerate(requests):  # group by the doc's video, without loading any visual
            _, _, _, doc_id, task, split = req.args
            groups.setdefault(_video_key(self.task_dict[task][split][doc_id], task, split, doc_id), []).append(i)
        out: list[str | None] = [None] * len(requests)
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), disable=self._rank != 0, desc="mmkv responding")
        except ImportError:  # pragma: no cover
            bar = None
        for items in groups.values():
            enc, paths = None, None
            for j, i in enumerate(items):
                ctx, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                if enc is None or paths is not None:  # paths are cheap to read again and check
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                    self.loads += 1
                    key = _paths(visuals)
                    if enc is None or key != paths:
                        enc = None  # free the previous encoding first
                        enc, paths = self._encode(visuals), key
                    del visuals
                gk = dict(gen_kwargs or {})
                temperature = float(gk.get("temperature", 0) or 0)
                res = self.pipe.ask(enc, ctx.replace("<image>", ""),
                                    max_new_tokens=int(gk.get("max_new_tokens", 128)), do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else 1.0,
                                    top_p=float(gk.get("top_p") or 1.0), reuse=j < len(items) - 1)
                text = res.text
                until = gk.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop and stop != "\n\n" and stop in text:
                        text = text.split(stop)[0]
                out[i] = text
                hook = getattr(self, "cache_hook", None)
                if hook is not None:
                    hook.add_partial("generate_until", (ctx, gk), text)
                if bar is not None:
                    bar.update(1)
            enc = None
        if bar is not None:
            bar.close()
        return out


VIDEO_FIELDS = ("videoID", "video", "video_path", "video_id", "video_name")  # Video-MME, MVBench, ...


def _video_key(doc, task: str, split: str, doc_id) -> tuple:
    """Which requests show the same video, read from the doc: the first of VIDEO_FIELDS it has
    (with `start`/`end`: a segment is its own video); else the doc itself."""
    if isinstance(doc, dict):
        for k in VIDEO_FIELDS:
            if doc.get(k) not in (None, ""):
                return (task, split, k, str(doc[k]), str(doc.get("start", "")), str(doc.get("end", "")))
    return (task, split, "doc", str(doc_id))


def _paths(visuals) -> tuple | None:
    """The visual as a tuple of file paths, or None when it is already loaded (images, frames)."""
    flat = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    return tuple(flat) if flat and all(isinstance(v, str) for v in flat) else None


_CLASS = None


def __getattr__(name):
    """`MMKV`: MMKVCore + lmms-eval's `lmms` base class, built when first asked for."""
    global _CLASS
    if name == "MMKV":
        if _CLASS is None:
            from lmms_eval.api.model import lmms

            _CLASS = type("MMKV", (MMKVCore, lmms), {"__module__": __name__, "__doc__": __doc__})
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
