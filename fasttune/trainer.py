"""Unsloth-compatible module for trainer helpers: ``from fasttune.trainer import ...``."""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from fasttune.device import device_args
from fasttune.fast import FastLossMixin, PaddingFreeCollator


class FastSFTTrainer(FastLossMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with fasttune's defaults: padding-free batches and the fused, label-only loss.

    Same arguments as ``SFTTrainer``; ``data_collator`` defaults to :class:`PaddingFreeCollator`. The model should
    come from ``FastLanguageModel`` (its fast path answers ``labels`` with the fused loss). TRL's ``entropy`` and
    ``mean_token_accuracy`` metrics are not logged (they need the full logits, which the fused loss never builds).
    """

    def __init__(self, *args: Any, data_collator: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, data_collator=data_collator or PaddingFreeCollator(), **kwargs)


__all__ = ["FastSFTTrainer", "PaddingFreeCollator", "device_args"]
