"""``from fasttune.trl import ...``: the ``trl`` half of the port rule (imports from ``trl`` come from here).

Every public name of the installed TRL is re-exported unchanged, except the trainers and configs below, which are
TRL's classes (subclasses) that also take the Unsloth-era arguments (``tokenizer=``, trainer-level
``dataset_text_field`` / ``max_seq_length`` / ``packing``, ``args=TrainingArguments(...)``); ``SFTTrainer`` also trains
with fasttune's fast path by default. Names resolve on first use, like TRL's own lazy module, so importing this module
imports no trainer. The logic lives in :mod:`fasttune.train`; this module only assembles names.
"""

from __future__ import annotations

import importlib
from typing import Any

import trl as _trl

# name -> module of fasttune that defines it (as a module attribute, or through that module's ``dropin``)
_OURS: dict[str, str] = {
    "SFTTrainer": "fasttune.train.sft",
    "SFTConfig": "fasttune.train.sft",
    **{name: "fasttune.train.dropins" for name in (
        "DPOTrainer", "DPOConfig", "KTOTrainer", "KTOConfig", "GRPOTrainer", "GRPOConfig", "ORPOTrainer", "ORPOConfig")},
}

__all__ = sorted(set(_trl.__all__) | set(_OURS))


def __getattr__(name: str) -> Any:
    module_name = _OURS.get(name)
    if module_name is None:
        try:
            return getattr(_trl, name)
        except AttributeError:
            raise AttributeError(f"module 'fasttune.trl' has no attribute {name!r} (nor has trl "
                                 f"{_trl.__version__})") from None
    module = importlib.import_module(module_name)
    value = module.dropin(name) if module_name.endswith("dropins") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
