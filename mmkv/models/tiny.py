"""Tiny checkpoints of every supported family, built from a config fully offline.

Tests, benchmarks and the bundled default model use these: they are saved with `save_pretrained`
(model, tokenizer, processor and chat template) and loaded back through `from_pretrained`, the
same path a real checkpoint takes. Weights are random unless trained afterwards.

    from mmkv.models.tiny import build_tiny
    path = build_tiny("qwen2_5_vl", "/tmp/tiny-qwen25")        # -> folder usable as model=
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
IMAGE_FAMILIES = ("llava_next",)  # image-only families (not in the video equivalence tests)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# Chat templates in the style of the real checkpoints (content: a string or typed parts).
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% endif %}{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CORPUS = [
    "What is happening in this video? Describe the scene, the objects and the colors.",
    "The quick brown fox jumps over the lazy dog. system user assistant You are a helpful assistant.",
    "Answer with the option's letter from the given choices directly. The best answer is: A B C D",
]

# Text-model shapes. "tiny": unit tests. "0.5b": Qwen2-0.5B's decoder (hidden 896, 24 layers,
# 14 heads, 2 KV heads) for CPU benchmarks, with the tiny vision tower and vocabulary.
TEXT_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
}


def make_tokenizer(special: list[str], corpus: Iterable[str] | None = None, vocab_size: int = 400,
                   split_lines: bool = False):
    """A byte-level BPE tokenizer trained offline on `corpus`, wrapped as a fast HF tokenizer.

    `split_lines=True` lets merges span whole lines (pre-tokenization splits on newlines only), so
    frequent phrases of a narrow corpus become single tokens; any text still encodes, byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split_lines:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus or DEFAULT_CORPUS) * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2  # t, h, w split of the rotary half-dimension, Qwen's 16/24/24 of 64 scaled
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _check_section(section, head_dim: int) -> list[int]:
    if section is None:
        return _mrope_section(head_dim)
    section = [int(x) for x in section]
    if len(section) != 3 or min(section) < 1 or sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section must be 3 positive sizes summing to head_dim / 2 = {head_dim // 2}, "
                         f"got {section}")
    return section


