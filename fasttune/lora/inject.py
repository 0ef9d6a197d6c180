"""LoRA injection through peft, with targets checked against the model's real linear layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..config import LoraSettings
from ..models import FamilySpec
from ..quant import is_quantized_linear

logger = logging.getLogger("fasttune")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of the linear layers LoRA can adapt (the output head and embeddings excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for full_name, module in model.named_modules():
        if module is head or not (isinstance(module, nn.Linear) or is_quantized_linear(module)):
            continue
        names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(
    model: nn.Module, target_modules: str | Sequence[str], spec: FamilySpec | None
) -> str | list[str]:
    """Check ``target_modules`` against the model and map Unsloth's default names onto fused projections.

    A string ('all-linear' or a regex) goes to peft unchanged. A list must name linear layers of this model; names
    that a family fuses (phi3's q/k/v -> qkv_proj) are mapped through the family spec.
    """
    if isinstance(target_modules, str):
        return target_modules
    available = linear_layer_names(model)
    aliases = spec.fused_aliases if spec is not None else {}
    resolved: list[str] = []
    unknown: list[str] = []
    for name in target_modules:
        actual = name if name in available else aliases.get(name)
        if actual is None or actual not in available:
            unknown.append(name)
        elif actual not in resolved:
            resolved.append(actual)
    if unknown:
        family = spec.name if spec is not None else type(model).__name__
        raise ValueError(
            f"target_modules: {', '.join(repr(u) for u in unknown)} "
            f"{'is not a module' if len(unknown) == 1 else 'are not modules'} of this {family} model; "
            f"its linear layers are {', '.join(available)}"
        )
    return resolved


def inject_lora(model: nn.Module, settings: LoraSettings, spec: FamilySpec | None, **peft_kwargs) -> PeftModel:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters on the resolved targets.

    ``random_state`` seeds the adapter initialisation, so equal settings give equal adapters.
    """
    targets = resolve_target_modules(model, settings.target_modules, spec)
    layers = settings.layers_to_transform
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias=settings.bias,
        target_modules=targets,
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        modules_to_save=settings.modules_to_save,
        layers_to_transform=[layers] if isinstance(layers, int) else layers,
        init_lora_weights=settings.init_lora_weights,
        task_type="CAUSAL_LM",
        **peft_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.random_state)
        peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("fasttune: LoRA r=%d on %s; %d of %d parameters trainable", settings.r, targets, trainable, total)
    return peft_model
