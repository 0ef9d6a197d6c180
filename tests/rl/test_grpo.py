"""fasttune.trl.GRPOTrainer on fasttune models: its rollouts, log-probs and loss are fasttune's (and equal TRL's where
they should), gradient accumulation is exact for every loss type, and bad input names what is wrong."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from rl_helpers import cpu_args, fast_model, favour_eos, lora_state

import fasttune.trl as ft
from fasttune.rl.rewards import RewardFunctionError, check_rewards

pytestmark = pytest.mark.slow

PROMPTS = [f"Count to {i}:" for i in range(8)]


def length_reward(completions, **kwargs):
    return [len(c) / 10 for c in completions]


def digit_reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / 4 for c in completions]


def _grpo(model, tokenizer, tmp_path, plain_trl=False, reward_funcs=(length_reward, digit_reward), **overrides):
    options = dict(max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                   beta=0.0, loss_type="grpo")
    options.update(overrides)
    args = ft.GRPOConfig(**cpu_args(tmp_path, **options))
    cls = ft.GRPOTrainer
    if plain_trl:
        cls = next(c for c in cls.__mro__ if c.__module__.startswith("trl."))
    return cls(model=model, processing_class=tokenizer, reward_funcs=list(reward_funcs), args=args,
               train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def test_grpo_trains_with_fasttune_paths(tiny_model_dir, tmp_path, monkeypatch):
    import fasttune.kernels.selective_logprob as kernel
    import fasttune.rl.engine as engine

    calls = {"rollouts": 0, "logprobs": 0}
    real_generate, real_logprobs = engine.generate_ids, kernel.selective_log_probs

    def counting_generate(*args, **kwargs):
        calls["rollouts"] += 1
        return real_generate(*args, **kwargs)

    def counting_logprobs(*args, **kwargs):
        calls["logprobs"] += 1
        return real_logprobs(*args, **kwargs)

    monkeypatch.setattr(engine, "generate_ids", counting_generate)
    monkeypatch.setattr(kernel, "selective_log_probs", counting_logprobs)
    model, tokenizer = fast_model(tiny_model_dir("llama"), checkpointing="unsloth")
    start = lora_state(model)
    trainer = _grpo(model, tokenizer, tmp_path, max_steps=2, beta=0.04)
    trainer.train()
    assert calls["rollouts"] == 2 and calls["logprobs"] >= 4  # policy + reference per generation, then the loss
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(h["completions/mean_length"] > 0 and "kl" in h and "entropy" in h for h in logs)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_grpo_trains_a_4bit_mixture_of_experts(family, tiny_model_dir, tmp_path, monkeypatch):
    """GRPO on a MoE loaded in 4-bit (NF4-packed experts, LoRA on every expert): the rollouts and the loss both run
    the grouped experts, and the experts' adapters train."""
    import fasttune.patch.moe as moe

    calls = []
    real = moe.moe_experts
    monkeypatch.setattr(moe, "moe_experts", lambda *a, **k: (calls.append(torch.is_grad_enabled()), real(*a, **k))[1])
    model, tokenizer = fast_model(tiny_model_dir(family), checkpointing="unsloth", load_in_4bit=True)
    start = {n: p.clone() for n, p in model.named_parameters() if "experts" in n and "lora_B" in n}
    trainer = _grpo(model, tokenizer, tmp_path, max_steps=1)
    trainer.train()
    assert any(not grad for grad in calls) and any(calls)  # rollouts (no grad) and the training forward
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and torch.isfinite(torch.tensor(logs[0]["loss"])) and logs[0]["completions/mean_length"] > 0
    assert start and any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


