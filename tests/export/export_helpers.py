"""Shared helpers for export tests: tiny LoRA models with non-zero adapters (built with transformers + peft)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fasttune.models import families
from fasttune.quant import patch_quantized_layers

LINEARS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
           # MoE families: the attention's linear layers (``experts=True``: every expert too, peft's target_parameters)
           **{spec.family: list(spec.attention) for spec in families() if spec.moe is not None}}
EXPERTS = {spec.family: [f"mlp.{p}" for p in spec.moe.parameters] for spec in families() if spec.moe is not None}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(path: Path, family: str = "llama", dtype: torch.dtype = torch.float32, four_bit: bool = False,
               seed: int = 0, rank: int = 8, experts: bool = False):
    """A peft LoRA model over the tiny model at ``path`` whose B matrices are random (so the delta is not zero)."""
    if four_bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                    device_map="cpu")
        patch_quantized_layers(base)
    else:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=LINEARS.get(family, DEFAULT_TARGETS), lora_dropout=0.0,
                        target_parameters=EXPERTS.get(family) if experts else None)
    torch.manual_seed(seed)  # lora_A is initialised randomly by peft
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype))
    model.eval()
    return model


def sample_ids(vocab: int, n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, min(vocab, 500), (1, n), generator=torch.Generator().manual_seed(seed))
