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
    """Turn activation recomputation on (``True`` / ``"unsloth"``) or off (``False`` / ``None``).

    Delegates to ``fasttune.fast.enable_checkpointing`` (``True``: non-reentrant recompute; ``"unsloth"``: only each
    decoder layer's input is kept, in pinned CPU memory on CUDA) and remembers the mode as ``fasttune_checkpointing``
    so ``for_training`` can restore it.
    """
    base = _base(model)
    enable_checkpointing(base, False if mode is None else mode)
    base.fasttune_checkpointing = mode or False
