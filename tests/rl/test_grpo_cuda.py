"""GRPO on a GPU (``pytest -m cuda``; skipped with the reason without one): fasttune's rollout engine matches
``model.generate`` greedily on CUDA, and ``fasttune.trl.GRPOTrainer`` trains the GRPO notebook's model (4-bit base
through bitsandbytes' CUDA kernels, ``dtype=None``: bf16 where supported) with its own rollouts and log-probs."""

from __future__ import annotations

import pytest
import torch
from cuda_testing import DRY_RUN, device
from datasets import Dataset
from rl_helpers import cpu_args, lora_state
from test_engine import PROMPTS, _greedy, _hf_greedy, _perturb_lora
from test_grpo import PROMPTS as COUNT_PROMPTS
from test_grpo import digit_reward, length_reward

import fasttune.trl as ft
from fasttune import FastLanguageModel, is_bfloat16_supported

pytestmark = pytest.mark.cuda
DEV = device()


def _gpu_model(model_dir, load_in_4bit: bool, dtype):
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=128, load_in_4bit=load_in_4bit,
                                                         dtype=dtype, device_map={"": str(DEV)})
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3,
                                             use_gradient_checkpointing="unsloth")
    return model, tokenizer


def test_greedy_rollouts_match_generate_on_gpu(tiny_model_dir):
    model, tokenizer = _gpu_model(tiny_model_dir("llama"), load_in_4bit=False, dtype="float32")
    _perturb_lora(model, seed=0)
    assert next(model.parameters()).device.type == DEV.type
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    ours = [c.token_ids for c in _greedy(model, prompts, tokenizer, max_tokens=12)]
    assert ours == _hf_greedy(model, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_grpo_notebook_model_trains_on_gpu(tiny_model_dir, tmp_path, monkeypatch):
    import fasttune.kernels.selective_logprob as kernel
    import fasttune.rl.engine as engine

    calls = {"rollouts": 0, "logprobs": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(engine, "generate_ids", counted("rollouts", engine.generate_ids))
    monkeypatch.setattr(kernel, "selective_log_probs", counted("logprobs", kernel.selective_log_probs))
    model, tokenizer = _gpu_model(tiny_model_dir("llama"), load_in_4bit=True, dtype=None)
    start = lora_state(model)
    device_switches = {} if DRY_RUN else dict(use_cpu=False, bf16=is_bfloat16_supported(),
                                              fp16=not is_bfloat16_supported())
    args = ft.GRPOConfig(**cpu_args(tmp_path, max_steps=2, per_device_train_batch_size=4, num_generations=4,
                                    max_completion_length=12, beta=0.04, loss_type="grpo", **device_switches))
    trainer = ft.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[length_reward, digit_reward],
                             args=args, train_dataset=Dataset.from_dict({"prompt": COUNT_PROMPTS}))
    trainer.train()
    assert model.is_loaded_in_4bit and next(model.parameters()).device.type == DEV.type
    assert calls["rollouts"] == 2 and calls["logprobs"] >= 4  # policy + reference per generation, then the loss
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(h["completions/mean_length"] > 0 and "kl" in h for h in logs)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
