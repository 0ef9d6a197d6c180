"""Merge LoRA adapters into dense weights without touching the model they come from.

``merged_state_dict(model)`` walks the transformers model under a peft ``PeftModel`` and returns the state dict a
plain (unquantized, adapter-free) instance of that model would have:

    W_merged = dequantize(W_base) + sum_a  scaling_a * (B_a @ A_a)          (out, in)
    b_merged = b_base + sum_a scaling_a * b_B_a                             (only with ``lora_bias=True``)

for every active, not-yet-merged adapter ``a``; a mixture of experts' 3-D expert parameters adapted through peft's
``target_parameters`` get ``scaling_a * B_e A_e`` per expert ``e`` (4-bit experts dequantized first).
4-bit / 8-bit bitsandbytes bases are dequantized exactly with
``fasttune.quant.dequantize_weight``; the sum is formed in float32 and cast once at the end. The model itself is
never modified (unlike peft's ``merge_and_unload``), so a user can keep training after an export.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from fasttune.kernels.moe import ExpertLora, expert_delta
from fasttune.lora.unwrap import base_model
from fasttune.quant import dequantize_weight, is_quantized_linear
from fasttune.quant.experts import PackedExperts

logger = logging.getLogger(__name__)

# Sub-module names peft adds inside a LoRA layer; they never appear in the merged state dict.
_ADAPTER_CHILDREN = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout", "lora_magnitude_vector")


class NonFiniteWeightError(ValueError):
    """A merged tensor holds NaN or inf; nothing was written."""


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")


def _is_param_wrapper(module: nn.Module) -> bool:
    """peft's LoRA on a parameter (``target_parameters``: a mixture of experts' 3-D expert weights)."""
    return _is_lora_layer(module) and hasattr(module, "parameter_name")


def _expert_delta(module: nn.Module, adapter: str, shape: torch.Size) -> torch.Tensor:
    """``scaling * B_e A_e`` for every expert in float32, shaped like the stored 3-D parameter ``shape``: ``(E, out,
    in)``, or ``(E, in, out)`` for transposed experts (gpt-oss). peft's factor layout is read in one place,
    :func:`fasttune.kernels.moe.expert_delta`."""
    lora = ExpertLora(module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                      float(module.scaling[adapter]))
    delta = expert_delta(lora, shape[0])  # (E, in, out)
    if delta.shape != shape:
        delta = delta.transpose(1, 2)
    if delta.shape != shape:
        raise ValueError(f"merge: the LoRA of {module.parameter_name} gives {tuple(delta.shape)}, the parameter is "
                         f"{tuple(shape)}")
    return delta


def _merge_param_wrappers(name: str, module: nn.Module, within: tuple[str, ...] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a module under nested ``ParamWrapper``s, each adapted parameter with its LoRA added."""
    deltas: dict[str, list[tuple[nn.Module, str]]] = {}
    while _is_param_wrapper(module):
        for adapter in _active_unmerged(module):
            if adapter in getattr(module, "lora_variant", {}) or module.lora_B[adapter].bias is not None:
                raise NotImplementedError(f"merge: adapter {adapter!r} on {name}.{module.parameter_name} is not plain "
                                          "LoRA; fasttune merges plain LoRA only. Save it with save_method='lora'.")
            deltas.setdefault(module.parameter_name, []).append((module, adapter))
        module = module.base_layer
    for pname, tensor in _own_tensors(name, module):
        short = pname.rsplit(".", 1)[-1]
        if short in deltas:
            tensor = tensor.float()
            for wrapper, adapter in deltas[short]:
                tensor = tensor + _expert_delta(wrapper, adapter, tensor.shape)
        yield pname, tensor
    for child_name, child in module.named_children():
        if child_name not in _ADAPTER_CHILDREN:
            yield from _walk(f"{name}.{child_name}" if name else child_name, child, within)