def test_logprobs_equal_trls(tiny_model_dir, tmp_path):
    """Our per-token log-probs (hidden states at completion tokens, chunked) equal TRL's fused head's, values and
    gradients, on right-padded rows (where both use the same positions)."""
    model, tokenizer = fast_model(tiny_model_dir("llama"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    trainer = _grpo(model, tokenizer, tmp_path, temperature=0.7)
    base_cls = next(c for c in type(trainer).__mro__ if c.__module__.startswith("trl."))
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # a completion that ended early (right padding)
    results = []
    for method in (type(trainer)._get_per_token_logps_and_entropies, base_cls._get_per_token_logps_and_entropies):
        model.zero_grad()
        logps, entropy, _ = method(trainer, model, ids, mask, 6, compute_entropy=True)
        (logps * mask[:, -6:]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach() * mask[:, -6:], entropy * mask[:, -6:], grads))
    (ours, our_entropy, our_grads), (trls, trl_entropy, trl_grads) = results
    torch.testing.assert_close(ours, trls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_entropy, trl_entropy, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _one_step(model_dir, tmp_path, loss_type, batch, accumulation, plain_trl=False, level="token"):
    """LoRA change after one SGD step (lr 1, no clipping) and the completion lengths the step trained on."""
    model, tokenizer = fast_model(model_dir, max_seq_length=64)
    favour_eos(model, tokenizer)
    start = lora_state(model)
    trainer = _grpo(model, tokenizer, tmp_path / f"{loss_type}{batch}{plain_trl}", plain_trl, loss_type=loss_type,
                    per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, optim="sgd",
                    learning_rate=1.0, max_grad_norm=0.0, beta=0.04, temperature=1.5,
                    importance_sampling_level=level)
    trainer.train()
    lengths = [h["completions/min_length"] < h["completions/max_length"] for h in trainer.state.log_history
               if "completions/min_length" in h]
    assert lengths == [True]  # completions of different lengths, so token-count normalisers matter
    return {n: p.detach() - start[n] for n, p in model.named_parameters() if n in start}


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"),
                                             ("dapo", "token"), ("grpo", "sequence")])
def test_gradient_accumulation_is_exact(loss_type, level, tiny_model_dir, tmp_path):
    """gradient_accumulation_steps=2 x batch 4 == one batch of 8: the same 8 completions (one generation batch,
    same seed), the same update."""
    model_dir = tiny_model_dir("llama")
    full = _one_step(model_dir, tmp_path, loss_type, batch=8, accumulation=1, level=level)
    accumulated = _one_step(model_dir, tmp_path, loss_type, batch=4, accumulation=2, level=level)
    assert any(float(d.abs().max()) > 1e-5 for d in full.values())
    for name, d in full.items():
        torch.testing.assert_close(accumulated[name], d, rtol=1e-4, atol=1e-7, msg=name)


def test_trl_bnpo_accumulation_is_not_exact(tiny_model_dir, tmp_path):
    """Why the window normaliser: TRL's own GRPOTrainer, same two runs, with bnpo (per-micro-batch token means)."""
    model_dir = tiny_model_dir("llama")
    full = _one_step(model_dir, tmp_path, "bnpo", batch=8, accumulation=1, plain_trl=True)
    accumulated = _one_step(model_dir, tmp_path, "bnpo", batch=4, accumulation=2, plain_trl=True)
    worst = max(float((accumulated[n] - d).abs().max() / d.abs().max().clamp(min=1e-12)) for n, d in full.items())
    assert worst > 1e-3


def test_reward_function_errors_name_the_function(tiny_model_dir, tmp_path):
    def broken_reward(completions, **kwargs):
        raise KeyError("answer")

    def short_reward(completions, **kwargs):
        return [1.0]

    model, tokenizer = fast_model(tiny_model_dir("llama"))
    for func, message in ((broken_reward, "'broken_reward' (training step 0, batch of 4 completions) raised "
                                          "KeyError"),
                          (short_reward, "'short_reward' (training step 0, batch of 4 completions) returned 1 "
                                         "rewards; expected 4")):
        trainer = _grpo(model, tokenizer, tmp_path, reward_funcs=[length_reward, func])
        with pytest.raises(RewardFunctionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            trainer.train()


def test_check_rewards_values():
    assert check_rewards("f", 3, ["a", "b", "c"], [1, None, True]) == [1.0, None, 1.0]
    assert check_rewards("f", 3, ["a", "b"], torch.tensor([0.5, 2.0])) == [0.5, 2.0]
    with pytest.raises(RewardFunctionError, match=r"'f' \(training step 3, batch of 2 completions\) returned "
                                                  r"'high' \(str\) for completion 1"):
        check_rewards("f", 3, ["a", "b"], [1.0, "high"])
    with pytest.raises(RewardFunctionError, match="returned nan for completion 0"):
        check_rewards("f", 3, ["a"], [float("nan")])
    with pytest.raises(RewardFunctionError, match="returned float; it must return a list"):
        check_rewards("f", 3, ["a"], 1.0)


def test_a_step_without_any_usable_reward_stops_or_is_skipped_by_choice(tiny_model_dir, tmp_path, caplog):
    """Every reward None gave loss 0 and grad norm 0 with no word; 1e308 (finite in float64) became inf in float32."""
    model, tokenizer = fast_model(tiny_model_dir("llama"))

    def no_reward(completions, **kwargs):
        return [None] * len(completions)

    trainer = ft.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[no_reward],
                             args=ft.GRPOConfig(**cpu_args(tmp_path / "a", max_steps=1, per_device_train_batch_size=4),
                                                num_generations=4, max_completion_length=4),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(RewardFunctionError, match=r"at training step 0 no reward function returned a number for any "
                                                  r"of the 4 completions .* on_unusable_rewards='skip'"):
        trainer.train()
    skipping = ft.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[no_reward],
                              args=ft.GRPOConfig(**cpu_args(tmp_path / "b", max_steps=1, per_device_train_batch_size=4),
                                                 num_generations=4, max_completion_length=4),
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}), on_unusable_rewards="skip")
    with caplog.at_level("WARNING", logger="fasttune"):
        skipping.train()
    assert "the step changes nothing (on_unusable_rewards='skip')" in caplog.text
    with pytest.raises(ValueError, match=r"on_unusable_rewards: 'ignore' is not allowed; allowed: error, skip"):
        ft.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[no_reward], args=skipping.args,
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}), on_unusable_rewards="ignore")
    with pytest.raises(RewardFunctionError, match=r"returned 1e\+308 for completion 1 .* rewards must lie within "
                                                  r"\+-3.403e\+38"):
        check_rewards("huge", 3, ["a", "b"], [1.0, 1e308])


