"""Keep trainable adapter weights in the dtype peft gave them (fp32), whoever casts them after fasttune returns.

Why: TRL's trainers cast every trainable parameter of a 4-bit or 8-bit model to bf16 while the trainer is built
(``trl/trainer/sft_trainer.py`` lines 908-911 in TRL 1.16, "following the QLoRA paper"), whatever ``bf16`` says.
Training then updates bf16 adapters and checkpoints store bf16; ``trainer.train(resume_from_checkpoint=...)`` reloads
them through ``PeftModel.load_adapter``, which upcasts adapters to fp32 (``peft/peft_model.py`` line 1597,
``autocast_adapter_dtype=True``), so the resumed run trains in another dtype and its losses drift. The QLoRA paper asks
for bf16 *compute*; peft stores adapters in fp32 on purpose (small updates vanish in bf16 storage).

:func:`keep_adapter_dtype` (called by ``FastLanguageModel.get_peft_model``) records each trainable parameter's dtype
and restores it, through two hooks on the transformers model inside the peft wrapper (no library class or source is
changed), at the two moments that matter:

- before every forward: the first training step, and the optimizer state created at it, are fp32;
- before any ``load_state_dict`` into the model: a checkpoint's fp32 values are copied into fp32 parameters instead
  of being rounded to bf16 on the way in (Trainer resume -> ``load_adapter`` -> ``load_state_dict``).

Between ``SFTTrainer(...)`` and the first forward the adapters still read as bf16 (TRL's cast has rounded their
initial values, identically in every run). :func:`release_adapter_dtype` removes the hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import nn
from torch.utils.hooks import RemovableHandle

from .unwrap import base_model

_GUARD = "_fasttune_adapter_dtype_guard"


@dataclass
class AdapterDtypeGuard:
    """The trainable parameters of one model with the dtype each must keep, and the hooks that restore it."""

    params: list[tuple[nn.Parameter, torch.dtype]]
    handles: list[RemovableHandle] = field(default_factory=list)

    def restore(self) -> int:
        """Cast every recorded parameter whose dtype changed back to its recorded dtype; returns how many were."""
        changed = 0
        for param, dtype in self.params:
            if param.dtype != dtype:
                param.data = param.data.to(dtype)  # same Parameter object: optimizers keep pointing at it
                changed += 1
        return changed

    def hook(self, *_: object) -> None:
        """Forward pre-hook and load-state-dict pre-hook: restore, return None (a value would replace the inputs).

        A bound method, not a closure, so ``copy.deepcopy(model)`` binds the copy's hooks to the copy's parameters.
        """
        self.restore()


def keep_adapter_dtype(model: PeftModel) -> AdapterDtypeGuard:
    """Make ``model``'s trainable parameters keep their current dtype (fp32 adapters stay fp32). Idempotent.

    Call it after the adapters exist and their trainability is set; calling it again re-records the parameters.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"model: keep_adapter_dtype needs a peft PeftModel, got {type(model).__name__}")
    release_adapter_dtype(model)
    guard = AdapterDtypeGuard([(p, p.dtype) for p in model.parameters() if p.requires_grad])
    inner = base_model(model)  # every forward and every state-dict load of ``model`` passes through it
    guard.handles.append(inner.register_forward_pre_hook(guard.hook))
    guard.handles.append(inner.register_load_state_dict_pre_hook(guard.hook))
    setattr(model, _GUARD, guard)
    return guard


def release_adapter_dtype(model: PeftModel) -> bool:
    """Remove the hooks :func:`keep_adapter_dtype` installed on ``model``; False if there were none."""
    guard = model.__dict__.pop(_GUARD, None)
    if guard is None:
        return False
    for handle in guard.handles:
        handle.remove()
    return True


def adapter_dtype_guard(model: nn.Module) -> AdapterDtypeGuard | None:
    """The guard installed on ``model`` (None when its adapter dtypes are not kept)."""
    return model.__dict__.get(_GUARD)


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``model``'s trainable weights, by name: taken before code that casts them (TRL's trainer init casts
    a quantized model's to bf16, rounding their values), put back exactly by :func:`restore_snapshot`."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore_snapshot(model: nn.Module, saved: dict[str, torch.Tensor]) -> int:
    """Put back the values and dtypes of :func:`snapshot_trainable` where a weight's dtype changed; returns how many.

    Assigning ``.data`` keeps each Parameter object, so optimizers built meanwhile still point at it.
    """
    restored = 0
    for name, param in model.named_parameters():
        value = saved.get(name)
        if value is not None and param.dtype != value.dtype:
            param.data = value
            restored += 1
    return restored
