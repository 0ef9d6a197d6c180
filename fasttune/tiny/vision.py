"""Tiny random vision-language models of real architectures, with their processors, built offline.

``build_tiny_vlm("qwen2_vl", path)`` writes a folder that ``FastVisionModel.from_pretrained(path)`` (or plain
transformers, where torchvision is installed for the families with video) loads like a Hub checkpoint: config,
safetensors weights, the image processor (PIL backend), a byte-level BPE tokenizer trained on the spot with the
family's image markers as special tokens, and a chat template that places image markers the way the real model's
template does. Shapes are tiny (text tower: 2 layers, hidden 128; vision tower: 2 layers, hidden 64; images of
56-64 pixels a side) so CPU tests train them in seconds.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, PreTrainedTokenizerBase

from fasttune.models import TinyVisionSpec, vision_families

from .tokenizer import build_tokenizer

_TEXT: dict[str, Any] = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6)

# Families with a tiny VLM, in registry order; each one's configs, markers and processor live in its
# fasttune/models/<family>.py (``VISION.tiny``).
_TINY: dict[str, TinyVisionSpec] = {v.family: v.tiny for v in vision_families() if v.tiny is not None}
_MODEL_TYPES: dict[str, str] = {v.family: v.model_type for v in vision_families() if v.tiny is not None}
FAMILIES: tuple[str, ...] = tuple(_TINY)


def build_tiny_vlm_tokenizer(family: str, extra_texts: list[str] | None = None) -> PreTrainedTokenizerBase:
    """The family's tiny tokenizer with its image markers added as special tokens."""
    tiny = _tiny(family)
    tokenizer = build_tokenizer(tiny.tokenizer.family, extra_texts=extra_texts)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tiny.image_markers)},
                                 replace_extra_special_tokens=False)
    if tiny.tokenizer_names:  # the processor reads these names off the tokenizer (as its released tokenizer has them)
        tokenizer = type(tokenizer)(
            tokenizer_object=tokenizer.backend_tokenizer, bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token,
            clean_up_tokenization_spaces=False, model_max_length=tokenizer.model_max_length,
            extra_special_tokens=dict(tiny.tokenizer_names))
    return tokenizer


def _tiny(family: str) -> TinyVisionSpec:
    if family not in _TINY:
        raise ValueError(f"family: {family!r} has no tiny vision-language model; choose one of {list(FAMILIES)}")
    return _TINY[family]


def tiny_vlm_config(family: str, tokenizer: PreTrainedTokenizerBase, vision_overrides: dict | None = None,
                    **text_overrides: Any):
    """The tiny config of ``family`` sized to ``tokenizer`` (``vision_overrides``: vision config fields to change)."""
    tiny = _tiny(family)
    vocab = -(-len(tokenizer) // 64) * 64
    text = {**_TEXT, **tiny.text, "vocab_size": vocab, **text_overrides, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {**tiny.vision, **(vision_overrides or {})}  # a copy: the family's spec is shared
    if tiny.vision_width is not None:
        vision[tiny.vision_width] = text["hidden_size"]
    ids = {key: tokenizer.convert_tokens_to_ids(marker) for key, marker in tiny.token_ids.items()}
    return AutoConfig.for_model(_MODEL_TYPES[family], text_config=text, vision_config=vision, **tiny.config, **ids)


def _image_processor(family: str):
    path, kwargs = _tiny(family).image_processor
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def build_tiny_processor(family: str, tokenizer: PreTrainedTokenizerBase | None = None):
    """The family's processor around its tiny tokenizer (image-only where its video part needs torchvision)."""
    import transformers

    from fasttune.vision.processor import image_only

    tiny = _tiny(family)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_vlm_tokenizer(family)
    template = tiny.template.replace("IMAGE", tiny.image_marker)
    cls = image_only(getattr(transformers, tiny.processor))
    return cls(image_processor=_image_processor(family), tokenizer=tokenizer, chat_template=template,
               **tiny.processor_kwargs)


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
    vision_overrides: dict | None = None,
    **text_overrides: Any,
) -> Path:
    """Write a random ``family`` vision-language model and its processor to ``out_dir``; return the folder."""
    out = Path(out_dir)
    tokenizer = build_tiny_vlm_tokenizer(family, extra_texts)
    config = tiny_vlm_config(family, tokenizer, vision_overrides, **text_overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    _spread_flat_weights(model, seed)
    marker = _tiny(family).end_of_turn
    end_of_turn = tokenizer.convert_tokens_to_ids(marker) if marker is not None else None
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=[t for t in (end_of_turn, tokenizer.eos_token_id)
                                                             if t is not None],
                                               pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tiny_processor(family, tokenizer).save_pretrained(out)
    return out
