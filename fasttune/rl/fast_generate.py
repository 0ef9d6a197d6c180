"""``model.fast_generate``: vLLM's ``LLM.generate`` call shape on fasttune's rollout engine.

Unsloth's RL notebooks call ``model.fast_generate(texts, sampling_params=SamplingParams(...), lora_request=...)``
on a vLLM engine that holds the base weights. The meaning is kept: ``lora_request=None`` samples from the base model
(adapters off), ``lora_request=model.load_lora(path)`` from that saved adapter. The engine runs on the model itself
(CPU or CUDA), with a KV cache; nothing is merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..state import model_state
from .lora import LoRARequest, adapter_for


def fast_generate(model: nn.Module, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                  sampling_params: Any = None, lora_request: LoRARequest | None = None, use_tqdm: bool = False,
                  tokenizer: Any = None) -> list[Any]:
    """Sample completions of ``prompts`` (text, or token-id lists); returns vLLM-shaped ``RequestOutput`` objects
    (``outs[0].outputs[0].text``). ``use_tqdm`` is accepted for vLLM's signature. Prompts that leave no room for
    ``max_tokens`` within the model's ``max_seq_length`` raise an error naming them."""
    from .engine import generate

    state = model_state(model)
    tokenizer = tokenizer if tokenizer is not None else state.tokenizer if state is not None else None
    if tokenizer is None:
        raise ValueError("tokenizer: this model was not loaded by fasttune, so it has no tokenizer attached; pass "
                         "fast_generate(..., tokenizer=tokenizer)")
    with adapter_for(model, lora_request):
        return generate(model, tokenizer, prompts, sampling_params,
                        max_length=state.max_seq_length if state is not None else None)
