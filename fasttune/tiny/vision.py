"""Tiny random vision-language models of real architectures, with their processors, built offline.

``build_tiny_vlm("qwen2_vl", path)`` writes a folder that ``FastVisionModel.from_pretrained(path)`` (or plain
transformers, where torchvision is installed for the families with video) loads like a Hub checkpoint: config,
safetensors weights, the image processor (PIL backend), a byte-level BPE tokenizer trained on the spot with the
family's image markers as special tokens, and a chat template that places image markers the way the real model's
template does. Shapes are tiny (text tower: 2 layers, hidden 128; vision tower: 2 layers, hidden 64; images of
56-64 pixels a side) so CPU tests train them in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, PreTrainedTokenizerBase

from .tokenizer import build_tokenizer

# Chat templates of the tiny processors. Each renders ``messages`` whose content is a string or a list of
# ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts, in the layout of its family's released template.
_PARTS = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}IMAGE{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
          "{% endfor %}{% endif %}")

_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + _PARTS + "<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
          "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n" + _PARTS + "<end_of_turn>\n{% endfor %}"
          "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n" + _PARTS
           + "<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
           "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_LLAVA = ("{% for m in messages %}{{ 'USER' if m['role'] == 'user' else 'ASSISTANT' if m['role'] == 'assistant' "
          "else 'SYSTEM' }}: " + _PARTS + "{{ eos_token if m['role'] == 'assistant' else '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


@dataclass(frozen=True)
class TinyVLM:
    """How one family's tiny VLM is built: its config's model_type, tokens and template, processor settings."""

    model_type: str
    text_family: str  # fasttune/tiny tokenizer convention (bos/eos/pad)
    image_markers: tuple[str, ...]  # special tokens the image placeholders use
    template: str
    image_marker: str  # what the template writes for one image
    config: dict[str, Any] = field(default_factory=dict)


_TEXT: dict[str, Any] = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6)

TINY_VLMS: dict[str, TinyVLM] = {
    "qwen2_vl": TinyVLM(
        "qwen2_vl", "qwen2", ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"), _CHATML,
        "<|vision_start|><|image_pad|><|vision_end|>",
        dict(vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                                spatial_merge_size=2, temporal_patch_size=2),
             text_rope={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}),
    ),
    "qwen2_5_vl": TinyVLM(
        "qwen2_5_vl", "qwen2", ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"), _CHATML,
        "<|vision_start|><|image_pad|><|vision_end|>",
        dict(vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                                fullatt_block_indexes=[1]),
             text_rope={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}),
    ),
    "gemma3": TinyVLM(
        "gemma3", "gemma3", ("<start_of_image>", "<end_of_image>", "<image_soft_token>"), _GEMMA, "<start_of_image>",
        dict(vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8,
                                vision_use_head=False),
             mm_tokens_per_image=16,
             text=dict(query_pre_attn_scalar=32, sliding_window=64, sliding_window_pattern=2,
                       hidden_activation="gelu_pytorch_tanh")),
    ),
    "mllama": TinyVLM(
        "mllama", "llama", ("<|image|>",), _LLAMA3, "<|image|>",
        dict(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=4, image_size=28, patch_size=14, max_num_tiles=4,
                                intermediate_layers_indices=[0, 1], vision_output_dim=192),
             text=dict(cross_attention_layers=[1])),
    ),
    "llava": TinyVLM(
        "llava", "llama", ("<image>",), _LLAVA, "<image>\n",
        dict(vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
                                projection_dim=64),
             text=dict(model_type="llama")),
    ),
}
FAMILIES: tuple[str, ...] = tuple(TINY_VLMS)

# The token each family's chat template ends a turn with, where it is not the tokenizer's eos: generation stops there.
END_OF_TURN: dict[str, str] = {"qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "gemma3": "<end_of_turn>",
                               "mllama": "<|eot_id|>"}


def build_tiny_vlm_tokenizer(family: str, extra_texts: list[str] | None = None) -> PreTrainedTokenizerBase:
    """The family's tiny tokenizer with its image markers added as special tokens."""
    spec = _spec(family)
    tokenizer = build_tokenizer(spec.text_family, extra_texts=extra_texts)
    tokenizer.add_special_tokens({"additional_special_tokens": list(spec.image_markers)},
                                 replace_extra_special_tokens=False)
    if family == "gemma3":  # Gemma3Processor reads these names off the tokenizer (as its released tokenizer has them)
        tokenizer = type(tokenizer)(
            tokenizer_object=tokenizer.backend_tokenizer, bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token,
            clean_up_tokenization_spaces=False, model_max_length=tokenizer.model_max_length,
            extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                  "image_token": "<image_soft_token>"})
    return tokenizer