def test_bad_sampling_options_are_refused_at_construction(tmp_path):
    """TRL's GRPOConfig takes temperature=-1 / top_p=2 and fails at the first rollout, naming SamplingParams."""
    with pytest.raises(ValueError, match=r"GRPOConfig: 2 invalid option\(s\):\n  - temperature: -1 must be a number "
                                         r">= 0 \(0 = greedy\)\n  - top_p: 2 is outside \(0, 1\]"):
        ft.GRPOConfig(**cpu_args(tmp_path), num_generations=4, temperature=-1, top_p=2)
    with pytest.raises(ValueError, match=r"min_p: 1.5 is outside \[0, 1\]"):
        ft.GRPOConfig(**cpu_args(tmp_path), num_generations=4, min_p=1.5)
    assert ft.GRPOConfig(**cpu_args(tmp_path), num_generations=4, temperature=0.7, top_p=0.9, top_k=50).top_k == 50


def test_num_generations_that_does_not_divide_says_which_would(tmp_path):
    with pytest.raises(ValueError, match=r"num_generations: 4 does not divide the generation batch of 6 .*"
                                         r"values that would: \[2, 3, 6\]; or keep num_generations=4 with "
                                         r"per_device_train_batch_size in \[2, 4, 6, 8\]"):
        ft.GRPOConfig(**cpu_args(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2),
                      num_generations=4)
    with pytest.raises(ValueError, match="num_generations: 1 is too small"):
        ft.GRPOConfig(**cpu_args(tmp_path), num_generations=1)


def test_prompt_longer_than_the_limit_is_reported(tiny_model_dir, tmp_path):
    model, tokenizer = fast_model(tiny_model_dir("llama"), max_seq_length=24)
    trainer = _grpo(model, tokenizer, tmp_path, max_completion_length=12)
    trainer.train_dataset = Dataset.from_dict({"prompt": ["word " * 30] * 8})
    with pytest.raises(ValueError, match=r"prompt 0 of this generation batch \('word word.*has \d+ tokens; with "
                                         r"max_completion_length=12 it needs max_seq_length >= \d+, and the "
                                         r"model's is 24"):
        trainer.train()


def test_fast_inference_on_cuda_with_vllm_uses_trls_vllm_colocate(tiny_model_dir, tmp_path, monkeypatch):
    """Where CUDA and vLLM exist (not on this machine), fast_inference=True switches the trainer's copy of the config
    to TRL's vLLM colocate mode with the model's memory share; an explicit use_vllm is left alone."""
    import importlib.util

    from fasttune import FastLanguageModel
    from fasttune.train import grpo

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False, fast_inference=True,
                                                 gpu_memory_utilization=0.6)
    args = ft.GRPOConfig(**cpu_args(tmp_path), num_generations=4)
    chosen = ft.GRPOConfig(**cpu_args(tmp_path), num_generations=4, use_vllm=False)
    plain, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False)
    assert not grpo.vllm_rollouts_wanted(model, args)  # no CUDA here
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(grpo.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(grpo.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    assert grpo.vllm_rollouts_wanted(model, args)
    assert not grpo.vllm_rollouts_wanted(model, chosen)  # the user chose use_vllm
    assert not grpo.vllm_rollouts_wanted(plain, args)  # loaded without fast_inference
    grpo.use_vllm_colocate(model, args)
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization) == (True, "colocate", 0.6)
