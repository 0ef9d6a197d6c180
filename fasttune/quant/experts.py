"""4-bit (NF4) storage of a mixture of experts' 3-D expert weights, dequantized per expert on demand.

bitsandbytes quantizes ``nn.Linear`` layers only; transformers (>= 5) stores a MoE's experts as 3-D parameters
(``gate_up_proj`` ``(E, 2I, H)``, ...), so ``load_in_4bit`` leaves them, most of the model, in 16-bit.
:func:`quantize_experts` packs them into NF4 with bitsandbytes' own quantizer (``quantize_4bit``, blocks of 64,
one fp32 absmax per block, no double quantization), one expert's blocks contiguous, and keeps them as a
:class:`PackedExperts` parameter:

* it reports the dense shape and the compute dtype, so peft's ``target_parameters`` LoRA sizes its adapters from it
  and the model looks unchanged to everything that reads shapes;
* :meth:`PackedExperts.dequantize` gives the dense weights of *some* experts: the grouped expert kernel
  (:mod:`fasttune.kernels.moe`) dequantizes only the experts that received tokens, forward and backward;
* any other operation on it (transformers' own expert loop, a merge, ``.to(dtype)``) sees the dense tensor, exactly
  dequantized (``__torch_dispatch__`` dequantizes, then runs the op): correct everywhere, cheap only in the kernel.

Dequantization is exact: ``code[q] * absmax`` is what bitsandbytes' ``dequantize_4bit`` returns (a test checks it).
The dense weights are loaded first and quantized after loading, so the load's peak still holds them once.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch
from torch import nn
from torch.utils._pytree import tree_map

BLOCK = 64


class PackedExperts(torch.Tensor):
    """NF4-packed ``(E, ...)`` expert weights that behave as the dense tensor (see the module docstring)."""

    codes: torch.Tensor  # (E, n / 2) uint8, two codes per byte, the first in the high nibble
    absmax: torch.Tensor  # (E, n / BLOCK) float32
    table: torch.Tensor  # (16,) float32: the NF4 code values

    @staticmethod
    def __new__(cls, codes, absmax, table, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=codes.device, requires_grad=False)

    def __init__(self, codes, absmax, table, shape, dtype):
        self.codes, self.absmax, self.table = codes, absmax, table

    def __repr__(self):
        return f"PackedExperts(shape={tuple(self.shape)}, dtype={self.dtype}, nf4)"

    @classmethod
    def pack(cls, dense: torch.Tensor) -> PackedExperts:
        experts = dense.shape[0]
        per_expert = dense[0].numel()
        if per_expert % BLOCK:
            raise ValueError(f"quantize_experts: an expert's weight has {per_expert} elements, not a multiple of "
                             f"{BLOCK} (the NF4 block); such experts stay in 16-bit")
        packed, state = bnbf.quantize_4bit(dense.detach().reshape(-1), blocksize=BLOCK, compress_statistics=False,
                                           quant_type="nf4")
        return cls(packed.reshape(experts, per_expert // 2), state.absmax.reshape(experts, per_expert // BLOCK),
                   state.code.float().to(dense.device), dense.shape, dense.dtype)

    def dequantize(self, experts: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weights of ``experts`` (indices; all when None), shaped ``(len(experts), *shape[1:])``."""
        codes = self.codes if experts is None else self.codes[experts]
        absmax = self.absmax if experts is None else self.absmax[experts]
        idx = torch.stack((codes >> 4, codes & 15), dim=-1).reshape(codes.shape[0], -1).long()
        dense = self.table[idx].view(codes.shape[0], -1, BLOCK) * absmax[..., None]
        return dense.reshape(codes.shape[0], *self.shape[1:]).to(dtype or self.dtype)

    def _same_storage(self) -> PackedExperts:
        return PackedExperts(self.codes, self.absmax, self.table, self.shape, self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default) and isinstance(args[0], cls):
            return args[0]._same_storage()
        unpack = lambda t: t.dequantize() if isinstance(t, cls) else t  # noqa: E731
        return func(*tree_map(unpack, args), **tree_map(unpack, kwargs))


def is_packed(weight: torch.Tensor) -> bool:
    return isinstance(weight, PackedExperts)


def quantize_experts(model: nn.Module, names: tuple[str, ...]) -> int:
    """Replace each 3-D parameter called one of ``names`` (``gate_up_proj``, ``down_proj``) by its NF4
    :class:`PackedExperts`. Returns how many were packed."""
    count = 0
    for module in model.modules():
        for name in names:
            param = module._parameters.get(name)
            if param is None or param.dim() != 3 or isinstance(param, PackedExperts):
                continue
            packed = PackedExperts.pack(param.data)
            module._parameters[name] = nn.Parameter(packed, requires_grad=False)
            count += 1
    return count
