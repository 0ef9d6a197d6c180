"""What fasttune knows about a loaded model that transformers' config does not hold, as one typed object.

``from_pretrained`` (both facades, :mod:`fasttune.loading`) attaches a :class:`FastState` to the transformers model
with :func:`attach_state`, the only writer (``get_peft_model(max_seq_length=...)`` replaces it through it too). It
lives on the transformers model, so it is found under a peft wrapper and copied with the model by
``copy.deepcopy`` (TRL's reference models). Everything else reads it with :func:`model_state`: None for a model
fasttune did not load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import RLOptions
from .lora.unwrap import base_model

_ATTRIBUTE = "fasttune_state"


@dataclass(frozen=True)
class FastState:
    """``max_seq_length``: the longest sequence the model was loaded for (SFTConfig.max_length's default, the vision
    collator's and the rollout engine's limit). ``tokenizer``: the tokenizer (a VLM's: its processor's), whose padding
    side follows ``for_training`` / ``for_inference`` and which ``fast_generate`` uses. ``rl``: the rollout options
    (``fast_inference``, ``max_lora_rank``, ``gpu_memory_utilization``). ``fp8``: "row" / "block" when the linear
    weights are float8 (``fasttune.quant.fp8``), else None. ``qat_scheme``: the QAT scheme the model trains with
    (``fasttune.quant.qat``), else None."""

    max_seq_length: int | None
    tokenizer: Any = None
    rl: RLOptions = field(default_factory=RLOptions)
    fp8: str | None = None
    qat_scheme: str | None = None


def attach_state(model: nn.Module, state: FastState) -> None:
    """Make ``state`` the model's (replacing any earlier one). ``model.max_seq_length`` mirrors it: Unsloth's
    public attribute, which notebooks and Unsloth-era code read; fasttune itself reads :func:`model_state`."""
    base = base_model(model)
    base.__dict__[_ATTRIBUTE] = state
    base.__dict__["max_seq_length"] = state.max_seq_length


def model_state(model: Any) -> FastState | None:
    """The state ``from_pretrained`` attached to ``model`` (or its peft wrapper), or None."""
    if not isinstance(model, nn.Module):
        return None
    return base_model(model).__dict__.get(_ATTRIBUTE)
