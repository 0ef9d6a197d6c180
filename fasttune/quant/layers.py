"""Quantized linear layers whose training path is correct on every device.

bitsandbytes stores the weights (NF4 4-bit, LLM.int8 8-bit) and fasttune keeps that storage untouched, so a saved
model stays loadable by transformers. What we replace is the *forward* of each loaded layer, on the instance:

* bitsandbytes' CPU 4-bit forward repacks the weight into a kernel-specific layout the first time it runs in eval /
  no-grad mode (e.g. inside ``generate``). After that, training goes through a kernel with no autograd support and
  LoRA gradients come out silently wrong; its eval kernel also fails when a dimension is not a multiple of 32.
* fasttune's forward dequantizes the weight exactly (bitsandbytes' own ``dequantize_4bit``), multiplies, and frees it.
  A layer bitsandbytes already repacked is read in place, with the bf16 scales the repack left (see
  ``_dequantize_cpu_packed`` for what is exact there and what is not).
  Backward dequantizes again: nothing of size (out, in) is kept between forward and backward.

The swap sets ``__class__`` to a subclass of the bitsandbytes class, so peft's LoRA dispatch still recognises the
layer (its bnb branches test ``isinstance``), ``state_dict`` is unchanged, and ``restore_layers`` undoes it.
"""

from __future__ import annotations

import bitsandbytes as bnb  # first imported under fasttune.notes.quiet_kernel_probe (fasttune/__init__.py)
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant
from torch import nn

from .fp8 import FP8Linear

# Rows per block of bitsandbytes' CPU packing (``block_n`` of ``_convert_weight_packed_for_cpu``, its default).
CPU_PACK_BLOCK_ROWS = 32


