"""FP8 weights: frozen linear layers stored in float8 e4m3 with float32 scales, LoRA on top in the compute dtype.

``from_pretrained(load_in_fp8=True)`` stores each decoder linear weight as ``float8_e4m3fn`` with **one scale per
output row** ("row"): a row is what one output feature reads, its scale costs 4 bytes per row (nothing next to the
row), and on CUDA ``torch._scaled_mm`` takes row-wise scales directly. ``load_in_fp8="block"`` (Unsloth's spelling)
uses **128 x 128 blocks** instead, the layout DeepSeek-V3 and Qwen3-FP8 checkpoints ship (``weight_scale_inv``): an
outlier then only coarsens its own block, at the price of a scale per block. A checkpoint already stored that way
(``quantization_config.quant_method == "fp8"``, ``weight_block_size``) is loaded as it is: its float8 bytes and
scales become the layer's, nothing is re-quantized (:func:`load_fp8_checkpoint`).

``weight_scale_inv`` is the *dequantization* multiplier, as in those checkpoints: ``W = float(weight) * scale``
broadcast over the row / block. Quantizing: ``scale = absmax / 448`` (448 = e4m3's largest finite value),
``weight = round_e4m3(W / scale)``.

The forward is exact dequantize-and-multiply in the compute dtype (torch holds float8 on CPU, but has no float8
matmul there); :class:`_FrozenFP8Linear` keeps nothing of size (out, in) for backward, which dequantizes again (as
``quant.layers``' 4-bit path does). On CUDA with row scales, the forward can use ``torch._scaled_mm`` (activations
quantized per token to e4m3: that is FP8 compute, not exact; enabled with ``FASTTUNE_FP8_SCALED_MM=1``, unchecked
here: no GPU on the machines this was written on).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("fasttune")

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
BLOCK = 128
#: load_in_fp8's values and the granularity each gives (True is Unsloth's default spelling)
FP8_MODES: dict[Any, str] = {True: "row", "row": "row", "block": "block"}


def fp8_problem(value: Any, device: str | torch.device | None = None) -> str | None:
    """Why ``load_in_fp8=value`` cannot be used here (a line naming the option, the value and what is allowed), or
    None. False / None mean no FP8."""
    if value is False or value is None:
        return None
    if not (value is True or (isinstance(value, str) and value in FP8_MODES)):
        return f"load_in_fp8: {value!r} is not allowed; choose one of [False, True, 'row', 'block']"
    if FP8_DTYPE is None:
        return f"load_in_fp8={value!r}: this torch ({torch.__version__}) has no float8_e4m3fn dtype; use torch >= 2.1"
    try:
        torch.zeros(1, dtype=FP8_DTYPE, device=device or "cpu").float()
    except (RuntimeError, TypeError) as err:
        return f"load_in_fp8={value!r}: the device {device} cannot hold float8_e4m3fn tensors ({err})"
    return None


def granularity_of(value: Any) -> str:
    return FP8_MODES[value]


def quantize_fp8(weight: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float8 weight (out, in), float32 scale)`` with ``weight * scale ~= W``; scale ``(out, 1)`` for "row",
    ``(ceil(out/128), ceil(in/128))`` for "block"."""
    w = weight.detach().float()
    rows, cols = w.shape
    if granularity == "row":
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, scale
    if granularity != "block":
        raise ValueError(f"granularity: {granularity!r} is not allowed; choose 'row' or 'block'")
    rb, cb = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = F.pad(w, (0, cb * BLOCK - cols, 0, rb * BLOCK - rows))
    blocks = padded.reshape(rb, BLOCK, cb, BLOCK)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # (rb, cb)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(rb * BLOCK, cb * BLOCK)[:rows, :cols].contiguous(), scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``float(weight) * scale`` broadcast over rows (scale ``(out, 1)``) or 128 x 128 blocks, in ``dtype``. The
    product is formed in float32 (exact for e4m3 times a float32 scale up to float32 rounding), then cast."""
    rows, cols = weight.shape
    w = weight.float()
    s = scale.float()
    if s.shape == (rows, 1):
        dense = w * s
    else:
        expanded = s.repeat_interleave(BLOCK, dim=0)[:rows].repeat_interleave(BLOCK, dim=1)[:, :cols]
        dense = w * expanded
    return dense.to(dtype)


class _FrozenFP8Linear(torch.autograd.Function):
    """``y = x @ W^T + b`` with ``W = dequant(layer)`` frozen; backward dequantizes again (nothing (out, in) kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FP8Linear) -> torch.Tensor:
        ctx.layer = layer
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        if _use_scaled_mm(layer, x):
            return _scaled_mm_forward(x, layer, bias)
        return F.linear(x, layer.dequantized(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dequantized(grad_out.dtype), None


def _use_scaled_mm(layer: FP8Linear, x: torch.Tensor) -> bool:
    return (x.is_cuda and layer.granularity == "row" and os.environ.get("FASTTUNE_FP8_SCALED_MM") == "1"
            and hasattr(torch, "_scaled_mm") and layer.in_features % 16 == 0 and layer.out_features % 16 == 0)


def _scaled_mm_forward(x: torch.Tensor, layer: FP8Linear, bias: torch.Tensor | None) -> torch.Tensor:
    """CUDA only (unchecked here): activations per token to e4m3, ``torch._scaled_mm`` with row-wise scales."""
    flat = x.reshape(-1, x.shape[-1])
    x_scale = (flat.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    x_fp8 = (flat.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    out = torch._scaled_mm(x_fp8, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale_inv.float().t(),
                           bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class FP8Linear(nn.Linear):
    """A frozen linear layer with a float8 e4m3 ``weight`` and float32 ``weight_scale_inv`` (row or block scales).

    A subclass of ``nn.Linear`` so peft wraps it with its LoRA ``Linear``; ``compute_dtype`` tells peft (and the
    fused LoRA blocks) which dtype the adapters and the product use.
    """

    is_fp8 = True

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, granularity: str) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no dense weight is ever allocated
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale_inv", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.granularity = granularity

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str, compute_dtype: torch.dtype | None = None) -> FP8Linear:
        q, scale = quantize_fp8(linear.weight, granularity)
        return cls(q, scale, linear.bias, compute_dtype or linear.weight.dtype, granularity)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale_inv, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        compute = self.compute_dtype
        if compute == torch.float16 and x.device.type == "cpu":
            compute = torch.float32
        return _FrozenFP8Linear.apply(x.to(compute), self).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"float8_e4m3fn, {self.granularity} scales")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fp8_targets(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the plain ``nn.Linear`` layers to store in FP8: all but the output head and the ``skip`` names."""
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and m is not head and not any(s in name for s in skip)]


def convert_to_fp8(model: nn.Module, granularity: str, compute_dtype: torch.dtype,
                   skip: tuple[str, ...] = ()) -> int:
    """Replace each plain linear (not the output head, not ``skip``) by an :class:`FP8Linear`, one at a time (the
    16-bit weight is freed as soon as its FP8 copy exists). Returns how many."""
    names = fp8_targets(model, skip)
    for name in names:
        _replace(model, name, FP8Linear.from_linear(model.get_submodule(name), granularity, compute_dtype))
    return len(names)


# ------------------------------------------------------------------------------------- FP8 checkpoints (block scales)


def fp8_checkpoint_block(config: Any) -> tuple[int, int] | None:
    """The ``weight_block_size`` of a checkpoint stored in FP8 (``quantization_config.quant_method == "fp8"``), or
    None for any other checkpoint. Only 128 x 128 blocks (DeepSeek, Qwen3-FP8) are supported: others are an error."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "fp8":
        return None
    block = tuple(qc.get("weight_block_size") or ())
    if block != (BLOCK, BLOCK):
        raise ValueError(f"quantization_config.weight_block_size: {list(block)} is not supported; fasttune loads FP8 "
                         f"checkpoints with [{BLOCK}, {BLOCK}] blocks (DeepSeek / Qwen3-FP8 layout)")
    return block


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def load_fp8_checkpoint(model: nn.Module, folder: str | os.PathLike, compute_dtype: torch.dtype) -> int:
    """Give every linear whose checkpoint tensor is float8 with a ``weight_scale_inv`` its stored bytes and scales
    (an :class:`FP8Linear` with block scales). ``model`` was built with the dense layers (their values unused).
    Returns how many layers; a float8 weight without its scale is an error naming it."""
    from safetensors import safe_open

    count = 0
    for path in _safetensors_files(Path(folder)):
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if not key.endswith(".weight_scale_inv"):
                    continue
                module_name = key[: -len(".weight_scale_inv")]
                weight_key = module_name + ".weight"
                if weight_key not in keys:
                    raise ValueError(f"{path.name}: {key} has no {weight_key} beside it")
                weight = f.get_tensor(weight_key)
                if weight.dtype != FP8_DTYPE:
                    raise ValueError(f"{path.name}: {weight_key} is {weight.dtype}, expected float8_e4m3fn with "
                                     "its weight_scale_inv")
                try:
                    linear = model.get_submodule(module_name)
                except AttributeError as err:
                    raise ValueError(f"{path.name}: {module_name} is not a module of this "
                                     f"{type(model).__name__}") from err
                scale = f.get_tensor(key).float()
                expected = (math.ceil(weight.shape[0] / BLOCK), math.ceil(weight.shape[1] / BLOCK))
                if tuple(scale.shape) != expected:
                    raise ValueError(f"{path.name}: {key} has shape {tuple(scale.shape)}, expected {expected} for "
                                     f"a {tuple(weight.shape)} weight in {BLOCK}x{BLOCK} blocks")
                _replace(model, module_name, FP8Linear(weight, scale, linear.bias, compute_dtype, "block"))
                count += 1
    return count


def dequantize_fp8_layers(model: nn.Module) -> int:
    """Replace every :class:`FP8Linear` by an ``nn.Linear`` holding its exact dequantized weight (compute dtype)."""
    names = [name for name, m in model.named_modules() if isinstance(m, FP8Linear)]
    for name in names:
        layer = model.get_submodule(name)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        dense.weight = nn.Parameter(layer.dequantized(layer.compute_dtype))
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().to(layer.compute_dtype))
        _replace(model, name, dense)
    return len(names)


def checkpoint_folder(name: str, token: str | None = None, revision: str | None = None) -> Path:
    """The local folder holding the safetensors of ``name`` (a folder, or a Hub id already in the cache, where
    transformers just put it)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, revision=revision, token=token,
                                  allow_patterns=["*.safetensors", "*.safetensors.index.json"]))


__all__ = ["FP8Linear", "FP8_MODES", "checkpoint_folder", "convert_to_fp8", "dequantize_fp8", "dequantize_fp8_layers",
           "fp8_checkpoint_block", "fp8_problem", "granularity_of", "load_fp8_checkpoint", "quantize_fp8"]
