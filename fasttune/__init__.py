"""fasttune: fast, memory-light fine-tuning with an Unsloth-compatible API.

Importing fasttune changes nothing in other libraries; every change is made on the model instances it returns.
The names Unsloth notebooks import from ``unsloth`` are here (and vLLM's ``SamplingParams``, for RL notebooks run
without vLLM): the loaders, the dataset helpers (``to_sharegpt``,
``standardize_sharegpt``, ``apply_chat_template``), ``is_bfloat16_supported`` and the trainer names
(``UnslothTrainer``, ``UnslothTrainingArguments``, ``unsloth_train`` = ``train_model``; imported on first use so
that ``import fasttune`` does not import TRL).
"""

from __future__ import annotations

import importlib
from typing import Any

from .notes import quiet_kernel_probe

with quiet_kernel_probe():  # the first import of bitsandbytes (through peft) may happen here: fasttune.notes
    from .data import apply_chat_template, standardize_data_formats, standardize_sharegpt, to_sharegpt
    from .device import device_args, is_bfloat16_supported
    from .loader import FastLanguageModel, FastModel
    from .rl import PatchFastRL, SamplingParams
    from .vision import FastVisionModel, UnslothVisionDataCollator

__version__ = "0.1.0"

is_bf16_supported = is_bfloat16_supported  # the name Unsloth's vision notebooks import

_LAZY: dict[str, str] = {name: "fasttune.train.unsloth_trainer" for name in (
    "UnslothTrainer", "UnslothTrainingArguments", "train_model", "unsloth_train")}

__all__ = [
    "FastLanguageModel",
    "FastModel",
    "FastVisionModel",
    "PatchFastRL",
    "SamplingParams",
    "UnslothTrainer",
    "UnslothTrainingArguments",
    "UnslothVisionDataCollator",
    "__version__",
    "apply_chat_template",
    "device_args",
    "is_bf16_supported",
    "is_bfloat16_supported",
    "standardize_data_formats",
    "standardize_sharegpt",
    "to_sharegpt",
    "train_model",
    "unsloth_train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fasttune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
