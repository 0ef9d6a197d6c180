"""DPO, ORPO and KTO (fasttune.trl's drop-ins of TRL's trainers) on fasttune LoRA models: the preference margin grows,
the reference policy is the same model with adapters off (no second copy), and gradient accumulation is exact."""

from __future__ import annotations

import pytest
import torch
from rl_helpers import cpu_args, fast_model, kto_dataset, lora_state, preference_dataset, preference_margin

import fasttune.trl as ft

pytestmark = pytest.mark.slow

TRAINERS = {"DPO": preference_dataset, "ORPO": preference_dataset, "KTO": kto_dataset}
STEPS = {"DPO": 8, "ORPO": 8, "KTO": 16}  # KTO's unpaired signal (against a batch KL baseline) learns more slowly


def _trainer(name, model, tokenizer, tmp_path, plain_trl=False, **overrides):
    config_cls, trainer_cls = getattr(ft, f"{name}Config"), getattr(ft, f"{name}Trainer")
    if plain_trl:  # TRL's own class, as fasttune's drop-in subclasses it
        trainer_cls = next(c for c in trainer_cls.__mro__ if c.__module__.startswith("trl."))
    args = config_cls(**cpu_args(tmp_path / name, **overrides))
    return trainer_cls(model=model, processing_class=tokenizer, args=args, train_dataset=TRAINERS[name]())


@pytest.mark.parametrize("name", list(TRAINERS))
def test_preference_margin_grows(name, tiny_model_dir, tmp_path):
    model, tokenizer = fast_model(tiny_model_dir("llama"), checkpointing="unsloth")
    before = preference_margin(model, tokenizer)
    trainer = _trainer(name, model, tokenizer, tmp_path, max_steps=STEPS[name], per_device_train_batch_size=4,
                       learning_rate=2e-2)
    assert getattr(trainer, "ref_model", None) is None  # the reference is the same model with adapters disabled
    trainer.train()
    after = preference_margin(model, tokenizer)
    assert after > before + 1.0, (name, before, after)


def _one_sgd_step(name, model_dir, tmp_path, batch, accumulation, plain_trl=False):
    """LoRA weights change and logged loss after one optimizer step of plain SGD (delta = -lr * gradient)."""
    model, tokenizer = fast_model(model_dir)
    start = lora_state(model)
    trainer = _trainer(name, model, tokenizer, tmp_path / f"b{batch}", plain_trl, max_steps=1,
                       per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, max_grad_norm=0.0)
    trainer.train()
    delta = {n: p.detach() - start[n] for n, p in model.named_parameters() if n in start}
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return delta, loss


@pytest.mark.parametrize("name", ["DPO", "ORPO"])
def test_gradient_accumulation_is_exact(name, tiny_model_dir, tmp_path):
    """gradient_accumulation_steps=2 x batch 2 == one batch of 4 (same rows: the sampler's order is seeded)."""
    model_dir = tiny_model_dir("llama")
    full, full_loss = _one_sgd_step(name, model_dir, tmp_path, batch=4, accumulation=1)
    accumulated, accumulated_loss = _one_sgd_step(name, model_dir, tmp_path, batch=2, accumulation=2)
    assert any(float(d.abs().max()) > 1e-4 for d in full.values())  # the step did something
    for param, d in full.items():
        torch.testing.assert_close(accumulated[param], d, rtol=1e-4, atol=1e-6, msg=param)
    assert accumulated_loss == pytest.approx(full_loss, rel=1e-4)


def test_trl_orpo_accumulation_is_not_exact(tiny_model_dir, tmp_path):
    """Why fasttune's ORPOTrainer rescales the NLL: TRL's own class, same runs, steps differently (token means per
    micro-batch). If TRL fixes this, the rescaling becomes a no-op to remove."""
    model_dir = tiny_model_dir("llama")
    full, _ = _one_sgd_step("ORPO", model_dir, tmp_path, batch=4, accumulation=1, plain_trl=True)
    accumulated, _ = _one_sgd_step("ORPO", model_dir, tmp_path, batch=2, accumulation=2, plain_trl=True)
    worst = max(float((accumulated[p] - d).abs().max() / d.abs().max().clamp(min=1e-12)) for p, d in full.items())
    assert worst > 1e-3
