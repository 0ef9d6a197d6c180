"""Let TRL's ``SFTTrainer`` train with fasttune's fused loss.

TRL 1.x's ``SFTTrainer`` wraps the model's forward with its own fused LM head and calls
``model(**inputs, fused_lm_head=True)``; on CPU that head scores *every* position (prompt and padding included) and
also computes entropy and top-1 metrics. ``FastLossMixin`` replaces ``compute_loss`` so the trainer calls the model
with ``labels`` and ``num_items_in_batch`` instead, which a model patched by :func:`fasttune.fast.patch_model`
answers with :func:`fasttune.kernels.fused_linear_cross_entropy` (only labelled positions reach the lm_head).

    class FastSFTTrainer(FastLossMixin, SFTTrainer): ...

Trade-off: TRL's ``entropy`` and ``mean_token_accuracy`` metrics are not logged (they need the full distribution).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FastLossMixin:
    """``compute_loss`` that asks the model for its own (fused) loss; mix in before ``SFTTrainer``."""

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: int | torch.Tensor | None = None):
        inputs = {**inputs, "use_cache": False}
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        loss = outputs.loss
        if loss is None:
            raise ValueError("FastLossMixin: the model returned no loss; the batch must contain 'labels'")
        args = getattr(self, "args", None)
        if args is not None and args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
