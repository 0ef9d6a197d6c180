"""Gradient checkpointing switch shared by the loader and the mode helpers."""

from __future__ import annotations

from typing import Any

from peft import PeftModel
from torch import nn

from ..fast.checkpointing import enable_checkpointing


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_checkpointing(model: nn.Module) -> bool:
    base = _base(model)
    # transformers 5.x renamed gradient_* to activation_* (the old names warn); support both.
    flag = getattr(type(base), "is_activation_checkpointing", None)
    return bool(base.is_activation_checkpointing if flag is not None else base.is_gradient_checkpointing)


def set_gradient_checkpointing(model: nn.Module, mode: Any) -> None:
    """Turn activation recomputation on (``True`` / ``"unsloth"``) or off (``False``) on the underlying model.

    ``True`` is transformers' non-reentrant checkpointing; ``"unsloth"`` is ``fasttune.fast.enable_checkpointing``'s,
    which keeps only each decoder layer's input (in pinned CPU memory on CUDA) and saves several times less.

    Non-reentrant checkpointing is used, so inputs need no ``requires_grad`` trick and frozen embeddings are fine.
    The chosen mode is remembered as ``fasttune_checkpointing`` so ``for_training`` can restore it.
    """
    if mode not in (True, False, None, "unsloth"):
        raise ValueError(f"use_gradient_checkpointing: {mode!r} is not allowed; choose True, False or 'unsloth'")
    base = _base(model)
    if not mode:
        if is_checkpointing(base):
            (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
        base.fasttune_checkpointing = False
        return
    if mode == "unsloth":
        # fasttune's own: keeps only each layer's input (pinned host memory on CUDA), recomputes the layer in backward
        enable_checkpointing(base, "unsloth")
    elif hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.fasttune_checkpointing = mode
