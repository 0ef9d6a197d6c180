"""The bitsandbytes quantization configs fasttune loads with: written once, used by the loader and the 4-bit export."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import BitsAndBytesConfig, Mxfp4Config


def nf4_config(compute_dtype: torch.dtype, skip_modules: Sequence[str] = ("lm_head",),
               quant_storage: torch.dtype | None = None) -> BitsAndBytesConfig:
    """NF4 4-bit with double quantization (QLoRA's storage), computing in ``compute_dtype``.

    ``skip_modules`` stay in 16-bit: by default the output head, whose quantization costs quality and saves little.
    ``quant_storage`` is the dtype the packed 4-bit bytes are viewed as (the same bytes either way): ``None`` is
    bitsandbytes' uint8, except in a process of a distributed launch (``WORLD_SIZE`` > 1), where it is
    ``compute_dtype``. FSDP2 shards only floating-point parameters: with uint8 storage accelerate leaves every 4-bit
    weight whole on every rank (it warns and goes on), so QLoRA under FSDP2 would save no memory.
    """
    if quant_storage is None:
        quant_storage = compute_dtype if int(os.environ.get("WORLD_SIZE", "1")) > 1 else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=list(skip_modules) or None,
    )


def int8_config(skip_modules: Sequence[str] = ("lm_head",)) -> BitsAndBytesConfig:
    """LLM.int8 8-bit storage; ``skip_modules`` stay in 16-bit (the output head by default)."""
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules) or None)


def stored_quantization(config) -> str | None:
    """The ``quant_method`` a checkpoint was saved with (``"mxfp4"`` for gpt-oss's releases), or None."""
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None
    method = stored.get("quant_method") if isinstance(stored, dict) else getattr(stored, "quant_method", None)
    return getattr(method, "value", method)


def mxfp4_dequantized() -> Mxfp4Config:
    """Load an MXFP4 checkpoint (gpt-oss's experts) dequantized to the compute dtype: training needs dense (or
    fasttune's NF4) experts, and transformers' MXFP4 kernels run on few GPUs and have no backward."""
    return Mxfp4Config(dequantize=True)
