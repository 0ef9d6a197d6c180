"""What ``fasttune.trl.ORPOTrainer`` adds to TRL's: exact gradient accumulation.

ORPO's loss is ``NLL(chosen) - mean(odds-ratio term)``. TRL takes the NLL as a token mean over each micro-batch's
chosen sequences, and the Trainer divides each micro-batch's loss by the accumulation steps, so with
``gradient_accumulation_steps=k`` a token in a short micro-batch weighs more than one in a long micro-batch, and the
step differs from one batch k times larger (tested in tests/rl/test_preference.py). Here each micro-batch's NLL is
rescaled by ``its tokens * k / the window's tokens``: the sum over the window is then the window's token mean, exactly.
Under DDP/FSDP the window is every rank's micro-batches: its tokens are summed over the ranks, and the factor is
multiplied by the world size, which the gradient average over the ranks divides out again (so 2 processes x batch 2
equal 1 x batch 4, tested in tests/distributed). The odds-ratio term is a mean over pairs, already exact for equal
micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch


def chosen_tokens(batch: dict[str, Any]) -> int:
    """Tokens TRL's chosen NLL averages over (every attended chosen position after the first)."""
    return int(batch["chosen_attention_mask"][:, 1:].sum())


class FastORPOMixin:
    """Mixed in before TRL's ``ORPOTrainer`` (see the module docstring)."""

    _fasttune_window_tokens: int | None = None

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        window = sum(chosen_tokens(b) for b in batches if "chosen_attention_mask" in b)
        if self.accelerator.num_processes > 1:  # the window spans every rank's micro-batches
            window = int(self.accelerator.reduce(torch.tensor(window, device=self.accelerator.device), "sum"))
        self._fasttune_window_tokens = window or None
        return batches, num_items

    def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple:
        outputs = super().concatenated_forward(model, batch)
        window = self._fasttune_window_tokens
        if not self.model.training or window is None or "chosen_attention_mask" not in batch:
            return outputs
        factor = (chosen_tokens(batch) * self.current_gradient_accumulation_steps * self.accelerator.num_processes
                  / window)
        return (*outputs[:4], outputs[4] * torch.as_tensor(factor, dtype=outputs[4].dtype), *outputs[5:])
