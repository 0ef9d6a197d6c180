"""The bitsandbytes quantization configs fasttune loads with: written once, used by the loader and the 4-bit export."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BitsAndBytesConfig


def nf4_config(compute_dtype: torch.dtype, skip_modules: Sequence[str] = ("lm_head",)) -> BitsAndBytesConfig:
    """NF4 4-bit with double quantization (QLoRA's storage), computing in ``compute_dtype``.

    ``skip_modules`` stay in 16-bit: by default the output head, whose quantization costs quality and saves little.
    """
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip_modules) or None,
    )


def int8_config(skip_modules: Sequence[str] = ("lm_head",)) -> BitsAndBytesConfig:
    """LLM.int8 8-bit storage; ``skip_modules`` stay in 16-bit (the output head by default)."""
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules) or None)
