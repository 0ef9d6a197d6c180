"""TRL SFTTrainer with fasttune's collator and loss: the same losses as TRL's defaults, step by step."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from fast_helpers import load_peft
from trl import SFTConfig, SFTTrainer

from fasttune.kernels import fused_linear_cross_entropy, use_backend
from fasttune.kernels.cross_entropy import token_stats_ref
from fasttune.patch import patch_model
from fasttune.train import PaddingFreeCollator
from fasttune.train.fused_loss import FastLossMixin


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


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fused_loss_token_stats_match_full_logits(backend, softcap):
    """TRL's entropy / mean_token_accuracy inputs, computed inside the fused loss's chunks, equal the full-logit ones."""
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 37, 24, generator=gen, requires_grad=True)
    weight = (torch.randn(301, 24, generator=gen) * 0.3).requires_grad_()
    logits = (hidden @ weight.T).detach()
    labels = torch.randint(0, 301, (3, 37), generator=gen)
    labels[:, ::3] = logits.argmax(-1)[:, ::3]  # a third of the targets are the argmax: the accuracy is not ~0
    labels[:, ::5] = -100
    with use_backend(backend):
        loss, stats = fused_linear_cross_entropy(hidden, weight, labels, softcap=softcap, chunk_size=16,
                                                 return_stats=True)
        plain = fused_linear_cross_entropy(hidden, weight, labels, softcap=softcap, chunk_size=16)
    correct, entropy, count = token_stats_ref(logits, labels, softcap)
    assert int(count) == int((labels != -100).sum()) == int(stats.num_labels)
    assert int(stats.num_correct) == int(correct) > 0, f"correct: {stats.num_correct} vs {correct}"
    torch.testing.assert_close(stats.entropy_sum, entropy, rtol=1e-5, atol=1e-4)
    assert not stats.entropy_sum.requires_grad and torch.equal(loss.detach(), plain.detach())
    (grad_with,) = torch.autograd.grad(loss, hidden)
    (grad_without,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(grad_with, grad_without, rtol=0, atol=0)