def _is_modules_to_save(module: nn.Module) -> bool:
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def _active_unmerged(module: nn.Module) -> list[str]:
    if getattr(module, "disable_adapters", False):
        return []
    merged = set(getattr(module, "merged_adapters", []))
    return [a for a in module.active_adapters if a not in merged and (a in module.lora_A or a in module.lora_embedding_A)]


def _lora_delta(module: nn.Module, adapter: str) -> torch.Tensor:
    """``scaling * (B @ A)`` in float32, shaped like the base weight: (out, in) for Linear, (num, dim) for Embedding."""
    if adapter in getattr(module, "lora_variant", {}):
        kind = type(module.lora_variant[adapter]).__name__
        raise NotImplementedError(
            f"merge: adapter {adapter!r} uses a LoRA variant ({kind}, e.g. DoRA); fasttune merges plain LoRA only. "
            "Save it with save_method='lora' instead."
        )
    scale = float(module.scaling[adapter])
    if adapter in module.lora_A:
        a = module.lora_A[adapter].weight.detach().float()  # (r, in)
        b = module.lora_B[adapter].weight.detach().float()  # (out, r)
        delta = (b @ a) * scale
        return delta.T if getattr(module, "fan_in_fan_out", False) else delta
    a = module.lora_embedding_A[adapter].detach().float()  # (r, num)
    b = module.lora_embedding_B[adapter].detach().float()  # (dim, r)
    return (b @ a).T * scale


