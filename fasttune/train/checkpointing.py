"""Gradient checkpointing switch shared by the loader, the mode helpers and the TRL drop-ins.

The mode the user chose in ``get_peft_model(use_gradient_checkpointing=...)`` is remembered on the transformers model as
``fasttune_checkpointing`` and must be the one that runs. TRL's configs default to ``gradient_checkpointing=True``, and
the Trainer then calls ``model.activation_checkpointing_enable()``, which would install torch's checkpointing over it
(or turn checkpointing on when the user chose ``False``). Two guards, both on instances only:

* :func:`set_gradient_checkpointing` gives the model instance its own ``activation_checkpointing_enable`` /
  ``gradient_checkpointing_enable`` that (re)apply the remembered mode, so plain ``trl.SFTTrainer`` runs it too;
* :func:`honour_checkpointing_mode` (``fasttune.trl``'s trainers) applies the mode and turns the config's flag off on
  the trainer's copy of the config, so the Trainer does not touch checkpointing at all.
"""

from __future__ import annotations

import types
from typing import Any

from peft import PeftModel
from torch import nn

from ..fast.checkpointing import enable_checkpointing
from .compat import note_once

_HOOKS = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_checkpointing(model: nn.Module) -> bool:
    base = _base(model)
    # transformers 5.x renamed gradient_* to activation_* (the old names warn); support both.
    flag = getattr(type(base), "is_activation_checkpointing", None)
    return bool(base.is_activation_checkpointing if flag is not None else base.is_gradient_checkpointing)


def remembered_mode(model: Any) -> bool | str | None:
    """The checkpointing mode fasttune remembers for ``model`` (True / False / "unsloth"), or None if none."""
    if not isinstance(model, nn.Module):
        return None
    return _base(model).__dict__.get("fasttune_checkpointing")


def set_gradient_checkpointing(model: nn.Module, mode: Any) -> None:
    """Turn activation recomputation on (``True`` / ``"unsloth"``) or off (``False`` / ``None``).

    Delegates to ``fasttune.fast.enable_checkpointing`` (``True``: non-reentrant recompute; ``"unsloth"``: only each
    decoder layer's input is kept, in pinned CPU memory on CUDA), remembers the mode as ``fasttune_checkpointing`` so
    ``for_training`` can restore it, and makes the instance's checkpointing-enable methods apply that mode.
    """
    base = _base(model)
    enable_checkpointing(base, False if mode is None else mode)
    base.fasttune_checkpointing = mode or False
    _install_enable_hooks(base)


def _enable_remembered(base: nn.Module, *args: Any, **kwargs: Any) -> None:
    """The instance's ``activation_checkpointing_enable``: apply the remembered mode; other options are noted."""
    mode = base.__dict__.get("fasttune_checkpointing", False)
    ignored = {k: v for k, v in kwargs.items()
               if not (v is None or v is False or v == {} or (k == "every_n_layers" and v == 1))}
    if args or ignored:
        note_once("checkpointing.options", f"checkpointing options {args or ignored} are ignored: the model runs "
                                           f"the mode chosen in get_peft_model ({mode!r})")
    if mode is False:
        note_once("checkpointing.off", "the trainer asked for gradient checkpointing, but get_peft_model chose "
                                       "use_gradient_checkpointing=False; it stays off (use "
                                       "FastLanguageModel.for_training(model, use_gradient_checkpointing=...))")
        return
    enable_checkpointing(base, mode)


def _install_enable_hooks(base: nn.Module) -> None:
    """``base.activation_checkpointing_enable(...)`` (what the Trainer calls) applies the remembered mode.

    Bound methods on the instance, so ``copy.deepcopy(model)`` (TRL's reference models) binds them to the copy.
    """
    for name in _HOOKS:
        base.__dict__[name] = types.MethodType(_enable_remembered, base)


def honour_checkpointing_mode(model: Any, config: Any) -> None:
    """Make the remembered mode the one that runs under a trainer built with ``config`` (a copy the trainer owns)."""
    mode = remembered_mode(model)
    if mode is None:
        return
    asked = bool(getattr(config, "activation_checkpointing", False) or getattr(config, "gradient_checkpointing", False))
    if asked and mode != "unsloth" and mode is not True:
        note_once("checkpointing.config", "the config's gradient_checkpointing=True is not applied: the model runs the "
                                          f"mode chosen in get_peft_model ({mode!r})")
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if hasattr(config, name):
            setattr(config, name, False)
    enable_checkpointing(_base(model), mode)
