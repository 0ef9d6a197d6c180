"""Quantization-aware training (QAT): train through the rounding the deployed model will have.

``get_peft_model(..., qat_scheme=...)`` (LoRA) or ``from_pretrained(..., full_finetuning=True, qat_scheme=...)``
make every linear layer of the decoder compute with a *fake-quantized* weight: quantized and dequantized again in
the forward, while the gradient passes the rounding unchanged (straight-through estimator, STE). What is
fake-quantized is the weight that gets exported:

* with LoRA, the merged weight ``W' = W + s * B @ A`` (float32, the same sum ``export.merge`` forms), so the
  gradient reaches ``A`` and ``B`` through the STE: ``dA = s B^T dW'``, ``dB = s dW' A^T`` with ``dW' = g^T x``;
* in a full fine-tune, the weight itself.

Two families of schemes (``QAT_SCHEMES``):

* **GGUF** (``GGUF_SCHEMES``: every quantized file type fasttune writes, "q4_0", "q4_k_m", "q8_0", ...). Each
  tensor is fake-quantized with the type the exporter will write for it (``export.gguf.writer.export_qtype``, i.e.
  llama.cpp's mix: q4_k_m gives attn_v/ffn_down of some layers q6_k, rows of 576 fall back to q5_0, ...), through
  the exporter's own numpy quantizer and gguf's dequantizer (``export.gguf.quants``): one grid, one rounding rule.
  The fake-quantized weight *is* what ``save_pretrained_gguf`` writes for the merged model, bit for bit
  (tests/quant/test_qat.py). The quantizer is numpy (K-quants are a search per block, ggml's reference code), so it
  runs on the detached weight and the result is cached per layer until the weight changes (the optimizer step bumps
  the parameters' versions): one quantization per layer per optimizer step, not per forward / recompute / backward.
  Cost measured in bench/bench_qat.py.
* **torch** (``TORCH_SCHEMES``, Unsloth's names): "int4" (weights int4, symmetric, groups of 32), "int8-int4"
  (activations int8 per token, asymmetric, + int4 weights), "fp8-int4" (activations float8 e4m3 per token + int4
  weights), "fp8-fp8" (activations and weights float8 e4m3, per token / per output row). Written in torch here (a
  few lines each, differentiable through the same STE): the int4 weights and int8 activations are torchao's grid and
  rounding bit for bit, the fp8 ones fasttune's own FP8 row storage (``quant.fp8``). :func:`convert_qat` turns the
  trained model into that real form (torchao's int4 tensors, fasttune's FP8 layers).

The embeddings and the output head are not fake-quantized (frozen in LoRA training; GGUF writes a tied head in q6_k /
q8_0, where the rounding is small).

The layers are switched by swapping ``__class__`` on the instance (as ``quant.layers`` does for bitsandbytes), so
peft and ``state_dict`` see the same modules; :func:`remove_qat` undoes it. The fused LoRA blocks step aside for a
fake-quantized layer (``kernels.lora_parts`` gives the reason) and peft's per-layer forward — the one swapped here —
runs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from fasttune.export.gguf.mixes import FTYPES
from fasttune.export.gguf.quants import dequantize, quantize
from fasttune.export.gguf.writer import export_qtype
from fasttune.export.merge import tied_output_key
from fasttune.lora.unwrap import base_model

from .fp8 import FP8Linear, dequantize_fp8, quantize_fp8
from .layers import QAT_PLAN_KEY, dequantize_weight, is_fake_quantized, is_quantized_linear

logger = logging.getLogger("fasttune")

Q = GGMLQuantizationType
_UNQUANTIZED = (Q.F32, Q.F16, Q.BF16)

#: Unsloth's QAT scheme names (fake-quantized in torch).
TORCH_SCHEMES: tuple[str, ...] = ("int4", "int8-int4", "fp8-int4", "fp8-fp8")
#: one scheme per quantized GGUF file type fasttune writes (the exporter's list, not a copy of it)
GGUF_SCHEMES: tuple[str, ...] = tuple(name for name, ft in FTYPES.items() if ft.qtype not in _UNQUANTIZED)
QAT_SCHEMES: tuple[str, ...] = TORCH_SCHEMES + GGUF_SCHEMES

INT4_GROUP = 32  # the int4 weight group of the torch schemes


def scheme_problem(option: str, value: Any) -> str | None:
    """Why ``value`` is not a QAT scheme (a line naming ``option``, the value and the allowed names), or None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in QAT_SCHEMES):
        return None
    return f"{option}: {value!r} is not a QAT scheme; choose one of {list(QAT_SCHEMES)} (or None for no QAT)"


