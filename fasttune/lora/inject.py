"""LoRA injection through peft, with targets checked against the model's real linear layers."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..config import DEFAULT_TARGET_MODULES, LoraSettings
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


def _family_name(model: nn.Module, spec: FamilySpec | None) -> str:
    return spec.name if spec is not None else type(model).__name__


def check_no_lora_layers(model: nn.Module) -> None:
    """Refuse a model that already holds peft layers.

    peft's ``get_peft_model`` replaces the targeted layers *in place*, so the model handed to it becomes the base of the
    ``PeftModel`` (``peft_model.get_base_model()`` returns it). Injecting again would look for ``q_proj`` as a linear
    layer, find a LoRA wrapper instead, and fail with a misleading "not a module" error.
    """
    found = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if found:
        raise ValueError(
            f"get_peft_model: this {type(model).__name__} already holds {len(found)} peft adapter layer(s) "
            f"(e.g. {found[0]}): it was already passed to get_peft_model, which changes the model in place, or it is "
            "a PeftModel's get_base_model(). To keep training those adapters, use the PeftModel that "
            "get_peft_model returned; to start over with new adapters, call peft_model.unload() (drop them) or "
            "peft_model.merge_and_unload() (fold them into the weights) and pass the plain model it returns"
        )


def _resolve_pattern(model: nn.Module, pattern: str, spec: FamilySpec | None, has_layers: bool) -> str | list[str]:
    """'all-linear' or a regex (peft matches it against full module names with ``re.fullmatch``), checked here."""
    available = linear_layer_names(model)
    if pattern == "all-linear":
        # peft refuses layers_to_transform with any string target; the explicit list means the same thing
        return available if has_layers else pattern
    family = _family_name(model, spec)
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"target_modules: {pattern!r} is not a valid regular expression ({err}); pass a list of "
                         f"layer names of this {family} model: {', '.join(available)}") from err
    # any module counts (peft also adapts embeddings and GPT-2's Conv1D); a match peft cannot adapt is its error
    paths = [name for name, _ in model.named_modules() if name]
    if not any(compiled.fullmatch(path) for path in paths):
        example = next((p for p in paths if p.endswith("." + available[0])), paths[-1]) if available else paths[-1]
        raise ValueError(
            f"target_modules: the regex {pattern!r} matches no module of this {family} model (it must match a whole "
            f"module name, such as {example!r}); its linear layers are {', '.join(available)}; "
            "or pass a list of those names, or 'all-linear'"
        )
    if has_layers:
        raise ValueError(f"layers_to_transform cannot be combined with the regex target_modules={pattern!r} "
                         "(peft ignores it for a regex); put the layer indices in the regex, or pass a list of names")
    return pattern


def resolve_target_modules(
    model: nn.Module, target_modules: str | Sequence[str], spec: FamilySpec | None, has_layers: bool = False
) -> str | list[str]:
    """Check ``target_modules`` against the model and map Unsloth's default names onto fused projections.

    A string is 'all-linear' or a regex that must match at least one module's full name; either goes to peft
    unchanged (with ``has_layers``, i.e. ``layers_to_transform`` given, 'all-linear' becomes the explicit list). A
    list must name linear layers of this model; names that a family fuses (phi3's q/k/v -> qkv_proj) are mapped
    through the family spec.
    """
    if isinstance(target_modules, str):
        return _resolve_pattern(model, target_modules, spec, has_layers)
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
        family = _family_name(model, spec)
        raise ValueError(
            f"target_modules: {', '.join(repr(u) for u in unknown)} "
            f"{'is not a module' if len(unknown) == 1 else 'are not modules'} of this {family} model; "
            f"its linear layers are {', '.join(available)}"
        )
    return resolved


# Modules that are not linear layers LoRA adapts, but that Unsloth's continued-pretraining notebooks list in
# target_modules to train them fully: they go to peft's modules_to_save (a trainable copy, saved with the adapter).
FULLY_TRAINED: tuple[str, ...] = ("embed_tokens", "lm_head")


def split_fully_trained(
    model: nn.Module, target_modules: str | Sequence[str], modules_to_save: Sequence[str] | None
) -> tuple[str | list[str], list[str] | None]:
    """Move ``embed_tokens`` / ``lm_head`` from a target list to ``modules_to_save`` (one log note says so).

    Each must be a module of the model (the error lists the leaf names found); a regex or 'all-linear' is unchanged.
    """
    if isinstance(target_modules, str):
        return target_modules, list(modules_to_save) if modules_to_save else None
    moved = [name for name in target_modules if name in FULLY_TRAINED]
    if not moved:
        return list(target_modules), list(modules_to_save) if modules_to_save else None
    leaves = {full.rsplit(".", 1)[-1] for full, _ in model.named_modules() if full}
    absent = [name for name in moved if name not in leaves]
    if absent:
        raise ValueError(f"target_modules: {absent} are not modules of this {type(model).__name__}; "
                         f"its modules named like them: {sorted(leaves & set(FULLY_TRAINED))}")
    rest = [name for name in target_modules if name not in FULLY_TRAINED]
    if not rest:
        raise ValueError(f"target_modules: {list(target_modules)} names no linear layer for LoRA; {moved} are trained "
                         "fully (modules_to_save), so add the linear layers too, e.g. q_proj, v_proj")
    save = list(dict.fromkeys([*(modules_to_save or ()), *moved]))
    logger.warning("fasttune: target_modules %s are not LoRA targets; they are trained fully and saved with the "
                   "adapter (peft modules_to_save=%s), as Unsloth does for continued pretraining", moved, save)
    return rest, save


def resolve_layers(model: nn.Module, layers: Sequence[int] | int | None, spec: FamilySpec | None) -> list[int] | None:
    """``layers_to_transform`` as a list of indices, each checked against the model's number of decoder layers."""
    if layers is None:
        return None
    indices = [int(layers)] if not isinstance(layers, (list, tuple)) else [int(i) for i in layers]
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    beyond = [i for i in indices if count is not None and i >= count]
    if beyond:
        raise ValueError(
            f"layers_to_transform: {', '.join(map(str, beyond))} "
            f"{'is' if len(beyond) == 1 else 'are'} beyond this {_family_name(model, spec)} model's {count} layers; "
            f"allowed indices are 0 to {count - 1}"
        )
    return indices


# Unsloth's default target names -> which 3-D expert parameter of a mixture of experts they mean (its experts fuse
# gate and up into one parameter, as phi3 fuses q/k/v).
EXPERT_TARGETS: dict[str, str] = {"gate_proj": "gate_up", "up_proj": "gate_up", "gate_up_proj": "gate_up",
                                  "down_proj": "down"}


def _sparse_blocks(model: nn.Module, spec: FamilySpec | None) -> list[str]:
    """Module paths of the mixture-of-experts blocks (empty for a dense family)."""
    if spec is None or spec.moe is None:
        return []
    return [name for name, module in model.named_modules()
            if spec.moe.is_block(module) and "base_layer" not in name.split(".")]


def split_expert_targets(model: nn.Module, target_modules: str | Sequence[str], spec: FamilySpec | None,
                         layers: list[int] | None, lora_dropout: float) -> tuple[str | list[str], list[str]]:
    """``(target_modules without the expert names, peft target_parameters)`` for a mixture of experts.

    A MoE family's experts are 3-D parameters, not linear layers, so LoRA reaches them through peft's
    ``target_parameters`` (one adapter per expert). ``gate_proj`` / ``up_proj`` / ``gate_up_proj`` mean the experts'
    fused gate-up parameter, ``down_proj`` their down parameter; names that are also linear layers of the model
    (dense MLP layers beside the sparse ones) stay module targets as well. ``'all-linear'`` adapts the experts too; a
    regex does not (pass peft's ``target_parameters`` to choose). ``layers``: only the blocks of those decoder layers.
    """
    blocks = _sparse_blocks(model, spec)
    if not blocks:
        return target_modules, []
    moe = spec.moe
    if isinstance(target_modules, str):
        wanted = {"gate_up", "down"} if target_modules == "all-linear" else set()
        rest: str | list[str] = target_modules
    else:
        wanted = {EXPERT_TARGETS[n] for n in target_modules if n in EXPERT_TARGETS}
        linear = set(linear_layer_names(model))
        rest = [n for n in target_modules if n not in EXPERT_TARGETS or n in linear]
    if not wanted:
        return rest, []
    if lora_dropout:
        raise ValueError(f"lora_dropout: {lora_dropout} cannot be used with LoRA on the experts of this {spec.name} "
                         "model (peft's target_parameters adapts a 3-D parameter, where dropout cannot be applied to "
                         "each expert's input); set lora_dropout=0, or leave gate_proj / up_proj / down_proj out of "
                         "target_modules")
    params = [getattr(moe, kind) for kind in ("gate_up", "down") if kind in wanted]
    if layers is None:
        block = blocks[0].rsplit(".", 1)[-1]
        return rest, [f"{block}.{moe.experts}.{p}" for p in params]
    chosen = [b for b in blocks if any(f".{i}." in f".{b}." for i in layers)]
    return rest, [f"{b}.{moe.experts}.{p}" for b in chosen for p in params]


def inject_lora(model: nn.Module, settings: LoraSettings, spec: FamilySpec | None, **peft_kwargs) -> PeftModel:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters on the resolved targets.

    ``random_state`` seeds the adapter initialisation, so equal settings give equal adapters.
    """
    check_no_lora_layers(model)
    layers = resolve_layers(model, settings.layers_to_transform, spec)
    requested, modules_to_save = split_fully_trained(model, settings.target_modules, settings.modules_to_save)
    requested, expert_params = split_expert_targets(model, requested, spec, layers, settings.lora_dropout)
    if expert_params and "target_parameters" not in peft_kwargs:
        peft_kwargs["target_parameters"] = expert_params
    targets = resolve_target_modules(model, requested, spec, has_layers=layers is not None)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias=settings.bias,
        target_modules=targets,
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        modules_to_save=modules_to_save,
        layers_to_transform=layers,
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


def targets_from_switches(
    spec: FamilySpec | None,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
    finetune_language_layers: bool = True,
    finetune_vision_layers: bool = False,
    has_vision_tower: bool = False,
) -> list[str]:
    """LoRA target names for Unsloth's ``FastModel.get_peft_model(finetune_*=...)`` switches on a text model.

    Attention and MLP select the family's projections (``spec.attention`` / ``spec.mlp``). A text-only model has no
    vision tower: ``finetune_vision_layers=True`` changes nothing there (the caller notes it), and
    ``finetune_language_layers=False`` would leave nothing to adapt, so it is an error, as is switching off both
    attention and MLP.
    """
    for name, value in (("finetune_attention_modules", finetune_attention_modules),
                        ("finetune_mlp_modules", finetune_mlp_modules),
                        ("finetune_language_layers", finetune_language_layers),
                        ("finetune_vision_layers", finetune_vision_layers)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {value!r} must be True or False")
    if not has_vision_tower and not finetune_language_layers:
        raise ValueError("finetune_language_layers=False: this model has only language layers (no vision tower), so "
                         "nothing would be adapted; set it to True")
    if not (finetune_attention_modules or finetune_mlp_modules):
        raise ValueError("finetune_attention_modules=False and finetune_mlp_modules=False: nothing would be adapted; "
                         "switch on at least one")
    attention = spec.attention if spec is not None else DEFAULT_TARGET_MODULES[:4]
    mlp = spec.mlp if spec is not None else DEFAULT_TARGET_MODULES[4:]
    return [*(attention if finetune_attention_modules else ()), *(mlp if finetune_mlp_modules else ())]
