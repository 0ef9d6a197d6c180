"""What a fused LoRA block needs from one peft LoRA layer, and the projection maths shared by every block.

A LoRA projection computes ``y = x W^T + b + s * (x A^T) B^T`` with a frozen base ``W`` (out, in) (dense, or
bitsandbytes 4-bit / 8-bit, read with :func:`fasttune.quant.dequantize_weight`), an optional frozen bias ``b``,
trainable factors ``A`` (r, in) and ``B`` (out, r) and the scale ``s = alpha / r``.

The fused path mirrors peft's dtype handling: the base product runs in the base layer's compute dtype, the LoRA
branch in the adapters' dtype (peft keeps adapters in fp32 for a bf16 model), and the sum is cast back to the input
dtype.

:func:`lora_parts` decides whether a layer can take the fused path at all: one active adapter (or none), no dropout,
no DoRA or other variant, no LoRA bias, frozen base weight and bias, adapters neither disabled nor merged.
Everything else returns a reason string and the caller falls back to peft's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fasttune.quant import dequantize_weight, is_fake_quantized, is_quantized_linear


@dataclass(frozen=True)
class LoraParts:
    """One projection of a fused block.

    ``base`` is the frozen linear layer; ``rows`` selects a slice of its output rows (phi3's fused ``gate_up_proj``
    gives the gate and the up halves as two projections); ``lora_A`` (r, in) / ``lora_B`` (out, r) are the trainable
    factors (None when no adapter is active); ``scaling`` is ``alpha / r``.
    """

    base: nn.Module
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    scaling: float
    rows: slice | None = None

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.base, "bias", None)
        if bias is None or self.rows is None:
            return bias
        return bias[self.rows]

    def sliced(self, rows: slice) -> LoraParts:
        """The same projection restricted to output ``rows`` (B and the bias sliced; A shared)."""
        lora_B = None if self.lora_B is None else self.lora_B[rows]
        return LoraParts(self.base, self.lora_A, lora_B, self.scaling, rows)


def _is_peft_lora(layer: nn.Module) -> bool:
    return hasattr(layer, "lora_A") and hasattr(layer, "lora_B") and hasattr(layer, "base_layer")


def _frozen_base_reason(base: nn.Module) -> str | None:
    if not (isinstance(base, nn.Linear) or is_quantized_linear(base)):
        return f"base layer {type(base).__name__} is not a linear layer fasttune can dequantize"
    weight = getattr(base, "weight", None)
    if weight is not None and weight.requires_grad and not is_quantized_linear(base):
        return "base weight is trainable"
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return "base bias is trainable (bias != 'none')"
    return None


def lora_parts(layer: nn.Module) -> LoraParts | str:
    """The fused-path view of ``layer`` (a peft LoRA ``Linear`` or a plain frozen linear), or why it has none."""
    if is_fake_quantized(layer):
        return "QAT: the layer computes with its fake-quantized (merged) weight"
    if not _is_peft_lora(layer):
        reason = _frozen_base_reason(layer)
        return reason if reason is not None else LoraParts(layer, None, None, 1.0)
    base = layer.base_layer
    reason = _frozen_base_reason(base)
    if reason is not None:
        return reason
    if layer.merged:
        return "adapters are merged into the base weight"
    if layer.disable_adapters:
        return LoraParts(base, None, None, 1.0)
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return LoraParts(base, None, None, 1.0)
    if len(active) > 1:
        return f"{len(active)} adapters are active at once ({active})"
    name = active[0]
    if name in getattr(layer, "lora_variant", {}):
        return f"adapter {name!r} uses a LoRA variant ({type(layer.lora_variant[name]).__name__}, e.g. DoRA)"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return f"adapter {name!r} has lora_bias=True"
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return f"adapter {name!r} has lora_dropout > 0"
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting is disabled on this layer"
    return LoraParts(base, layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]))


def base_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the base product runs in: a quantized layer's compute dtype (fp16 on CPU runs as fp32), else x's."""
    if not is_quantized_linear(base):
        return x.dtype
    dtype = getattr(base, "compute_dtype", None) or x.dtype
    if dtype == torch.float16 and x.device.type == "cpu":
        return torch.float32
    return dtype


def base_weight(parts: LoraParts, dtype: torch.dtype) -> torch.Tensor:
    """The frozen ``(out, in)`` weight (its ``rows`` slice), dequantized fresh; callers drop it after use."""
    weight = dequantize_weight(parts.base, dtype)
    return weight if parts.rows is None else weight[parts.rows]


def project(x: torch.Tensor, parts: LoraParts, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None
            ) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T`` for x ``(N, in)`` -> ``(N, out)`` in x's dtype (no autograd graph needed)."""
    dtype = base_compute_dtype(parts.base, x)
    bias = parts.bias
    out = F.linear(x.to(dtype), base_weight(parts, dtype), None if bias is None else bias.to(dtype))
    if lora_A is not None:
        low = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B)
        out = out + low * parts.scaling
    return out.to(x.dtype)


def project_backward(
    grad: torch.Tensor, x: torch.Tensor, parts: LoraParts, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
    need_x: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`project` given ``dL/dy`` ``(N, out)`` and the saved input ``x`` ``(N, in)``.

    ``dx = dy W + s (dy B) A``, ``dA = s (dy B)^T x``, ``dB = s dy^T (x A^T)``. Returns ``(dx, dA, dB)``; ``dx`` in
    x's dtype, ``dA``/``dB`` in the adapters' dtype; entries are None where not needed.
    """
    dx = None
    if need_x:
        dtype = base_compute_dtype(parts.base, x)
        dx = (grad.to(dtype) @ base_weight(parts, dtype)).to(x.dtype)
    if lora_A is None:
        return dx, None, None
    grad_l = grad.to(lora_A.dtype)
    x_l = x.to(lora_A.dtype)
    grad_b = grad_l @ lora_B  # (N, r)
    d_a = (grad_b.t() @ x_l) * parts.scaling
    d_b = (grad_l.t() @ (x_l @ lora_A.t())) * parts.scaling
    if need_x:
        dx = dx + ((grad_b @ lora_A) * parts.scaling).to(x.dtype)
    return dx, d_a, d_b
