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

        self._rank = getattr(self, "_rank", 0)
        self._world_size = getattr(self, "_world_size", 1)
        if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.max_num_frames = int(max_num_frames) if max_num_frames not in (None, "", "None") else None
        self.fps = float(fps) if fps not in (None, "", "None") else None
        self.pipe = pipe if pipe is not None else mmkv.load(
            _unquote(pretrained), recipe=_unquote(recipe), device=device, dtype=dtype,
            attn_implementation=attn_implementation, system=system_prompt, compress_at=compress_at)
        self.encodes = 0  # videos encoded (for tests and logs)
        if not hasattr(self, "task_dict"):
            self.task_dict = {}

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
        for i, req in enumerate(requests):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            flat = visuals if isinstance(visuals, (list, tuple)) else [visuals]
            key = tuple(v if isinstance(v, str) else f"obj{id(v)}" for v in flat) or (f"none{i}",)
            groups.setdefault(key, []).append((i, ctx, dict(gen_kwargs or {}), visuals))
        out: list[str | None] = [None] * len(requests)
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), disable=self._rank != 0, desc="mmkv responding")
        except ImportError:  # pragma: no cover
            bar = None
        for items in groups.values():
            enc = self._encode(items[0][3])
            for j, (i, ctx, gk, _) in enumerate(items):
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
        if bar is not None:
            bar.close()
        return out


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
