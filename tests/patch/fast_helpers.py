"""Helpers for the fast-path tests: tiny peft models, comparisons that say where and how much they differ."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from fasttune.models import get_family
from fasttune.quant import patch_quantized_layers


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str,
                 scaled: bool = False) -> None:
    """``torch.testing.assert_close`` with a message naming the tensor and the worst element.

    ``scaled``: ``atol`` is relative to ``max |expected|`` (for low-precision sums, whose rounding error grows with the
    magnitude of the whole tensor, not of one element).
    """
    actual, expected = actual.detach().float(), expected.detach().float()
    if scaled:
        atol = atol * float(expected.abs().max())
    diff = (actual - expected).abs()
    worst = int(diff.argmax()) if diff.numel() else 0
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol,
        msg=lambda m: f"{what}: max |diff| {diff.max():.3e} at flat index {worst} "
                      f"(got {actual.flatten()[worst]:.6g}, want {expected.flatten()[worst]:.6g}); {m}",
    )


def lora_config(**overrides) -> LoraConfig:
    kwargs = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, bias="none",
                  init_lora_weights=False)  # random B so the LoRA branch is not zero
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def load_peft(path, dtype=torch.float32, four_bit: bool = False, seed: int = 0, device: str = "cpu",
              **lora_overrides):
    """A tiny model from ``path`` on ``device`` with LoRA on every linear layer, adapters initialised from ``seed``."""
    kwargs = {}
    if four_bit:
        kwargs = dict(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16),
            device_map={"": str(device)} if str(device) != "cpu" else "cpu",
        )
    if get_family(AutoConfig.from_pretrained(path).model_type).moe is not None:
        kwargs["experts_implementation"] = "eager"  # the reference: transformers' loop over the experts
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if not four_bit:
        model.to(device)
    if four_bit:
        patch_quantized_layers(model)
    moe = get_family(model.config.model_type).moe
    if moe is not None and "target_parameters" not in lora_overrides:  # a mixture of experts: LoRA on every expert
        lora_overrides["target_parameters"] = [f"mlp.{p}" for p in moe.parameters]
    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(**lora_overrides))