def normalize_scheme(scheme: str) -> str:
    """The scheme's canonical name (``" Q4_K_M"`` -> ``"q4_k_m"``); an unknown one raises, listing the allowed."""
    problem = scheme_problem("qat_scheme", scheme)
    if problem:
        raise ValueError(problem)
    return scheme.strip().lower()


# ------------------------------------------------------------------------------------------ the fake quantizers


def gguf_fake_quantize(weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """``dequantize(quantize(weight))`` through the GGUF exporter's own quantizer, float32, shaped like ``weight``.

    ``weight`` (rows, cols) is read as float32, as ``export.gguf.writer.convert_tensor`` reads a merged tensor. No
    gradient (see :class:`_StraightThrough`)."""
    qtype = Q(qtype)
    data = weight.detach().to(torch.float32, copy=True).cpu().numpy()
    if qtype == Q.F32:
        out = data
    else:
        out = dequantize(quantize(data, qtype), qtype).reshape(data.shape)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(weight.device)


def int4_fake_quantize(weight: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Symmetric int4 per group of ``group`` columns: ``scale = absmax / 7.5``,
    ``q = clamp(round(w * (1/scale)), -8, 7)``, back to ``q * scale`` in float32: torchao's int4 grid and rounding,
    bit for bit (tests/quant/test_qat.py, through ``convert_qat``). A row length ``group`` does not divide is an
    error naming it."""
    rows, cols = weight.shape
    if cols % group:
        raise ValueError(f"int4 QAT: a weight row of {cols} values is not a multiple of the group size {group}")
    w = weight.detach().float().reshape(rows, cols // group, group)
    scale = (w.abs().amax(dim=-1, keepdim=True) / 7.5).clamp(min=torch.finfo(torch.float32).eps)
    return (torch.clamp(torch.round(w * (1.0 / scale)), -8, 7) * scale).reshape(rows, cols)


def fp8_fake_quantize(t: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one scale per slice along the last dim (per output row for a weight, per token for
    activations): the row quantizer of FP8 storage (``quant.fp8.quantize_fp8``), dequantized, float32."""
    flat = t.detach().reshape(-1, t.shape[-1])
    return dequantize_fp8(*quantize_fp8(flat, "row")).reshape(t.shape)


def int8_token_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8 per token (last dim): ``scale = (max - min) / 255``, zero point rounded, values in [-128, 127]."""
    v = x.detach().float()
    lo = v.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = v.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = torch.round(-128 - lo / scale)
    q = torch.clamp(torch.round(v * (1.0 / scale)) + zero, -128, 127)
    return (q - zero) * scale


class _StraightThrough(torch.autograd.Function):
    """``forward(t, fake) = fake`` (the fake-quantized value, computed outside), ``backward = identity`` to ``t``."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return fake.to(t.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _activation_fake(scheme: str, x: torch.Tensor) -> torch.Tensor:
    if scheme == "int8-int4":
        return _StraightThrough.apply(x, int8_token_fake_quantize(x))
    if scheme in ("fp8-int4", "fp8-fp8"):
        return _StraightThrough.apply(x, fp8_fake_quantize(x))
    return x


# --------------------------------------------------------------------------------------------- per-layer state


@dataclass
class QATLayerPlan:
    """What one layer is fake-quantized to: the scheme, and for a GGUF scheme the tensor's GGUF type."""

    scheme: str
    qtype: GGMLQuantizationType | None = None
    name: str = ""


_PLAN = QAT_PLAN_KEY  # the plan, in the layer's __dict__ beside _fasttune_original_class (quant.layers' swap)
_CACHE = "_fasttune_qat_cache"


def _merged_weight(layer: nn.Module) -> torch.Tensor:
    """``W + sum_a s_a B_a A_a`` in float32 for a peft LoRA layer (the active, unmerged adapters), ``W`` for a plain
    linear; differentiable in A, B (and in W when it trains). The same sum, in the same order, as export.merge."""
    if isinstance(layer, LoraLinear):
        weight = dequantize_weight(layer.base_layer).float()
        if not layer.disable_adapters:
            for name in layer.active_adapters:
                if name in layer.lora_A and name not in layer.merged_adapters:
                    a = layer.lora_A[name].weight.float()
                    b = layer.lora_B[name].weight.float()
                    weight = weight + (b @ a) * float(layer.scaling[name])
        return weight
    return dequantize_weight(layer).float()


def _version_key(layer: nn.Module) -> tuple:
    """Changes whenever a tensor the merged weight is made of changes (in-place optimizer steps bump ``_version``)."""
    tensors = [p for p in layer.parameters() if p.dtype.is_floating_point] + list(layer.buffers())
    key = [(t.data_ptr(), t._version) for t in tensors]
    if isinstance(layer, LoraLinear):
        key += [layer.disable_adapters, tuple(layer.active_adapters), tuple(layer.merged_adapters)]
    return tuple(key)


def _weight_fake(plan: QATLayerPlan, weight: torch.Tensor) -> torch.Tensor:
    if plan.qtype is not None:
        return gguf_fake_quantize(weight, plan.qtype)
    if plan.scheme == "fp8-fp8":
        return fp8_fake_quantize(weight)
    return int4_fake_quantize(weight)


def fake_weight(layer: nn.Module) -> torch.Tensor:
    """The fake-quantized (merged) weight of a QAT layer, float32 ``(out, in)``, without gradient; cached until one of
    the layer's tensors changes."""
    plan: QATLayerPlan = layer.__dict__[_PLAN]
    key = _version_key(layer)
    cached = layer.__dict__.get(_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        fake = _weight_fake(plan, _merged_weight(layer))
    layer.__dict__[_CACHE] = (key, fake)
    return fake


class _FakeQuantLinear(torch.autograd.Function):
    """``y = x @ fq(W')^T + b`` for a frozen base (LoRA or none), ``W' = W + s B A``; STE gradients to A and B:
    ``dx = g fq(W')``, ``dA = s (g B)^T x``, ``dB = s g^T (x A^T)`` (``dW' = g^T x`` never formed). Saves ``x`` and
    the factors only; backward reads the cached fake-quantized weight (nothing of size (out, in) is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, layer: nn.Module,
                scaling: float, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer, ctx.scaling = layer, scaling
        ctx.save_for_backward(x, lora_a, lora_b)
        return F.linear(x, fake_weight(layer).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, lora_a, lora_b = ctx.saved_tensors
        dx = grad @ fake_weight(ctx.layer).to(grad.dtype) if ctx.needs_input_grad[0] else None
        d_a = d_b = None
        if lora_a is not None:
            g = grad.reshape(-1, grad.shape[-1]).to(lora_a.dtype)
            xs = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
            gb = g @ lora_b  # (N, r)
            d_a = (gb.t() @ xs) * ctx.scaling
            d_b = (g.t() @ (xs @ lora_a.t())) * ctx.scaling
        return dx, d_a, d_b, None, None, None


def _adapter(layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """The one active, unmerged adapter of a LoRA layer as (A, B, scaling); (None, None, 0) when none is."""
    if not isinstance(layer, LoraLinear) or layer.disable_adapters:
        return None, None, 0.0
    active = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    if len(active) > 1:
        raise NotImplementedError(f"QAT: {len(active)} adapters are active at once ({active}) on one layer; QAT "
                                  "trains one adapter at a time")
    if not active:
        return None, None, 0.0
    name = active[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


def _qat_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``y = act_fq(x) @ STE(fq(W'))^T + b`` in the compute dtype (fp16 on CPU computes in fp32)."""
    plan: QATLayerPlan | None = self.__dict__.get(_PLAN)
    if plan is None:  # remove_qat ran after a fast forward captured this one: the layer's own forward
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer if isinstance(self, LoraLinear) else self
    compute = getattr(base, "compute_dtype", None) or x.dtype
    if compute == torch.float16 and x.device.type == "cpu":
        compute = torch.float32
    xin = _activation_fake(plan.scheme, x.to(compute))
    bias = base.bias.to(compute) if base.bias is not None else None
    if not isinstance(self, LoraLinear) and self.weight.requires_grad:  # full fine-tuning: dW through the STE
        weight = _StraightThrough.apply(self.weight, fake_weight(self)).to(compute)
        return F.linear(xin, weight, bias).to(x.dtype)
    lora_a, lora_b, scaling = _adapter(self)
    return _FakeQuantLinear.apply(xin, lora_a, lora_b, self, scaling, bias).to(x.dtype)


class QATLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` computing with the fake-quantized merged weight (module docstring)."""

    forward = _qat_forward


class QATLinear(nn.Linear):
    """A trainable ``nn.Linear`` (full fine-tuning) computing with its fake-quantized weight."""

    forward = _qat_forward


# ------------------------------------------------------------------------------------------------- apply / undo


def _decoder_linears(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear the export quantizes as a block weight: peft LoRA layers and plain linears
    outside them, the output head and embeddings excluded."""
    head = base.get_output_embeddings()
    found: list[tuple[str, nn.Module]] = []
    inside_lora: set[int] = set()
    for name, module in base.named_modules():
        if isinstance(module, LoraLinear):
            found.append((name, module))
            inside_lora.update(id(m) for m in module.modules())
    for name, module in base.named_modules():
        if id(module) in inside_lora or module is head or (head is not None and module is getattr(head, "base_layer",
                                                                                                     None)):
            continue
        if (isinstance(module, nn.Linear) or is_quantized_linear(module)) and not isinstance(module, LoraLinear):
            found.append((name, module))
    return found


def check_qat_model(model: nn.Module, scheme: str, option: str = "qat_scheme") -> None:
    """Refuse what QAT cannot train for: a bitsandbytes 4-bit/8-bit base (its storage would sit between the trained
    weights and the exported ones), LoRA dropout or a LoRA variant (no merged weight to fake-quantize)."""
    base = base_model(model)
    if scheme in TORCH_SCHEMES and scheme != "fp8-fp8":
        for name, module in _decoder_linears(base):
            if module.in_features % INT4_GROUP:
                raise ValueError(f"{option}={scheme!r}: {name} has rows of {module.in_features} values, not a "
                                 f"multiple of the int4 group size {INT4_GROUP}; use 'fp8-fp8' or a GGUF scheme "
                                 "(whose exporter falls back per tensor, as llama.cpp does)")
    for name, module in base.named_modules():
        if is_quantized_linear(module) and not isinstance(module, FP8Linear):
            kind = "4-bit" if "4bit" in type(module).__name__ else "8-bit"
            raise ValueError(
                f"{option}={scheme!r}: the model was loaded in {kind} (bitsandbytes, e.g. {name}); QAT trains "
                f"against the rounding of the exported model, and a {kind} base adds a second, different rounding "
                "under it. Load with load_in_4bit=False (16-bit) or load_in_fp8=True, then add qat_scheme")
        if isinstance(module, LoraLinear):
            for adapter in module.active_adapters:
                dropout = module.lora_dropout[adapter] if adapter in module.lora_dropout else None
                if dropout is not None and not isinstance(dropout, nn.Identity):
                    raise ValueError(f"{option}={scheme!r}: QAT fake-quantizes the merged weight W + s*B@A, which "
                                     "has no place for dropout on the LoRA input; use lora_dropout=0")
                if adapter in getattr(module, "lora_variant", {}):
                    raise ValueError(f"{option}={scheme!r}: adapter {adapter!r} uses a LoRA variant (DoRA); QAT "
                                     "supports plain LoRA (use_dora=False)")


def apply_qat(model: nn.Module, scheme: str) -> int:
    """Make every decoder linear of ``model`` (a peft LoRA model or a plain transformers model) fake-quantize with
    ``scheme``; returns how many layers. A GGUF scheme asks the exporter which type each tensor gets."""
    scheme = normalize_scheme(scheme)
    check_qat_model(model, scheme)
    base = base_model(model)
    tied = tied_output_key(base) is not None or base.get_output_embeddings() is None
    count = 0
    for name, module in _decoder_linears(base):
        if is_fake_quantized(module):
            continue
        qtype = None
        weight_shape = (module.out_features, module.in_features)
        if scheme in GGUF_SCHEMES:
            qtype = export_qtype(base.config, f"{name}.weight", weight_shape, scheme, tied)
        module.__dict__[_PLAN] = QATLayerPlan(scheme, qtype, name)
        if "_fasttune_qat_class" not in module.__dict__:
            module.__dict__["_fasttune_qat_class"] = type(module)
        module.__class__ = QATLoraLinear if isinstance(module, LoraLinear) else _qat_class(type(module))
        count += 1
    logger.info("fasttune: QAT %s on %d linear layers", scheme, count)
    return count


@functools.cache
def _qat_class(cls: type) -> type:
    """``QATLinear`` for ``nn.Linear``; for a subclass (fasttune's FP8 layer) a subclass of it with the QAT forward."""
    if cls is nn.Linear:
        return QATLinear
    return type(f"QAT{cls.__name__}", (cls,), {"forward": _qat_forward})


def remove_qat(model: nn.Module) -> int:
    """Undo :func:`apply_qat` (the layers compute with their real weights again). Returns how many layers."""
    count = 0
    for module in base_model(model).modules():
        original = module.__dict__.pop("_fasttune_qat_class", None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop(_PLAN, None)
            module.__dict__.pop(_CACHE, None)
            count += 1
    return count


def layer_plans(model: nn.Module) -> dict[str, QATLayerPlan]:
    """Each fake-quantized layer's plan, by module name (for reports and tests)."""
    return {name: m.__dict__[_PLAN] for name, m in base_model(model).named_modules() if is_fake_quantized(m)}


# ------------------------------------------------------------------------------------- the real quantized form


def torchao_config(scheme: str) -> Any:
    """torchao's config for the real quantized form of a torch scheme whose int4 grid the fake quantizer uses (int4 ->
    ``IntxWeightOnlyConfig``, int8-int4 -> ``Int8DynamicActivationIntxWeightConfig``, both int4 symmetric in groups
    of 32 and run on CPU; fp8-int4 -> ``Float8DynamicActivationInt4WeightConfig``, CUDA only, unchecked here)."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationInt4WeightConfig,
            Int8DynamicActivationIntxWeightConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerGroup
    except ImportError as err:
        raise ImportError(f"convert_qat for qat_scheme={scheme!r} needs torchao: pip install 'fasttune[qat]'") from err
    if scheme == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))
    if scheme == "int8-int4":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP))
    if scheme == "fp8-int4":
        return Float8DynamicActivationInt4WeightConfig()
    raise ValueError(f"qat_scheme: {scheme!r} has no torchao form here; torch schemes: {list(TORCH_SCHEMES)}")


def convert_qat(model: nn.Module) -> nn.Module:
    """The QAT model in the real quantized form its scheme names, returned as a plain transformers model (the peft
    wrapper is dropped: each adapted layer holds its merged weight, rounded exactly as the training rounded it).

    fp8-fp8 -> fasttune's FP8 storage with row scales (``quant.fp8.FP8Linear``: the fake quantizer's own rounding);
    int4 / int8-int4 -> torchao's int4 tensors (bit for bit the fake quantizer's weights, tests/quant/test_qat.py);
    fp8-int4 -> torchao's float8-activation / int4-weight form (CUDA only). A GGUF scheme's real form is the GGUF file:
    ``save_pretrained_gguf(..., quantization_method=scheme)``. Quantization starts from the float32 merged weights.
    The model passed in is changed (its adapters are unloaded)."""
    plans = layer_plans(model)
    if not plans:
        raise ValueError("convert_qat: the model has no QAT layers; train with get_peft_model(qat_scheme=...) or "
                         "from_pretrained(full_finetuning=True, qat_scheme=...)")
    scheme = next(iter(plans.values())).scheme
    if scheme in GGUF_SCHEMES:
        raise ValueError(f"convert_qat: qat_scheme={scheme!r} is a GGUF type; its real form is the GGUF file: "
                         f"model.save_pretrained_gguf(folder, tokenizer, quantization_method={scheme!r})")
    base = base_model(model)
    with torch.no_grad():
        merged = {name: _merged_weight(base.get_submodule(name)).detach() for name in plans}
    config = None if scheme == "fp8-fp8" else torchao_config(scheme)
    remove_qat(model)
    plain = model.unload() if hasattr(model, "unload") else model
    for name, weight in merged.items():
        old = plain.get_submodule(name)
        dense = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if old.bias is not None:
            dense.bias = nn.Parameter(old.bias.detach().float(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, dense)
    if config is None:
        compute = getattr(plain.get_input_embeddings().weight, "dtype", torch.float32)
        for name in merged:
            layer = FP8Linear.from_linear(plain.get_submodule(name), "row", compute)
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, layer)
    else:
        from torchao.quantization import quantize_

        quantize_(plain, config, filter_fn=lambda module, fqn: fqn in merged)
    logger.info("fasttune: QAT %s converted: %d linear layers in their quantized form", scheme, len(merged))
    return plain


__all__ = ["GGUF_SCHEMES", "QAT_SCHEMES", "TORCH_SCHEMES", "QATLayerPlan", "apply_qat", "check_qat_model",
           "convert_qat", "fake_weight", "fp8_fake_quantize", "gguf_fake_quantize", "int4_fake_quantize", "is_fake_quantized",
           "layer_plans", "normalize_scheme", "remove_qat", "scheme_problem"]
