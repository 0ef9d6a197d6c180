"""The transformers model inside a peft wrapper: the one place that knows how to unwrap it."""

from __future__ import annotations

from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """``model.get_base_model()`` for a ``PeftModel`` (the ``*ForCausalLM`` that holds the LoRA layers), else ``model``.

    Duck-typed (any wrapper with ``get_base_model``), so it needs no peft import and also unwraps peft's other
    wrapper classes (``PeftModelForCausalLM``, ``PeftMixedModel``).
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
