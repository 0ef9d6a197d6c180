"""Vision SFT as Unsloth's notebook writes it: fasttune.trl.SFTTrainer + UnslothVisionDataCollator, equal to TRL
on the unpatched model, learning, responses-only, resumable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import trl
from vision_helpers import COLOURS, circle, conversation

from fasttune import FastVisionModel
from fasttune.chat_templates import train_on_responses_only
from fasttune.patch import unpatch_model
from fasttune.trl import SFTConfig, SFTTrainer
from fasttune.vision import UnslothVisionDataCollator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
from tests.trl.trl_helpers import cpu_args, logged  # noqa: E402

NOTEBOOK_ARGS = dict(remove_unused_columns=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True})


def _rows(n: int = 12) -> list[dict]:
    names = list(COLOURS)
    return [conversation(circle(names[i % len(names)], 48 + 8 * (i % 3)), answer=names[i % len(names)])
            for i in range(n)]


def _model(tiny_vlm_dir, family="qwen2_vl", **kwargs):
    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir(family)), load_in_4bit=False,
                                                       dtype=torch.float32, **kwargs)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, finetune_vision_layers=True,
                                           finetune_language_layers=True, finetune_attention_modules=True,
                                           finetune_mlp_modules=True)
    FastVisionModel.for_training(model)
    return model, processor


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_notebook_sft_equals_trl_on_the_unpatched_model(tiny_vlm_dir, tmp_path, family):
    losses = []
    for fast in (True, False):
        model, processor = _model(tiny_vlm_dir, family)
        if not fast:
            unpatch_model(model)
        trainer_cls = SFTTrainer if fast else trl.SFTTrainer
        kwargs = dict(tokenizer=processor) if fast else dict(processing_class=processor)
        trainer = trainer_cls(model=model, data_collator=UnslothVisionDataCollator(model, processor),
                              train_dataset=_rows() if fast else __import__("datasets").Dataset.from_list(_rows()),
                              args=SFTConfig(**cpu_args(tmp_path / str(fast), max_steps=4, learning_rate=3e-3), **NOTEBOOK_ARGS,
                                             max_length=1024), **kwargs)
        if fast:
            assert trainer.fasttune_fast_loss
        trainer.train()
        losses.append(logged(trainer, "loss"))
    fast, reference = losses
    assert len(fast) == 4
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(reference), rtol=2e-4, atol=2e-4)
    assert fast[-1] < fast[0] - 0.3


def test_train_on_responses_only_sets_the_collator_markers(tiny_vlm_dir, tmp_path):
    model, processor = _model(tiny_vlm_dir)
    collator = UnslothVisionDataCollator(model, processor, train_on_responses_only=False)
    trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=collator, train_dataset=_rows(4),
                         args=SFTConfig(**cpu_args(tmp_path, max_steps=1), **NOTEBOOK_ARGS))
    batch = collator(_rows(1))
    assert (batch["labels"] != -100).sum() > 10
    train_on_responses_only(trainer, instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n")
    batch = collator(_rows(1))
    answer = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert answer.strip() == "red<|im_end|>"


def test_interrupted_vision_training_resumes_to_the_same_weights(tiny_vlm_dir, tmp_path):
    def run(steps, resume=False, out=tmp_path / "run"):
        torch.manual_seed(0)
        model, processor = _model(tiny_vlm_dir)
        args = SFTConfig(**cpu_args(out, max_steps=steps, save_strategy="steps", save_steps=2), **NOTEBOOK_ARGS)
        trainer = SFTTrainer(model=model, tokenizer=processor, train_dataset=_rows(),
                             data_collator=UnslothVisionDataCollator(model, processor), args=args)
        trainer.train(resume_from_checkpoint=resume or None)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight = run(4, out=tmp_path / "straight")
    run(2)
    resumed = run(4, resume=True)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], msg=name)
