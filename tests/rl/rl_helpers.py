"""Helpers of the RL tests: tiny preference data, LoRA snapshots, sequence log-probs computed by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from fasttune.lora.unwrap import base_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
from tests.trl.trl_helpers import cpu_args, fast_model  # noqa: E402,F401  (re-exported for the RL tests)

COLOURS = [("grass", "green", "purple"), ("sky", "blue", "orange"), ("snow", "white", "black"),
           ("coal", "black", "yellow"), ("blood", "red", "grey"), ("sun", "yellow", "brown"),
           ("night", "dark", "bright"), ("milk", "white", "pink")]


def preference_rows() -> list[dict[str, str]]:
    return [{"prompt": f"The colour of {thing} is", "chosen": f" {good}.", "rejected": f" {bad}."}
            for thing, good, bad in COLOURS]


def preference_dataset() -> Dataset:
    """Paired preferences (DPO, ORPO): eight prompts with a right and a wrong colour."""
    return Dataset.from_list(preference_rows())


def kto_dataset() -> Dataset:
    """The same preferences unpaired (KTO): one desirable and one undesirable row per prompt."""
    rows = preference_rows()
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
                             + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows])


@torch.no_grad()
def completion_logp(model: Any, tokenizer: Any, prompt: str, completion: str) -> float:
    """log p(completion | prompt) summed over the completion's tokens (a plain forward, full logits)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"]
    ids = torch.tensor([full])
    logits = model(input_ids=ids).logits.float()
    logps = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1:].sum())


def preference_margin(model: Any, tokenizer: Any) -> float:
    """Mean over the preference rows of log p(chosen) - log p(rejected)."""
    was_training = model.training
    model.eval()
    rows = preference_rows()
    margin = sum(completion_logp(model, tokenizer, r["prompt"], r["chosen"])
                 - completion_logp(model, tokenizer, r["prompt"], r["rejected"]) for r in rows) / len(rows)
    model.train(was_training)
    return margin


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def favour_eos(model: Any, tokenizer: Any, bias: float = 5.0) -> None:
    """Give the LM head a bias towards eos, so that sampled completions end at varied lengths (a random tiny model
    almost never samples eos; accumulation tests need micro-batches with different token counts)."""
    lm = base_model(model)
    head = lm.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = bias
    biased.bias.requires_grad_(False)
    lm.set_output_embeddings(biased)
