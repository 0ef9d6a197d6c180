"""Which linear layers of a vision-language model belong to which tower and block kind.

transformers 5 lays every vision-language model out as ``model.language_model`` (the text decoder) beside a vision
part (``model.visual``, ``model.vision_tower`` or ``model.vision_model``) and, in most families, a projector
(``model.multi_modal_projector``; Qwen2-VL's ``visual.merger``). :func:`classify` reads a linear layer's full name:

- **tower**: ``"language"`` inside the language model, ``"vision"`` inside the vision part or projector, else None
  (the output head, embeddings);
- **kind**: ``"attention"`` inside an attention block (``self_attn``, ``cross_attn``, ``attn``, ``attention``),
  ``"mlp"`` inside an MLP (``mlp``, ``feed_forward``) or the projector (an MLP between the towers), else None.

:func:`lora_targets` turns Unsloth's four ``finetune_*`` switches into the exact set of layers and a compact regex
that peft matches against full module names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from fasttune.quant import is_quantized_linear

LANGUAGE_PARTS: tuple[str, ...] = ("language_model",)
VISION_PARTS: tuple[str, ...] = ("visual", "vision_tower", "vision_model", "multi_modal_projector")
PROJECTOR_PARTS: tuple[str, ...] = ("multi_modal_projector", "merger")
ATTENTION_PARTS: tuple[str, ...] = ("self_attn", "cross_attn", "attn", "attention")
MLP_PARTS: tuple[str, ...] = ("mlp", "feed_forward")

# bitsandbytes' skip list (transformers matches each from the start of a module name, as a regex): the vision part and
# projector stay in 16-bit under 4-bit/8-bit loading, as they are small and quantizing them costs accuracy.
QUANT_SKIP: tuple[str, ...] = ("lm_head", r"(?:.*\.)?(?:" + "|".join(VISION_PARTS) + ")")


def classify(name: str) -> tuple[str | None, str | None]:
    """``(tower, kind)`` of the module called ``name`` (see the module docstring)."""
    parts = name.split(".")
    tower = ("language" if any(p in LANGUAGE_PARTS for p in parts)
             else "vision" if any(p in VISION_PARTS for p in parts) else None)
    if any(p in ATTENTION_PARTS for p in parts[:-1]):
        kind = "attention"
    elif any(p in MLP_PARTS or p in PROJECTOR_PARTS for p in parts):
        kind = "mlp"
    else:
        kind = None
    return tower, kind


def has_vision_tower(model: nn.Module) -> bool:
    return any(classify(name)[0] == "vision" for name, _ in model.named_modules())


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers (plain or quantized) of ``model``, the output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if module is not head and (isinstance(module, nn.Linear) or is_quantized_linear(module))]


def select(names: Iterable[str], vision: bool, language: bool, attention: bool, mlp: bool) -> list[str]:
    """The names whose tower and kind the switches turn on."""
    towers = {t for t, on in (("vision", vision), ("language", language)) if on}
    kinds = {k for k, on in (("attention", attention), ("mlp", mlp)) if on}
    chosen = []
    for name in names:
        tower, kind = classify(name)
        if tower in towers and kind in kinds:
            chosen.append(name)
    return chosen


def compact_regex(names: list[str]) -> str:
    """A regex that fully matches exactly ``names`` among same-shaped names: layer indices become ``\\d+``."""
    shapes = dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names)
    return "(?:" + "|".join(shapes) + ")" if len(shapes) > 1 else next(iter(shapes))


def lora_targets(model: nn.Module, finetune_vision_layers: bool, finetune_language_layers: bool,
                 finetune_attention_modules: bool, finetune_mlp_modules: bool) -> tuple[str, list[str]]:
    """``(regex for peft, the layers it selects)`` for the four switches; an error when nothing would be adapted."""
    for key, value in (("finetune_vision_layers", finetune_vision_layers),
                       ("finetune_language_layers", finetune_language_layers),
                       ("finetune_attention_modules", finetune_attention_modules),
                       ("finetune_mlp_modules", finetune_mlp_modules)):
        if not isinstance(value, bool):
            raise TypeError(f"{key}: {value!r} must be True or False")
    if not (finetune_vision_layers or finetune_language_layers):
        raise ValueError("finetune_vision_layers=False and finetune_language_layers=False: nothing would be adapted; "
                         "switch on at least one")
    if not (finetune_attention_modules or finetune_mlp_modules):
        raise ValueError("finetune_attention_modules=False and finetune_mlp_modules=False: nothing would be adapted; "
                         "switch on at least one")
    names = linear_names(model)
    chosen = select(names, finetune_vision_layers, finetune_language_layers, finetune_attention_modules,
                    finetune_mlp_modules)
    if not chosen:
        raise ValueError(f"the finetune_* switches select no linear layer of this {type(model).__name__}; "
                         f"its linear layers are, e.g., {names[:6]}")
    regex = compact_regex(chosen)
    matched = [n for n in names if re.fullmatch(regex, n)]
    if matched != chosen:  # same-shaped names in the other tower/kind would be caught too: fall back to the list
        regex = "(?:" + "|".join(re.escape(n) for n in chosen) + ")"
    return regex, chosen
