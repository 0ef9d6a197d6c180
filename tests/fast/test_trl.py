"""TRL SFTTrainer with fasttune's collator and loss: the same losses as TRL's defaults, step by step."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from fast_helpers import load_peft
from trl import SFTConfig, SFTTrainer

from fasttune.fast import PaddingFreeCollator, patch_model
from fasttune.fast.trl_loss import FastLossMixin


class FastSFTTrainer(FastLossMixin, SFTTrainer):
    pass


def _dataset(vocab: int) -> Dataset:
    gen = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(8):
        n = int(torch.randint(6, 30, (1,), generator=gen))
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "assistant_masks": [0] * (n // 2) + [1] * (n - n // 2)})
    return Dataset.from_list(rows)


@pytest.mark.slow
def test_sft_trainer_losses_match_trl_defaults(tiny_model_dir, tiny_tokenizer, tmp_path):
    losses = {}
    for fast in (False, True):
        model = load_peft(tiny_model_dir("llama"), seed=3)
        args = SFTConfig(output_dir=str(tmp_path / str(fast)), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, use_cpu=True, bf16=False, logging_steps=1, report_to=[],
                         save_strategy="no", seed=0, gradient_checkpointing=False, disable_tqdm=True)
        kwargs = dict(model=model, args=args, train_dataset=_dataset(model.config.vocab_size),
                      processing_class=tiny_tokenizer("llama"))
        if fast:
            patch_model(model)
            trainer = FastSFTTrainer(data_collator=PaddingFreeCollator(), **kwargs)
        else:
            trainer = SFTTrainer(**kwargs)
        trainer.train()
        losses[fast] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 3
    for step, (a, b) in enumerate(zip(losses[True], losses[False])):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: fasttune {a} vs TRL {b}"