def _spec(family: str) -> TinyVLM:
    if family not in TINY_VLMS:
        raise ValueError(f"family: {family!r} has no tiny vision-language model; choose one of {list(FAMILIES)}")
    return TINY_VLMS[family]


def tiny_vlm_config(family: str, tokenizer: PreTrainedTokenizerBase, **text_overrides: Any):
    """The tiny config of ``family`` sized to ``tokenizer``."""
    spec = _spec(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.image_markers}
    vocab = -(-len(tokenizer) // 64) * 64
    extra = dict(spec.config)
    text = {**_TEXT, **extra.pop("text", {}), "vocab_size": vocab, **text_overrides,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    rope = extra.pop("text_rope", None)
    if rope is not None:  # a caller's rope_parameters (e.g. sections for another head_dim) wins
        text.setdefault("rope_parameters", rope)
    vision = dict(extra.pop("vision_config"))  # a copy: the family table is shared
    if family == "qwen2_vl":  # the merger's output width is the text width
        vision["hidden_size"] = text["hidden_size"]
    elif family == "qwen2_5_vl":
        vision["out_hidden_size"] = text["hidden_size"]
    kwargs: dict[str, Any] = dict(text_config=text, vision_config=vision, **extra)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        kwargs.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                      tie_word_embeddings=True)
        text["tie_word_embeddings"] = True
    elif family == "gemma3":
        kwargs.update(boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                      image_token_index=ids["<image_soft_token>"])
    elif family == "mllama":
        kwargs.update(image_token_index=ids["<|image|>"])
    elif family == "llava":
        kwargs.update(image_token_index=ids["<image>"], vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return AutoConfig.for_model(spec.model_type, **kwargs)


def _image_processor(family: str):
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # 56x56 .. 112x112 pixels: 16 to 64 patches of 14, 4 to 16 tokens after the 2x2 merge. Qwen2.5-VL's window
        # attention works on 112-pixel windows (its released value, which llama.cpp assumes), so its images may be
        # twice as wide and tall: up to 4 windows.
        side = 224 if family == "qwen2_5_vl" else 112
        return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=side * side)
    if family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        return Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    if family == "mllama":
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        return MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})


def build_tiny_processor(family: str, tokenizer: PreTrainedTokenizerBase | None = None):
    """The family's processor around its tiny tokenizer (image-only where its video part needs torchvision)."""
    import transformers

    from fasttune.vision.processor import image_only

    spec = _spec(family)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_vlm_tokenizer(family)
    template = spec.template.replace("IMAGE", spec.image_marker)
    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "gemma3": "Gemma3Processor",
            "mllama": "MllamaProcessor", "llava": "LlavaProcessor"}[family]
    cls = image_only(getattr(transformers, name))
    kwargs: dict[str, Any] = {}
    if family == "gemma3":
        kwargs["image_seq_length"] = spec.config["mm_tokens_per_image"]
    if family == "llava":
        kwargs.update(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return cls(image_processor=_image_processor(family), tokenizer=tokenizer, chat_template=template, **kwargs)


def _spread_flat_weights(model: torch.nn.Module, seed: int) -> None:
    """Give parameters that initialise to a constant (zero projections and biases, all-ones norms) small random values,
    so a test sees every weight used and an export that drops or misplaces one fails."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(0.05 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def build_tiny_vlm(
    family: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    extra_texts: list[str] | None = None,
    **text_overrides: Any,
) -> Path:
    """Write a random ``family`` vision-language model and its processor to ``out_dir``; return the folder."""
    out = Path(out_dir)
    tokenizer = build_tiny_vlm_tokenizer(family, extra_texts)
    config = tiny_vlm_config(family, tokenizer, **text_overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    _spread_flat_weights(model, seed)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[family]) if family in END_OF_TURN else None
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=[t for t in (end_of_turn, tokenizer.eos_token_id)
                                                             if t is not None],
                                               pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tiny_processor(family, tokenizer).save_pretrained(out)
    return out
