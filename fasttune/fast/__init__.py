"""fasttune's fast training path: fused LoRA blocks, fused loss, padding-free batches, offloaded checkpointing.

Everything is opt-in on a model instance: ``patch_model(model)`` / ``unpatch_model(model)``,
``enable_checkpointing(model, mode)``; for the trainer, ``PaddingFreeCollator`` (``data_collator=``) and
``FastLossMixin`` (``class T(FastLossMixin, SFTTrainer)``) so TRL uses the fused loss.
"""

from .checkpointing import enable_checkpointing
from .padding_free import PaddingFreeCollator, packed_attention_implementation
from .patch import FAST_PATHS, is_patched, patch_model, unpatch_model
from .trl_loss import FastLossMixin

__all__ = [
    "FAST_PATHS",
    "FastLossMixin",
    "PaddingFreeCollator",
    "enable_checkpointing",
    "is_patched",
    "packed_attention_implementation",
    "patch_model",
    "unpatch_model",
]
