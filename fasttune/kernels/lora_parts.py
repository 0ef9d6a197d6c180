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


@dataclass(frozen=True)
class Precision:
    """The dtypes one fused block computes in, fixed at its forward and reused by its backward.

    Under ``torch.autocast`` every product runs in autocast's dtype, as ``F.linear`` would run it there (peft's LoRA
    layers under the Trainer's bf16 autocast compute their fp32 adapters in bf16, and so do their backward products);
    otherwise the base product runs in the base's compute dtype and the LoRA branch in the adapters' dtype (peft
    keeps adapters in fp32 for a bf16 model). The block's own ops then run with autocast off, in exactly these dtypes.
    """

    base: torch.dtype
    lora: torch.dtype | None

    @staticmethod
    def of(x: torch.Tensor, parts: tuple[LoraParts, ...], factors: tuple[torch.Tensor | None, ...]) -> Precision:
        device = x.device.type
        lora = next((a.dtype for a in factors[0::2] if a is not None), None)
        if x.is_floating_point() and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            return Precision(dtype, dtype if lora is not None else None)
        return Precision(base_compute_dtype(parts[0].base, x), lora)


def _active(parts: tuple[LoraParts, ...], factors: tuple[torch.Tensor | None, ...]) -> list[int]:
    return [i for i in range(len(parts)) if factors[2 * i] is not None]


def project_group(x: torch.Tensor, parts: tuple[LoraParts, ...], factors: tuple[torch.Tensor | None, ...],
                  precision: Precision) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T`` for projections sharing the input ``x`` ``(N, in)``.

    ``factors`` = ``(A_0, B_0, A_1, B_1, ...)`` (None where a projection has no active adapter). Returns the outputs
    (in x's dtype) and ``x [A_i]^T`` ``(N, sum r_i)`` in the LoRA dtype -- one product for every adapter of the group,
    kept by the caller for backward (tiny) -- or None without adapters. No autograd graph is built.
    """
    active = _active(parts, factors)
    xb = x.to(precision.base)
    xa = None
    if active:
        xl = x.to(precision.lora)
        xa = torch.cat([xl @ factors[2 * i].to(precision.lora).t() for i in active], dim=1)
    outs, col = [], 0
    for i, p in enumerate(parts):
        bias = p.bias
        out = F.linear(xb, base_weight(p, precision.base), None if bias is None else bias.to(precision.base))
        if factors[2 * i] is not None:
            r = factors[2 * i].shape[0]
            b = factors[2 * i + 1].to(precision.lora)
            low = (xa[:, col:col + r] @ b.t()).mul_(p.scaling)  # peft's order: (x A^T B^T) * s, then the sum
            # fp32 adapters beside a bf16 base and no autocast: the sum in the adapters' dtype, as peft does
            out = out.add_(low) if low.dtype == out.dtype else out.to(low.dtype).add_(low)
            col += r
        outs.append(out.to(x.dtype))
    return outs, xa


def project_group_backward(
    grads: tuple[torch.Tensor | None, ...], x: torch.Tensor, parts: tuple[LoraParts, ...],
    factors: tuple[torch.Tensor | None, ...], xa: torch.Tensor | None, precision: Precision, need_x: bool = True,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of :func:`project_group` given each ``dL/dy_i`` ``(N, out_i)`` (None: no gradient) and ``xa``.

    ``dx = sum_i [dy_i W_i + s_i (dy_i B_i) A_i]``, ``dA_i = s_i (dy_i B_i)^T x``, ``dB_i = s_i dy_i^T (x A_i^T)``;
    all ``dA_i`` come from one stacked product. Returns ``dx`` (x's dtype, or None) and the
    factor gradients ``[dA_0, dB_0, ...]`` in the factors' dtypes.
    """
    d_factors: list[torch.Tensor | None] = [None] * (2 * len(parts))
    offsets, col = {}, 0
    for i in _active(parts, factors):
        offsets[i] = col
        col += factors[2 * i].shape[0]
    active = [i for i in offsets if grads[i] is not None]
    scaled = {}
    for i in active:
        a, b, s = factors[2 * i], factors[2 * i + 1], parts[i].scaling
        g = grads[i].to(precision.lora)
        d_factors[2 * i + 1] = ((g.t() @ xa[:, offsets[i]:offsets[i] + a.shape[0]]) * s).to(b.dtype)
        scaled[i] = g @ b.to(precision.lora)  # (N, r_i): dy_i B_i (scaled after the products, as peft's order)
    if active:  # every dA_i = s_i (dy_i B_i)^T x from one product
        gbs = torch.cat([scaled[i] for i in active], dim=1) if len(active) > 1 else scaled[active[0]]
        d_a = gbs.t() @ x.to(precision.lora)  # (sum r_i, in)
        row = 0
        for i in active:
            r = factors[2 * i].shape[0]
            d_factors[2 * i] = (d_a[row:row + r] * parts[i].scaling).to(factors[2 * i].dtype)
            row += r
    dx = None
    if need_x:  # projection by projection, base then LoRA term, as autograd through peft sums them
        for i, (p, g) in enumerate(zip(parts, grads)):
            if g is None:
                continue
            dxi = g.to(precision.base) @ base_weight(p, precision.base)
            if i in scaled:
                low = (scaled[i] @ factors[2 * i].to(precision.lora)).mul_(parts[i].scaling)
                dxi = dxi.add_(low) if dxi.dtype == low.dtype else dxi.to(x.dtype) + low.to(x.dtype)
            dx = dxi if dx is None else dx.add_(dxi)
    return (None if dx is None else dx.to(x.dtype)), d_factors
