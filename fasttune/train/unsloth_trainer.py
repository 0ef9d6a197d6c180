"""``UnslothTrainer`` / ``UnslothTrainingArguments`` / ``unsloth_train``: the trainer names Unsloth notebooks import.

Continued pretraining (new language, new domain) trains the embeddings and the output head fully, next to the LoRA
adapters, and wants them to move slower than the adapters::

    model = FastLanguageModel.get_peft_model(model, target_modules=[..., "embed_tokens", "lm_head"])
    trainer = UnslothTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
                             args=UnslothTrainingArguments(learning_rate=5e-5, embedding_learning_rate=5e-6, ...))

``UnslothTrainingArguments`` is fasttune's ``SFTConfig`` plus ``embedding_learning_rate``; ``UnslothTrainer`` is
fasttune's ``SFTTrainer`` whose default optimizer then has separate parameter groups: the trainable weights of
``embed_tokens`` / ``lm_head`` (peft's ``modules_to_save`` copies) at ``embedding_learning_rate``, everything else at
``learning_rate`` (each split again by weight decay, as transformers does). The scheduler scales each group from its
own rate. Without ``embedding_learning_rate`` it is exactly ``SFTTrainer``.

``unsloth_train(trainer)`` (fasttune name: ``train_model``) is ``trainer.train()``: Unsloth added it when transformers
averaged the loss per micro-batch, which made gradient accumulation inexact. transformers (>= 4.46, here 5.x) and TRL
now divide the summed token losses by the number of label tokens of the whole accumulated batch
(``num_items_in_batch``), and fasttune's fused loss divides by the same count, so nothing is left to fix; the call is
kept so notebooks run as written (tests/trl/test_unsloth_trainer.py checks the equality).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import Trainer

from .sft import SFTConfig, SFTTrainer

logger = logging.getLogger("fasttune")

EMBEDDING_MODULES: tuple[str, ...] = ("embed_tokens", "lm_head")


@dataclass(init=False)
class UnslothTrainingArguments(SFTConfig):
    """fasttune's ``SFTConfig`` plus ``embedding_learning_rate`` (see the module docstring)."""

    embedding_learning_rate: float | None = field(
        default=None,
        metadata={"help": "learning rate of the trained embed_tokens / lm_head weights (continued pretraining); "
                          "None: they use learning_rate"},
    )

    def __init__(self, *args: Any, embedding_learning_rate: float | None = None, **kwargs: Any) -> None:
        valid = embedding_learning_rate is None or (
            isinstance(embedding_learning_rate, (int, float)) and not isinstance(embedding_learning_rate, bool)
            and math.isfinite(embedding_learning_rate) and embedding_learning_rate > 0)
        if not valid:
            raise ValueError(f"embedding_learning_rate: {embedding_learning_rate!r} must be a positive finite number "
                             "(typically 2-10x smaller than learning_rate) or None")
        self.embedding_learning_rate = embedding_learning_rate
        super().__init__(*args, **kwargs)


def is_embedding_parameter(name: str) -> bool:
    """True for a parameter of an ``embed_tokens`` / ``lm_head`` module (its peft modules_to_save copy included)."""
    return any(part in EMBEDDING_MODULES for part in name.split("."))


class UnslothTrainer(SFTTrainer):
    """fasttune's ``SFTTrainer`` with ``embedding_learning_rate`` support (see the module docstring)."""

    fasttune_config = UnslothTrainingArguments

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        rate = getattr(self.args, "embedding_learning_rate", None)
        if rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((is_embedding_parameter(name), name in decay), []).append(param)
        if not any(embedding for embedding, _ in groups):
            logger.warning("fasttune: embedding_learning_rate=%g is set but no trainable embed_tokens/lm_head weight "
                           "exists; add them to target_modules (or modules_to_save) to train them", rate)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        clashing = sorted({"params", "model", "optimizer_dict"} & set(kwargs))
        if clashing or not isinstance(optimizer_cls, type):
            raise ValueError(f"embedding_learning_rate: optim={self.args.optim!r} builds its own parameter groups, so "
                             "a separate embedding rate cannot be set; use optim='adamw_torch' (or adamw_8bit...)")
        param_groups = [
            {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
             "lr": rate if embedding else self.args.learning_rate}
            for (embedding, decays), params in sorted(groups.items())
        ]
        self.optimizer = optimizer_cls(param_groups, **kwargs)
        logger.info("fasttune: embed_tokens/lm_head weights train at lr=%g, the other %d trainable tensors at lr=%g",
                    rate, sum(len(p) for (e, _), p in groups.items() if not e), self.args.learning_rate)
        return self.optimizer


def train_model(trainer: Trainer, *args: Any, **kwargs: Any) -> Any:
    """``trainer.train(*args, **kwargs)``; gradient accumulation is already exact (see the module docstring)."""
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer: expected a transformers/TRL Trainer, got {type(trainer).__name__}")
    return trainer.train(*args, **kwargs)


unsloth_train = train_model

__all__ = ["UnslothTrainer", "UnslothTrainingArguments", "is_embedding_parameter", "train_model", "unsloth_train"]
