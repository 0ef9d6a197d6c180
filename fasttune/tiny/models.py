"""Tiny random models of real architectures, built from configs (no hub access).

``build_tiny_model("qwen2", path)`` writes a folder that ``FastLanguageModel.from_pretrained(path)`` (or plain
transformers) loads like any checkpoint: config.json, safetensors weights, generation config and a tokenizer trained
offline. The default shape (4 layers, hidden 256, intermediate 688) is small enough for CPU tests and deliberately
has an intermediate size that is not a multiple of 32, a shape that breaks bitsandbytes' CPU 4-bit kernel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from fasttune.models import families

from .tokenizer import build_tokenizer

# Families with a tiny model, in registry order; each one's config overrides live in fasttune/models/<family>.py.
_SPECS = {spec.family: spec for spec in families() if spec.tiny is not None}
FAMILIES: tuple[str, ...] = tuple(_SPECS)

# model_type used by transformers for each family's text-only causal LM.
MODEL_TYPES: dict[str, str] = {name: spec.model_type for name, spec in _SPECS.items()}

_COMMON: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)


def tiny_config(family: str, tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> PretrainedConfig:
    """A small config of ``family`` sized to ``tokenizer`` (vocab rounded up to a multiple of 64)."""
    if family not in MODEL_TYPES:
        raise ValueError(f"family: {family!r} is not a tiny-model family; choose one of {list(FAMILIES)}")
    vocab = -(-len(tokenizer) // 64) * 64
    tiny = _SPECS[family].tiny
    kwargs: dict[str, Any] = {**_COMMON, **tiny.config, "vocab_size": vocab, **overrides}
    for key in tiny.drop:
        kwargs.pop(key, None)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    return AutoConfig.for_model(MODEL_TYPES[family], **kwargs)


def build_tiny_model(
    family: str,
    out_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """Write a random ``family`` model and its tokenizer to ``out_dir`` and return the folder."""
    out = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family)
    config = tiny_config(family, tokenizer, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _spread_norm_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _spread_norm_weights(model: torch.nn.Module, seed: int) -> None:
    """Give norm weights small random offsets so tests see a non-trivial norm (fresh init is all ones/zeros)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(0.05 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
