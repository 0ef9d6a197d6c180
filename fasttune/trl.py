"""``from fasttune.trl import ...``: the ``trl`` half of the port rule (imports from ``trl`` come from here).

Every public name of the installed TRL is re-exported unchanged, except the trainers and configs below, which are
TRL's classes (subclasses) that also take the Unsloth-era arguments (``tokenizer=``, trainer-level
``dataset_text_field`` / ``max_seq_length`` / ``packing``, ``args=TrainingArguments(...)``); ``SFTTrainer`` also trains
with fasttune's fast path by default. Names resolve on first use, like TRL's own lazy module, so importing this module
imports no trainer. The logic lives in :mod:`fasttune.train`; this module only assembles names.

Notebooks name trainers that TRL has since moved or removed: a name TRL moved to ``trl.experimental`` (:data:`_MOVED`)
resolves there, with a one-time note; a name TRL removed (:data:`_REMOVED`) fails with what replaces it.
"""

from __future__ import annotations

import importlib
from typing import Any

import trl as _trl

from fasttune.notes import note_once

# name -> module of fasttune that defines it (as a module attribute, or through that module's ``dropin``)
_OURS: dict[str, str] = {
    "SFTTrainer": "fasttune.train.sft",
    "SFTConfig": "fasttune.train.sft",
    **{name: "fasttune.train.dropins" for name in (
        "DPOTrainer", "DPOConfig", "KTOTrainer", "KTOConfig", "GRPOTrainer", "GRPOConfig", "ORPOTrainer", "ORPOConfig")},
}

# name -> the module that holds it since TRL moved it out of its top level (1.x: to trl.experimental)
_MOVED: dict[str, str] = {
    **dict.fromkeys(("CPOTrainer", "CPOConfig"), "trl.experimental.cpo"),
    **dict.fromkeys(("OnlineDPOTrainer", "OnlineDPOConfig"), "trl.experimental.online_dpo"),
    **dict.fromkeys(("GKDTrainer", "GKDConfig"), "trl.experimental.gkd"),
}
# name -> what to use instead, for names TRL removed that Unsloth-era notebooks import
_REMOVED: dict[str, str] = {
    "DataCollatorForCompletionOnlyLM": "fasttune.chat_templates.train_on_responses_only(trainer) to train on the "
                                       "answers only, or SFTConfig(completion_only_loss=True) on prompt/completion rows",
    "setup_chat_format": "fasttune.chat_templates.get_chat_template(tokenizer, ...) or trl.clone_chat_template",
    **dict.fromkeys(("PPOTrainer", "PPOConfig", "AutoModelForCausalLMWithValueHead"),
                    "GRPOTrainer / GRPOConfig (fasttune.trl), which need no value head"),
}

__all__ = sorted(set(_trl.__all__) | set(_OURS))


def __getattr__(name: str) -> Any:
    module_name = _OURS.get(name)
    if module_name is None:
        try:
            return getattr(_trl, name)
        except AttributeError:
            pass
        if name in _MOVED:
            note_once(f"trl-moved-{name}", f"{name} is {_MOVED[name]}.{name} in trl {_trl.__version__} (TRL moved it "
                                           "there); fasttune.trl resolves the old import to it")
            value = getattr(importlib.import_module(_MOVED[name]), name)
            globals()[name] = value
            return value
        instead = f"; use {_REMOVED[name]}" if name in _REMOVED else ""
        raise AttributeError(f"module 'fasttune.trl' has no attribute {name!r} (nor has trl {_trl.__version__})"
                             f"{instead}")
    module = importlib.import_module(module_name)
    value = module.dropin(name) if module_name.endswith("dropins") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
