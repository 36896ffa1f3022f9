"""The Adapter interface: everything model-specific, and nothing else, lives in an adapter.

An adapter wraps a loaded HF model and its processor and provides:
- vision encoding, chunk by chunk (`encode_chunk`, `finish_video`, `encode_image`) -> VisualTokens;
- the prompt around the media, split at the question (`prefix`, `suffix`), with input ids for the
  UNCOMPRESSED visual token count and the model's own positions (M-RoPE via `get_rope_index`
  for Qwen, 1-D for LLaVA);
- access to the language model: embeddings, decoder layers, lm_head, shapes.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import ModelError
from ..vision.base import VisualTokens
from .devices import execution_device

ADAPTERS: dict[str, type["Adapter"]] = {}
_LONG_ROPE = ("linear", "dynamic", "yarn", "longrope", "llama3")  # rope scalings that extend the context
_SENTINEL = "\u2063MMKV_QUESTION\u2063"
_SENTINELS = tuple(f"\u2063MMKV_TURN{i}\u2063" for i in range(3))


def register_adapter(cls: type["Adapter"]) -> type["Adapter"]:
    for mt in cls.model_types:
        ADAPTERS[mt] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


@dataclass
class Prompt:
    """A tokenized prompt part for the uncompressed media.

    ids:        [L] long input ids, the media placeholder expanded to one id per visual token.
    positions:  [P, L] long model positions (P = 3 for M-RoPE, 1 otherwise).
    visual:     [L] bool, True at visual token slots (in VisualTokens.index order).
    """

    ids: torch.Tensor
    positions: torch.Tensor
    visual: torch.Tensor

    @property
    def next_text_position(self) -> int:
        """Where text that follows this part starts: the last token's position + 1 (the last token
        is text). Not the maximum: Qwen's M-RoPE continues text after a video from its spatial
        extent, and temporal positions may run past that."""
        return int(self.positions[:, -1].max()) + 1 if self.positions.numel() else 0

    @property
    def max_position(self) -> int:
        return int(self.positions.max()) if self.positions.numel() else -1


class Adapter:
    """Base adapter. Subclasses set `model_types`, `placeholder`, `pos_dims` and implement the
    vision methods and `_positions`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    pos_dims: ClassVar[int] = 1
    temporal_patch: ClassVar[int] = 1  # frames per temporal slot
    video_error: ClassVar[str | None] = None  # set by families that take images only: the error to raise
    image_view_scores: ClassVar[bool] = False  # AnyRes images carry per-view scores (meta["view_scores"])

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._templates: dict = {}

    # ------------------------------------------------------------------ language model access
    @property
    def text_model(self):
        return self.model.model.language_model

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def layers(self):
        return self.text_model.layers

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    @property
    def device(self) -> torch.device:
        """Where inputs enter: the embeddings' execution device (under a device map the layers,
        the vision tower and lm_head may run elsewhere; accelerate's hooks move their inputs)."""
        return execution_device(self.text_model.embed_tokens)

    def layer_device(self, i: int) -> torch.device:
        """Where decoder layer `i` runs, and so where its cache layer's tensors live."""
        return execution_device(self.layers[i])

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @functools.cached_property
    def cache_kwarg(self) -> str:
        """The language model's name for the KV cache argument: `cache` (transformers >= 5.24,
        which deprecates `past_key_values` with a warning) or `past_key_values` (earlier)."""
        params = inspect.signature(self.text_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def context_limit(self) -> tuple[int | None, int | None, str]:
        """(positions the language model was trained on, positions its rope scaling admits, the
        scaling's name or ""); None when the config does not say."""
        cfg = self.text_config
        n = getattr(cfg, "max_position_embeddings", None)
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
            rope = next(iter(rope.values()))  # per layer type: the first
        kind = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, dict) else None
        factor = rope.get("factor") if isinstance(rope, dict) else None
        if n and kind in _LONG_ROPE and factor and float(factor) > 1:
            trained = int(rope.get("original_max_position_embeddings") or n)
            return trained, max(int(n), int(trained * float(factor))), f"{kind} rope scaling x{float(factor):g}"
        return n, n, ""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embed_tokens(ids.to(self.device))

    def model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[P, L] positions -> the position_ids tensor the language model takes (batch 1)."""
        return positions.unsqueeze(1) if self.pos_dims == 3 else positions

    def stop_ids(self) -> set[int]:
        ids = set()
        for src in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if src is None:
                continue
            ids.update(src if isinstance(src, (list, tuple)) else [src])
        return ids

    # ------------------------------------------------------------------ prompt
    placeholder: ClassVar[dict[str, str]] = {}  # media kind -> placeholder token

    def _split_template(self, kind: str, system: str | None) -> tuple[str, str]:
        key = (kind, system)
        if key not in self._templates:
            msgs = []
            if system is not None:
                msgs.append({"role": "system", "content": system})
            msgs.append({"role": "user", "content": [{"type": kind}, {"type": "text", "text": _SENTINEL}]})
            text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if text.count(_SENTINEL) != 1 or text.count(self.placeholder[kind]) != 1:
                raise ModelError(f"{self.family}: the chat template does not place one {kind} and one question "
                                 "in the user turn; mmkv cannot split it")
            self._templates[key] = tuple(text.split(_SENTINEL))
        return self._templates[key]

    def _turn_template(self, kind: str, system: str | None) -> str:
        """The text that follows an assistant answer and opens the next question (the end of the
        assistant turn, then the user turn's header), from the chat template itself: a
        conversation [user: media + S0, assistant: S1, user: S2] split at the sentinels."""
        key = ("turn", kind, system)
        if key not in self._templates:
            msgs = [] if system is None else [{"role": "system", "content": system}]
            msgs += [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": _SENTINELS[0]}]},
                     {"role": "assistant", "content": _SENTINELS[1]},
                     {"role": "user", "content": [{"type": "text", "text": _SENTINELS[2]}]}]
            text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if any(text.count(s) != 1 for s in _SENTINELS):
                raise ModelError(f"{self.family}: the chat template does not render a follow-up question; "
                                 "mmkv cannot continue the conversation")
            between = text.split(_SENTINELS[1])[1].split(_SENTINELS[2])[0]
            self._templates[key] = between
        return self._templates[key]

    def next_turn(self, question: str, kind: str, start: int, system: str | None = None) -> Prompt:
        """A follow-up question after an answer: the end of the assistant turn (the stop token the
        answer ended on, which generation does not feed back), the next user turn with `question`,
        and the assistant header; positions continue from `start`."""
        if not isinstance(question, str) or not question.strip():
            from ..errors import InputError
            raise InputError("the question is empty; ask something about the video")
        text = self._turn_template(kind, system) + question + self._split_template(kind, system)[1]
        ids = torch.tensor(self._tokenize(text), dtype=torch.long)
        pos = torch.arange(start, start + len(ids)).expand(self.pos_dims, -1).clone()
        return Prompt(ids, pos, torch.zeros(len(ids), dtype=torch.bool))

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefix(self, vt: VisualTokens, system: str | None = None) -> Prompt:
        """System + user turn up to and including the media (placeholder expanded to vt.n_total)."""
        text = self._split_template(vt.kind, system)[0]
        ids = self._tokenize(text)
        ph = self.tokenizer.convert_tokens_to_ids(self.placeholder[vt.kind])
        at = ids.index(ph)
        if at == len(ids) - 1:
            raise ModelError(f"{self.family}: the chat template ends the prefix on the media placeholder")
        ids = torch.tensor(ids[:at] + [ph] * vt.n_total + ids[at + 1:], dtype=torch.long)
        visual = ids == ph
        return Prompt(ids, self._positions(ids, vt), visual)

    def suffix(self, question: str, kind: str, start: int, system: str | None = None) -> Prompt:
        """The question and the assistant header, positions continuing from `start`."""
        if not isinstance(question, str) or not question.strip():
            from ..errors import InputError
            raise InputError("the question is empty; ask something about the video")
        text = question + self._split_template(kind, system)[1]
        ids = torch.tensor(self._tokenize(text), dtype=torch.long)
        pos = torch.arange(start, start + len(ids)).expand(self.pos_dims, -1).clone()
        return Prompt(ids, pos, torch.zeros(len(ids), dtype=torch.bool))

    def _positions(self, ids: torch.Tensor, vt: VisualTokens) -> torch.Tensor:
        return torch.arange(len(ids)).unsqueeze(0)

    # ------------------------------------------------------------------ vision
    def encode_chunk(self, frames: np.ndarray, timestamps: np.ndarray, slot0: int, index0: int) -> VisualTokens:
        """Encode frames [n, H, W, 3] uint8 whose first temporal slot is `slot0` and whose first
        token is the `index0`-th visual token of the video."""
        raise NotImplementedError

    def finish_video(self, parts: list[VisualTokens], media) -> VisualTokens:
        """Join the chunks of a video (already compressed by streaming presses, if any)."""
        raise NotImplementedError

    def encode_image(self, image) -> VisualTokens:
        raise NotImplementedError

    def frames_per_chunk(self, requested: int) -> int:
        """Round a chunk size to whole temporal slots."""
        t = self.temporal_patch
        return max(t, requested // t * t)

    def slots(self, num_frames: int) -> int:
        return -(-num_frames // self.temporal_patch)


def build_tokens(embeds, coords, index0, grid, timestamps, kind, is_patch=None, features=None, meta=None):
    n = embeds.shape[0]
    return VisualTokens(
        embeds=embeds, coords=coords, index=torch.arange(index0, index0 + n),
        is_patch=torch.ones(n, dtype=torch.bool) if is_patch is None else is_patch,
        weight=torch.ones(n), n_total=n, grid=grid,
        timestamps=torch.as_tensor(np.asarray(timestamps, dtype=np.float64)), kind=kind, features=features,
        meta=meta or {})


def grid_coords(t0: int, t: int, h: int, w: int) -> torch.Tensor:
    """(t, h, w) of a raster-ordered [t, h, w] token grid starting at slot t0 -> [t*h*w, 3]."""
    tt, hh, ww = torch.meshgrid(torch.arange(t0, t0 + t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww], -1).reshape(-1, 3)
