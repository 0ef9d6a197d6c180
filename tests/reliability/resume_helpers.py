"""Train-and-resume runs for the exact-resume tests: fasttune's public flow with TRL's plain ``SFTTrainer``.

A run trains ``STEPS`` steps and saves a Trainer checkpoint every ``SAVE_EVERY`` steps; a resumed run builds a new
model and a new trainer from the same settings and continues from one of those checkpoints. 12 texts in batches of
4 make 3 steps per epoch, so a resume at step 2 starts mid-epoch and crosses an epoch boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from fasttune import FastLanguageModel, device_args
from fasttune.kernels.compiling import use_compile

TEXTS = [f"Item {i}: the code for {w} is {w[::-1]}." for i, w in enumerate(["alpha", "delta", "omega"] * 4)]
STEPS = 5
SAVE_EVERY = 2


@dataclass(frozen=True)
class Case:
    """One way of fine-tuning: ``from_pretrained`` options, and ``get_peft_model`` options (None: full fine-tuning)."""

    name: str
    load: dict[str, Any]
    lora: dict[str, Any] | None = field(default_factory=lambda: {"r": 8, "lora_alpha": 16})


@dataclass
class RunResult:
    losses: dict[int, float]  # step -> loss logged at that step by this run (not ones read back from a checkpoint)
    weights: dict[str, torch.Tensor]  # the trainable parameters at the end
    trainer: SFTTrainer

    def checkpoint(self, step: int) -> Path:
        path = Path(self.trainer.args.output_dir) / f"checkpoint-{step}"
        assert path.is_dir(), f"no checkpoint at step {step} in {path.parent}"
        return path


def build(model_dir: Path, case: Case) -> Any:
    """The model as a notebook builds it: ``from_pretrained`` then (for LoRA) ``get_peft_model`` with defaults."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=64, **case.load)
    if case.lora is not None:
        model = FastLanguageModel.get_peft_model(model, **case.lora)
    return model, tokenizer


def make_trainer(model_dir: Path, case: Case, out_dir: Path, **overrides: Any) -> SFTTrainer:
    model, tokenizer = build(model_dir, case)
    settings: dict[str, Any] = dict(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, report_to="none", save_strategy="steps", save_steps=SAVE_EVERY, max_length=64, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **device_args(),
    )
    args = SFTConfig(**(settings | overrides))
    return SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}))


def train(model_dir: Path, case: Case, out_dir: Path, resume_from: Path | None = None, **overrides: Any) -> RunResult:
    """Build a new model and trainer, train (from ``resume_from`` if given) and collect losses and final weights.

    The CPU kernels run uncompiled: ``torch.compile``'s first-call cost would dominate these few steps (the compiled
    kernels have their own parity tests); the fast path is otherwise on, as by default.
    """
    with use_compile(False):
        trainer = make_trainer(model_dir, case, out_dir, **overrides)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    # A resumed trainer's history starts with the checkpoint's entries; keep only what this run logged.
    logged = trainer.state.log_history
    if resume_from is not None:
        done = int(resume_from.name.rsplit("-", 1)[-1])
        logged = [h for h in logged if h.get("step", 0) > done]
    losses = {h["step"]: h["loss"] for h in logged if "loss" in h}
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return RunResult(losses, weights, trainer)


def assert_same_training(full: RunResult, resumed: RunResult, resumed_at: int) -> None:
    """Each step after ``resumed_at`` has the same loss (float equality) and the final weights are bit-identical."""
    expected = {s: v for s, v in full.losses.items() if s > resumed_at}
    assert sorted(expected) == list(range(resumed_at + 1, STEPS + 1)), f"uninterrupted run logged {full.losses}"
    assert sorted(resumed.losses) == sorted(expected), f"resumed run logged steps {sorted(resumed.losses)}"
    diverged = [f"step {s}: {expected[s]!r} vs resumed {resumed.losses[s]!r}" for s in expected
                if resumed.losses[s] != expected[s]]
    assert not diverged, "losses differ after resume: " + "; ".join(diverged)
    assert full.weights.keys() == resumed.weights.keys()
    differ = [
        f"{n} ({full.weights[n].dtype} vs {resumed.weights[n].dtype}, max |diff| "
        f"{(full.weights[n].double() - resumed.weights[n].double()).abs().max().item():.3g})"
        for n in full.weights if not torch.equal(full.weights[n], resumed.weights[n])
    ]
    assert not differ, f"{len(differ)} of {len(full.weights)} trainable tensors differ: " + "; ".join(differ[:5])
