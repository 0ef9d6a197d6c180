"""UnslothTrainer / UnslothTrainingArguments (embedding_learning_rate), unsloth_train, and embed_tokens/lm_head in
target_modules trained fully (peft modules_to_save) and saved with the adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from trl_helpers import cpu_args, text_dataset

from fasttune import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments, train_model, unsloth_train
from fasttune.trl import SFTConfig, SFTTrainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def _cpt_model(model_dir, targets=TARGETS):
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=64, load_in_4bit=False,
                                                         dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=targets,
                                             use_gradient_checkpointing=False, random_state=7)
    return model, tokenizer


def _embedding_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}


def test_embed_tokens_and_lm_head_are_trained_fully_and_saved(tiny_model_dir, tmp_path, fasttune_logs):
    model, tokenizer = _cpt_model(tiny_model_dir("llama"))
    notes = [m for m in fasttune_logs() if "trained fully" in m]
    assert len(notes) == 1 and "embed_tokens" in notes[0] and "lm_head" in notes[0]
    saved = _embedding_params(model)
    assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in saved} == {"embed_tokens", "lm_head"}
    before = {n: p.detach().clone() for n, p in saved.items()}
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(),
                         args=SFTConfig(**cpu_args(tmp_path, max_steps=2, learning_rate=1e-3)))
    trainer.train()
    for name, param in _embedding_params(model).items():
        assert not torch.equal(param.detach(), before[name]), f"{name} did not change"
    model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in keys) and any("lm_head" in k for k in keys), sorted(keys)[:5]


def test_only_embedding_targets_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match="names no linear layer for LoRA"):
        _cpt_model(tiny_model_dir("llama"), targets=["embed_tokens", "lm_head"])


def test_embedding_learning_rate_param_groups(tiny_model_dir, tmp_path):
    model, tokenizer = _cpt_model(tiny_model_dir("llama"))
    args = UnslothTrainingArguments(**cpu_args(tmp_path, learning_rate=5e-4, weight_decay=0.01),
                                    embedding_learning_rate=5e-5)
    trainer = UnslothTrainer(model=model, tokenizer=tokenizer, train_dataset=text_dataset(), args=args,
                             dataset_text_field="text")
    optimizer = trainer.create_optimizer()
    embedding_ids = {id(p) for p in _embedding_params(model).values()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    for group in optimizer.param_groups:
        kinds = {id(p) in embedding_ids for p in group["params"]}
        assert len(kinds) == 1, "a group mixes embedding and other weights"
        assert group["lr"] == (5e-5 if kinds.pop() else 5e-4)
    assert {g["lr"] for g in optimizer.param_groups} == {5e-5, 5e-4}
    with pytest.raises(ValueError, match="embedding_learning_rate: -1"):
        UnslothTrainingArguments(**cpu_args(tmp_path), embedding_learning_rate=-1)


def test_unsloth_train_is_trainer_train_and_accumulation_is_exact(tiny_model_dir, tmp_path):
    """Two rows of different lengths: one batch of 2 and 2 accumulated batches of 1 give the same update."""
    data = text_dataset(["short text.", "a much longer text with many more tokens in it than the other one."])
    weights = []
    for batch, accumulate, run in ((2, 1, train_model), (1, 2, unsloth_train)):
        model, tokenizer = _cpt_model(tiny_model_dir("llama"), targets=["q_proj", "v_proj"])
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=SFTConfig(
            **cpu_args(tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                       optim="sgd", learning_rate=1.0)))
        run(trainer)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(TypeError, match="expected a transformers/TRL Trainer"):
        unsloth_train(object())
