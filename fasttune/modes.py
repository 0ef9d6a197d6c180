"""Per-instance switches shared by the facades: training vs inference mode, and the Unsloth-style bound methods."""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from . import export
from .lora.unwrap import base_model
from .patch.checkpointing import pause_checkpointing, remembered_mode, set_gradient_checkpointing
from .rl import RL_METHODS

EXPORT_METHODS: tuple[str, ...] = (
    "save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf"
)


def attach_model_methods(model: nn.Module) -> None:
    """Unsloth-style ``model.save_pretrained_merged(...)``, ``model.fast_generate(...)``, ``model.save_lora(...)``
    etc., bound on this instance only (no class is touched)."""
    for name in EXPORT_METHODS:
        setattr(model, name, types.MethodType(getattr(export, name), model))
    for name, function in RL_METHODS.items():
        setattr(model, name, types.MethodType(function, model))


def for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, no checkpointing, KV cache on, left padding (for batched ``generate``)."""
    model.eval()
    _set_mode_state(model, training=False)
    return model


def for_training(model: nn.Module, use_gradient_checkpointing: Any = None) -> nn.Module:
    """Undo :func:`for_inference`: train mode, checkpointing as before, KV cache off, right padding."""
    model.train()
    _set_mode_state(model, training=True, use_gradient_checkpointing=use_gradient_checkpointing)
    return model


def _set_mode_state(model: nn.Module, training: bool, use_gradient_checkpointing: Any = None) -> None:
    base = base_model(model)
    tokenizer = getattr(base, "fasttune_tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "right" if training else "left"
    base.config.use_cache = not training
    if training:
        mode = use_gradient_checkpointing
        if mode is None:
            mode = remembered_mode(base) or False
        set_gradient_checkpointing(model, mode)
    else:
        pause_checkpointing(base)
