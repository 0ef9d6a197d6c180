"""Gradient checkpointing on a model instance: which mode runs, and keeping it the one the user chose.

Modes (``use_gradient_checkpointing``, listed once in :data:`fasttune.config.GRADIENT_CHECKPOINTING_MODES`):
``True`` -> transformers' own checkpointing (non-reentrant), ``"unsloth"`` -> fasttune's offloaded checkpoint
(:mod:`fasttune.kernels.checkpoint`: only each decoder layer's input is kept, in pinned CPU memory on CUDA),
``False`` -> off. It plugs into transformers' per-layer hook (``_gradient_checkpointing_func`` of every
``GradientCheckpointingLayer``) on the instance; nothing global changes.

The mode the user chose in ``get_peft_model(use_gradient_checkpointing=...)`` is remembered on the transformers model
as ``fasttune_checkpointing`` (written only by :func:`set_gradient_checkpointing`) and must be the one that runs.
TRL's configs default to ``gradient_checkpointing=True``, and the Trainer then calls
``model.activation_checkpointing_enable()``, which would install torch's checkpointing over it (or turn checkpointing
on when the user chose ``False``). Two guards, both on instances only:

* :func:`set_gradient_checkpointing` gives the model instance its own ``activation_checkpointing_enable`` /
  ``gradient_checkpointing_enable`` that (re)apply the remembered mode, so plain ``trl.SFTTrainer`` runs it too;
* :func:`honour_checkpointing_mode` (``fasttune.trl``'s trainers) applies the mode and turns the config's flag off on
  the trainer's copy of the config, so the Trainer does not touch checkpointing at all.
"""

from __future__ import annotations

import os
import types
from functools import partial
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import GRADIENT_CHECKPOINTING_MODES as MODES
from ..kernels.checkpoint import offloaded_checkpoint
from ..lora.unwrap import base_model
from ..notes import note_once

_HOOKS = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def enable_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """Turn gradient checkpointing on the decoder layers of ``model`` on (``True`` / ``"unsloth"``) or off."""
    if mode not in MODES:
        raise ValueError(f"use_gradient_checkpointing: {mode!r} is not supported; choose one of {list(MODES)}")
    hf_model = base_model(model)
    if mode is False:
        hf_model._set_gradient_checkpointing(enable=False)
        return
    func = offloaded_checkpoint if mode == "unsloth" else partial(checkpoint, use_reentrant=False)
    hf_model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    if getattr(hf_model.config, "use_cache", False):
        hf_model.config.use_cache = False


def is_checkpointing(model: nn.Module) -> bool:
    base = base_model(model)
    # transformers 5.x renamed gradient_* to activation_* (the old names warn); support both.
    flag = getattr(type(base), "is_activation_checkpointing", None)
    return bool(base.is_activation_checkpointing if flag is not None else base.is_gradient_checkpointing)


def remembered_mode(model: Any) -> bool | str | None:
    """The checkpointing mode fasttune remembers for ``model`` (True / False / "unsloth"), or None if none."""
    if not isinstance(model, nn.Module):
        return None
    return base_model(model).__dict__.get("fasttune_checkpointing")


def set_gradient_checkpointing(model: nn.Module, mode: Any) -> None:
    """Turn activation recomputation on (``True`` / ``"unsloth"``) or off (``False`` / ``None``).

    Delegates to :func:`enable_checkpointing` (``True``: non-reentrant recompute; ``"unsloth"``: only each
    decoder layer's input is kept, in pinned CPU memory on CUDA), remembers the mode as ``fasttune_checkpointing`` so
    ``for_training`` can restore it, and makes the instance's checkpointing-enable methods apply that mode.
    """
    base = base_model(model)
    enable_checkpointing(base, False if mode is None else mode)
    base.fasttune_checkpointing = mode or False
    _install_enable_hooks(base)


def pause_checkpointing(model: nn.Module) -> None:
    """Turn checkpointing off for inference but keep the remembered mode, so ``for_training`` restores it."""
    base = base_model(model)
    if not is_checkpointing(base):
        return
    mode = base.__dict__.get("fasttune_checkpointing", True)
    enable_checkpointing(base, False)
    base.fasttune_checkpointing = mode


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


def _fsdp_checkpointing(config: Any) -> bool:
    """Whether FSDP's own activation checkpointing is asked for: in the Trainer's ``fsdp_config``, or by
    ``accelerate launch`` with an FSDP config (it exports ``FSDP_ACTIVATION_CHECKPOINTING``)."""
    fsdp_config = getattr(config, "fsdp_config", None) or {}
    if fsdp_config.get("activation_checkpointing") or fsdp_config.get("fsdp_activation_checkpointing"):
        return True
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true")


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
    if mode and _fsdp_checkpointing(config):
        raise ValueError(f"FSDP's activation checkpointing is on (fsdp_activation_checkpointing) and so is fasttune's "
                         f"(use_gradient_checkpointing={mode!r} in get_peft_model): every layer would be recomputed "
                         "twice. Set fsdp_activation_checkpointing: false in the accelerate config / fsdp_config "
                         "(fasttune's checkpointing applies under FSDP2, tested), or use_gradient_checkpointing=False")
    if mode == "unsloth" and hasattr(config, "ddp_find_unused_parameters"):
        # "unsloth" recomputes each layer inside backward (reentrant), so DDP's search for unused parameters would
        # mark the layer's parameters ready twice ("Expected to mark a variable ready only once"); every parameter
        # of a LoRA model is used in every step, so the search finds nothing anyway
        if config.ddp_find_unused_parameters:
            raise ValueError("ddp_find_unused_parameters=True cannot run with use_gradient_checkpointing='unsloth' "
                             "under DDP (the layer recompute happens inside backward); leave it unset or False, or "
                             "choose use_gradient_checkpointing=True in get_peft_model")
        config.ddp_find_unused_parameters = False
    enable_checkpointing(base_model(model), mode)
