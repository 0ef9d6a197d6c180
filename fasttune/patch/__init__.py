"""The only code that changes a model instance: fused forwards, the fused-loss forward, packed attention, checkpointing.

Everything is opt-in on the instance it is given and can be undone: ``patch_model(model)`` / ``unpatch_model(model)``
(fused LoRA blocks, norms and the label-only loss for a registered family), ``enable_checkpointing(model, mode)`` and
``set_gradient_checkpointing(model, mode)`` (which also remembers the mode). The maths these forwards call lives in
:mod:`fasttune.kernels`; the trainer pieces that feed them (collator, loss mixin) live in :mod:`fasttune.train`.
"""

from .checkpointing import enable_checkpointing, is_checkpointing, set_gradient_checkpointing
from .model import FAST_PATHS, is_patched, patch_model, unpatch_model

__all__ = [
    "FAST_PATHS",
    "enable_checkpointing",
    "is_checkpointing",
    "is_patched",
    "patch_model",
    "set_gradient_checkpointing",
    "unpatch_model",
]
