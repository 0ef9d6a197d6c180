"""Unsloth-compatible module for trainer helpers: ``from fasttune.trainer import ...``."""

from __future__ import annotations

from fasttune.device import device_args
from fasttune.train import PaddingFreeCollator
from fasttune.train.sft import SFTTrainer
from fasttune.vision.collator import UnslothVisionDataCollator

FastSFTTrainer = SFTTrainer
"""The same class as ``fasttune.trl.SFTTrainer``: TRL's ``SFTTrainer`` with the Unsloth-era arguments, the fused
label-only loss (logging TRL's ``entropy`` and ``mean_token_accuracy``) and padding-free batches by default."""

__all__ = ["FastSFTTrainer", "PaddingFreeCollator", "UnslothVisionDataCollator", "device_args"]