def _dequantize_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """The dense ``(N, K)`` weight of a 4-bit layer that bitsandbytes repacked for its AVX512 CPU kernel.

    The repack (``bitsandbytes.functional._convert_weight_packed_for_cpu``) does two things:

    * it permutes the 4-bit codes: packed is ``(N, K/2)`` bytes; viewed as rows of 32 bytes, each row holds one
      ``(32 rows x 2 columns)`` tile of codes, tile element ``j`` (row-major) in byte ``j % 32``'s low nibble for
      ``j < 32``, high nibble otherwise. Undoing that is exact;
    * it stores the absmax scales as ``(K / blocksize, N)`` bf16 (after dequantizing the double-quantized ones).
      That rounding is NOT undone (it cannot be): each block's absmax ``a`` becomes ``bf16(a)``, with
      ``|bf16(a) - a| <= 2^-8 |a|`` (bf16 keeps 8 significant bits, rounding to nearest), and since every NF4 / FP4 code
      lies in [-1, 1], each weight moves by at most ``2^-8`` times its block's absmax.

    This returns ``code[q] * bf16(a)``: exactly what bitsandbytes' packed kernel multiplies with. It deliberately does
    not call bitsandbytes' ``_convert_weight_packed_for_cpu_inverse``: that re-quantizes a double-quantized absmax
    (another 8-bit rounding on top of bf16) and leaves a plain absmax in the packed ``(K / blocksize, N)`` order,
    which scrambles the scales of every layer quantized without double quantization. The layer is left untouched.
    """
    rows, half_k = packed.shape
    tiles = packed.reshape(-1, CPU_PACK_BLOCK_ROWS)
    lanes = torch.cat((tiles & 0xF, tiles >> 4), dim=1)  # tile elements 0..31 then 32..63
    codes = lanes.reshape(rows // CPU_PACK_BLOCK_ROWS, half_k, CPU_PACK_BLOCK_ROWS, 2).transpose(1, 2)
    codes = codes.reshape(rows, 2 * half_k).long()
    absmax = state.absmax.t().float().repeat_interleave(state.blocksize, dim=1)  # (N, K)
    dense = state.code.to(device=packed.device, dtype=torch.float32)[codes] * absmax
    return dense.to(getattr(state, "original_dtype", state.dtype))


def dequantize_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``(out_features, in_features)`` weight of a linear layer, quantized or not.

    Supports ``nn.Linear`` (returned as is, cast to ``dtype`` if given), bitsandbytes ``Linear4bit`` and
    ``Linear8bitLt`` (and fasttune's subclasses of them), fasttune's ``FP8Linear`` (float8 times its scales). Dequantization is exact: it is the value the quantized
    matmul computes with (for a 4-bit layer that bitsandbytes repacked for its CPU kernel, that value has bf16 scales:
    see :func:`_dequantize_cpu_packed`).
    """
    if isinstance(layer, FP8Linear):
        dense = layer.dequantized(torch.float32)
    elif isinstance(layer, bnb.nn.Linear4bit):
        weight = layer.weight
        # FSDP2 all-gathers the storage into a plain Parameter that has lost its ``quant_state``; bitsandbytes keeps
        # a copy on the module (``Params4bit._quantize`` sets ``module.quant_state``), which is read instead.
        state = getattr(weight, "quant_state", None) or getattr(layer, "quant_state", None)
        if state is None:
            raise ValueError(f"{type(layer).__name__} has no quant_state: was the model quantized before use?")
        if getattr(state, "packing_format_for_cpu", False):
            dense = _dequantize_cpu_packed(weight.data, state)
        else:
            dense = dequantize_4bit(weight.data, state)
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        weight = layer.weight
        scb = weight.SCB if weight.SCB is not None else layer.state.SCB
        if scb is None:
            raise ValueError(f"{type(layer).__name__} has no SCB scales: was the model quantized before use?")
        dense = int8_vectorwise_dequant(weight.data, scb)
    elif isinstance(layer, nn.Linear):
        dense = layer.weight
    else:
        raise TypeError(
            f"dequantize_weight: {type(layer).__name__} is not a supported linear layer; "
            "supported: torch.nn.Linear, bitsandbytes Linear4bit, bitsandbytes Linear8bitLt, fasttune FP8Linear"
        )
    return dense if dtype is None else dense.to(dtype)


class _FrozenQuantLinear(torch.autograd.Function):
    """``y = x @ W^T + b`` with ``W = dequant(layer)`` frozen.

    Saves nothing of size (out, in): backward recomputes ``W`` and returns ``dL/dx = dL/dy @ W``. No gradient flows to
    the quantized weight or the bias (both are frozen in (Q)LoRA training).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        w = dequantize_weight(layer, x.dtype)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = dequantize_weight(ctx.layer, grad_out.dtype)
        return grad_out @ w, None


def _quant_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    compute = getattr(self, "compute_dtype", None) or x.dtype
    if compute == torch.float16 and x.device.type == "cpu":
        compute = torch.float32
    out = _FrozenQuantLinear.apply(x.to(compute), self)
    return out.to(x.dtype)


class FastLinear4bit(bnb.nn.Linear4bit):
    """bitsandbytes NF4 storage, fasttune's exact dequantize-and-multiply forward (see module docstring)."""

    forward = _quant_forward


class FastLinear8bitLt(bnb.nn.Linear8bitLt):
    """bitsandbytes LLM.int8 storage, fasttune's exact dequantize-and-multiply forward."""

    forward = _quant_forward


_SWAPS: tuple[tuple[type, type], ...] = ((bnb.nn.Linear4bit, FastLinear4bit), (bnb.nn.Linear8bitLt, FastLinear8bitLt))


def patch_quantized_layers(model: nn.Module) -> int:
    """Give every bitsandbytes 4-bit/8-bit linear in ``model`` fasttune's forward. Returns how many were swapped."""
    count = 0
    for module in model.modules():
        for base, fast in _SWAPS:
            if type(module) is base:
                module._fasttune_original_class = base
                module.__class__ = fast
                count += 1
    return count


def restore_layers(model: nn.Module) -> int:
    """Undo ``patch_quantized_layers``. Returns how many layers were restored."""
    count = 0
    for module in model.modules():
        original = module.__dict__.pop("_fasttune_original_class", None)
        if original is not None:
            module.__class__ = original
            count += 1
    return count


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, FP8Linear))


# The key of a layer's QAT plan in its __dict__ (set by fasttune.quant.qat.apply_qat); here so that the fused LoRA
# blocks can step aside for a fake-quantized layer without importing the QAT module.
QAT_PLAN_KEY = "_fasttune_qat"


def is_fake_quantized(module: nn.Module) -> bool:
    """True for a layer QAT made compute with its fake-quantized weight (``fasttune.quant.qat``)."""
    return QAT_PLAN_KEY in module.__dict__
