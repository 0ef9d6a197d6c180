"""SFT with TRL's SFTTrainer trains a fasttune QLoRA model of every supported family (loss goes down)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from fasttune import FastLanguageModel, device_args
from fasttune.tiny import FAMILIES

TEXTS = [f"Item {i}: the code for {w} is {w[::-1]}." for i, w in enumerate(["alpha", "delta", "omega", "sigma"] * 4)]


# QLoRA on three families, 16-bit LoRA on the rest: every family trains, and 4-bit is covered without tripling time.
QUANTIZED = {"llama", "qwen2", "gemma2"}


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_decreases(tiny_model_dir, tmp_path, family):
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(tiny_model_dir(family)), max_seq_length=64, load_in_4bit=family in QUANTIZED
    )
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=family == "llama")
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        max_length=64,
        seed=0,
        disable_tqdm=True,
        **device_args(),
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         args=args)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"{family}: loss {first:.3f} -> {last:.3f}"


def test_fast_sft_trainer_defaults_to_padding_free_and_learns(tiny_model_dir, tmp_path):
    from fasttune.trainer import FastSFTTrainer, PaddingFreeCollator

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3")), max_seq_length=64,
                                                         load_in_4bit=False, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=5e-3,
                     lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                     max_length=64, seed=0, disable_tqdm=True, **device_args())
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, args=args,
                             train_dataset=Dataset.from_dict({"text": TEXTS}))
    assert isinstance(trainer.data_collator, PaddingFreeCollator)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 1  # one row, no padding
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