def build_tiny(family: str, out_dir: str, **kwargs) -> str:
    """Build a random-init checkpoint of `family` and save it (model + processor) to `out_dir`.
    Returns `out_dir`. Keyword arguments as for `make_tiny`."""
    model, proc = make_tiny(family, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return out_dir


def make_tiny(family: str, *, shape: str = "tiny", seed: int = 0, corpus=None, vocab_size: int = 400,
              split_lines: bool = False,
              text_overrides: dict | None = None, vision_overrides: dict | None = None, image_size: int = 56,
              max_pixels: int = 112 * 112, min_pixels: int = 56 * 56, rope_theta: float = 10000.0,
              max_crops: int = 2, mrope_section: list[int] | None = None):
    """A random-init (model, processor) of `family`, not saved.

    `shape` picks the decoder size ("tiny" or "0.5b"); `text_overrides` / `vision_overrides`
    change config fields; `corpus` trains the tokenizer (`split_lines`: see make_tokenizer);
    `image_size` is the SigLIP input size of
    LLaVA-OneVision; `max_pixels`/`min_pixels` bound Qwen's frame size; `rope_theta` is the
    decoder's RoPE base (Qwen's M-RoPE sections included; real Qwen2-VL checkpoints use 1e6; also
    LLaVA-OneVision's decoder);
    `mrope_section` splits Qwen's rotary frequencies (highest first) over the temporal, height and
    width axes (default: Qwen's 16/24/24 of 64, scaled to the head size).
    `max_crops` bounds LLaVA-OneVision's AnyRes grid: pinpoints of every i x j crops of
    `image_size` px with i, j <= max_crops (default 2: up to 2 x 2). `vision_overrides` also
    applies to LLaVA-OneVision's SigLIP tower.
    """
    from transformers import (
        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor,
    )

    if family not in FAMILIES + IMAGE_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES + IMAGE_FAMILIES}")
    if shape not in TEXT_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(TEXT_SHAPES)}")
    torch.manual_seed(seed)
    text = dict(TEXT_SHAPES[shape], **(text_overrides or {}))
    head_dim = text["hidden_size"] // text["num_attention_heads"]

    if family in ("qwen2_vl", "qwen2_5_vl"):
        tok = make_tokenizer(QWEN_SPECIAL, corpus, vocab_size, split_lines)
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
        text_cfg = dict(text, vocab_size=len(tok), max_position_embeddings=32768,
                        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta),
                                         "mrope_section": _check_section(mrope_section, head_dim)},
                        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
        tok_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                       vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        img_proc = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        vid_proc = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        out_hidden = text["hidden_size"]
        if family == "qwen2_5_vl":
            cfg = Qwen2_5_VLConfig(
                text_config=text_cfg,
                vision_config=dict(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                        out_hidden_size=out_hidden, fullatt_block_indexes=[1], window_size=112,
                                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                        tokens_per_second=2), **(vision_overrides or {})),
                **tok_ids)
            model = Qwen2_5_VLForConditionalGeneration(cfg)
            proc = Qwen2_5_VLProcessor(image_processor=img_proc, tokenizer=tok, video_processor=vid_proc,
                                       chat_template=QWEN_TEMPLATE)
        else:
            cfg = Qwen2VLConfig(
                text_config=text_cfg,
                vision_config=dict(dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=out_hidden,
                                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                                   **(vision_overrides or {})),
                **tok_ids)
            model = Qwen2VLForConditionalGeneration(cfg)
            proc = Qwen2VLProcessor(image_processor=img_proc, tokenizer=tok, video_processor=vid_proc,
                                    chat_template=QWEN_TEMPLATE)
    elif family == "llava_next":
        model, proc = _llava_next(text, corpus, vocab_size, image_size, split_lines)
    else:
        tok = make_tokenizer(LLAVA_SPECIAL, corpus, vocab_size, split_lines)
        ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
        size = image_size
        cfg = LlavaOnevisionConfig(
            text_config=dict(text, model_type="qwen2", vocab_size=len(tok), max_position_embeddings=32768,
                             rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
                             bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                             pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
            vision_config=dict(dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, image_size=size, patch_size=14),
                               **(vision_overrides or {})),
            image_token_index=ids["<image>"], video_token_index=ids["<video>"],
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=[[i * size, j * size] for i in range(1, max_crops + 1)
                                  for j in range(1, max_crops + 1)],
        )
        model = LlavaOnevisionForConditionalGeneration(cfg)
        img = LlavaOnevisionImageProcessor(size={"height": size, "width": size},
                                           image_grid_pinpoints=cfg.image_grid_pinpoints)
        vid = LlavaOnevisionVideoProcessor(size={"height": size, "width": size})
        proc = LlavaOnevisionProcessor(image_processor=img, tokenizer=tok, video_processor=vid,
                                       num_image_tokens=(size // 14) ** 2, vision_feature_select_strategy="full",
                                       chat_template=LLAVA_TEMPLATE)
    model.generation_config.do_sample = False
    return model, proc


def _llava_next(text: dict, corpus, vocab_size: int, size: int, split_lines: bool = False):
    """LLaVA-NeXT: CLIP (with [CLS]) at `size` px, features from layer -2 without [CLS] ("default"),
    AnyRes pinpoints up to 2 x 2 and 1 x 3 crops, a Qwen2-shaped decoder."""
    from transformers import (
        LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor,
    )

    tok = make_tokenizer(LLAVA_SPECIAL, corpus, vocab_size, split_lines)
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
    pinpoints = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size], [size, 3 * size]]
    cfg = LlavaNextConfig(
        text_config=dict(text, model_type="qwen2", vocab_size=len(tok), max_position_embeddings=32768,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=size, patch_size=14,
                           projection_dim=32),
        image_token_index=ids["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
    )
    model = LlavaNextForConditionalGeneration(cfg)
    img = LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=img, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE)
    return model, proc
