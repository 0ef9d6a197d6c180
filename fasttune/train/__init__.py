"""Trainer pieces: the padding-free collator, the fused-loss mixin, and the TRL drop-ins of ``fasttune.trl``.

``PaddingFreeCollator`` (``data_collator=``) and ``FastLossMixin`` (``class T(FastLossMixin, SFTTrainer)``) let any TRL
trainer use fasttune's fast path; ``fasttune.trl`` assembles them into TRL's names with the Unsloth-era arguments.
"""

from .fused_loss import FastLossMixin
from .padding_free import PaddingFreeCollator, packed_attention_implementation

__all__ = ["FastLossMixin", "PaddingFreeCollator", "packed_attention_implementation"]