def _base_tensors(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense float32 weight and bias of a LoRA layer's base layer (dequantized if quantized)."""
    if is_quantized_linear(base) or isinstance(base, nn.Linear):
        weight = dequantize_weight(base).detach().float()
    elif isinstance(base, nn.Embedding):
        weight = base.weight.detach().float()
    else:
        raise TypeError(
            f"merge: base layer {type(base).__name__} is not supported; supported: nn.Linear, nn.Embedding, "
            "bitsandbytes Linear4bit / Linear8bitLt"
        )
    bias = getattr(base, "bias", None)
    return weight, (bias.detach().float() if bias is not None else None)


def _merge_lora_layer(name: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    weight, bias = _base_tensors(module.base_layer)
    for adapter in _active_unmerged(module):
        weight = weight + _lora_delta(module, adapter)
        lora_b = module.lora_B[adapter] if adapter in module.lora_B else None
        if lora_b is not None and getattr(lora_b, "bias", None) is not None:
            if bias is None:
                raise ValueError(f"merge: {name} has a LoRA bias (lora_bias=True) but its base layer has no bias")
            bias = bias + lora_b.bias.detach().float() * float(module.scaling[adapter])
    yield f"{name}.weight", weight
    if bias is not None:
        yield f"{name}.bias", bias


def _own_tensors(name: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers held directly by ``module`` (not by its children)."""
    prefix = f"{name}." if name else ""
    if is_quantized_linear(module):
        yield f"{prefix}weight", dequantize_weight(module).detach().float()
        if module.bias is not None:
            yield f"{prefix}bias", module.bias.detach()
        return
    for pname, param in module.named_parameters(recurse=False):
        if isinstance(param, PackedExperts):  # 4-bit experts: dequantized exactly
            yield prefix + pname, param.dequantize(dtype=torch.float32)
            continue
        yield prefix + pname, param.detach()
    skip = getattr(module, "_non_persistent_buffers_set", set())
    for bname, buf in module.named_buffers(recurse=False):
        if bname not in skip and buf is not None:
            yield prefix + bname, buf.detach()


def _place(name: str, within: tuple[str, ...] | None) -> str:
    """Where the module ``name`` stands to the module paths ``within``: "in" one, an "ancestor" of one, or "out"."""
    if within is None or any(name == p or name.startswith(p + ".") for p in within):
        return "in"
    return "ancestor" if any(not name or p.startswith(name + ".") for p in within) else "out"


def _walk(name: str, module: nn.Module, within: tuple[str, ...] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    place = _place(name, within)
    if place == "out":  # nothing below is wanted: not even merged (a VLM's tower written to another file)
        return
    if place == "ancestor":  # an ancestor's own tensors are outside every wanted path
        for child_name, child in module.named_children():
            if child_name not in _ADAPTER_CHILDREN:
                yield from _walk(f"{name}.{child_name}" if name else child_name, child, within)
        return
    if _is_param_wrapper(module):
        yield from _merge_param_wrappers(name, module, within)
        return
    if _is_lora_layer(module):
        yield from _merge_lora_layer(name, module)
        return
    if _is_modules_to_save(module):
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        use = module.original_module
        if not getattr(module, "disable_adapters", False) and active in module.modules_to_save:
            use = module.modules_to_save[active]
        yield from _walk(name, use, within)
        return
    yield from _own_tensors(name, module)
    if is_quantized_linear(module):
        return
    for child_name, child in module.named_children():
        if child_name in _ADAPTER_CHILDREN:
            continue
        yield from _walk(f"{name}.{child_name}" if name else child_name, child, within)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``NonFiniteWeightError`` naming the tensor and how many entries are NaN / inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        nans = int(torch.isnan(tensor).sum())
        infs = int(torch.isinf(tensor).sum())
        raise NonFiniteWeightError(
            f"merge: {name} has {nans} NaN and {infs} inf values after merging; nothing was written. "
            "The adapter or base weights are broken (check the training loss for divergence)."
        )


def tied_output_key(base: nn.Module) -> str | None:
    """Name of the output-embedding weight when it is the very tensor of the input embeddings (tied and without a
    LoRA of its own), so it is saved once; None otherwise."""
    config = getattr(base, "config", None)
    out_emb, in_emb = base.get_output_embeddings(), base.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or out_emb is None or in_emb is None:
        return None
    if _is_lora_layer(out_emb) or _is_modules_to_save(out_emb):
        return None
    if getattr(out_emb, "weight", None) is not in_emb.weight:
        return None
    return next((f"{n}.weight" for n, m in base.named_modules() if m is out_emb), None)


def default_dtype(base: nn.Module) -> torch.dtype:
    """The dtype merged tensors are saved in by default: the input embeddings' (16-bit at least)."""
    dtype = base.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float16


def iter_merged_tensors(model: nn.Module, dtype: torch.dtype | None = None,
                        within: tuple[str, ...] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of the merged model one at a time, in module order (embeddings, layers, head), each
    checked for NaN/inf (``NonFiniteWeightError``) and cast to ``dtype``. Only one merged tensor is alive at a time,
    so a GGUF export never holds the whole dense model. A tied output embedding is skipped (see ``tied_output_key``).
    ``within``: only the modules under these paths (``("model.visual",)``) are merged and yielded.
    """
    base = base_model(model)
    dtype = dtype or default_dtype(base)
    skip = tied_output_key(base)
    for name, tensor in _walk("", base, within):
        if name == skip:
            continue
        check_finite(name, tensor)
        yield name, (tensor.to(dtype) if tensor.is_floating_point() else tensor)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The merged, dequantized state dict of ``model`` (a PeftModel or a plain transformers model).

    Every floating tensor is checked for NaN/inf (``NonFiniteWeightError``) and cast to ``dtype`` (default: the
    dtype of the input embeddings). Tied weights (``lm_head.weight`` sharing ``embed_tokens.weight``) appear once,
    under the name transformers saves. A LoRA on a tied ``lm_head`` unties it: both are then returned.
    """
    return dict(iter_merged_tensors(model, dtype))


def unties_embeddings(base: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """True when the config ties embeddings but the merged state still holds a distinct output embedding."""
    config = getattr(base, "config", None)
    out_emb = base.get_output_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or out_emb is None:
        return False
    out_name = next((n for n, m in base.named_modules() if m is out_emb), None)
    return out_name is not None and f"{out_name}.weight" in state
