"""Decode-time weights: each decoder projection computed in one product during a rollout.

Training runs a LoRA projection as ``x W^T + s (x A^T) B^T`` with ``W`` dequantized at every call (4-bit) -- three
products and a dequantization per projection per decode step, for a decode step that is a handful of rows. During a
rollout the adapters cannot change, so :func:`decode_weights` builds, when the rollout starts, one weight per
projection of every decoder layer and drops them all when it ends:

* fp32 compute: the merged ``W + s B A`` (``W`` dequantized exactly, :func:`fasttune.quant.dequantize_weight`), one
  product per projection;
* half precision: the dequantized ``W`` plus the unmerged factors (rounding ``s B A`` into a bf16 ``W`` would lose
  most of the update), i.e. peft's ``x W^T + s (x A^T) B^T`` without the per-step dequantization;
* the projections of one module that read the same input (q/k/v, gate/up) share one product over their concatenated
  weights: the first one called computes all of them and hands the others their columns.

Nothing is cached across rollouts, so a weight can never be stale: every rollout reads the adapters as they are
when it starts. What it costs: one dense copy of every decoder projection for the length of the rollout (fp32 for an
fp32 model; for a 4-bit model that is the full-precision size of its decoder, e.g. ~0.4 GB for SmolLM2-135M in fp32).

How it is installed: for the rollout only, each projection's instance ``forward`` is the one-product forward, and
fasttune's fused attention / MLP forwards (which call the LoRA kernels directly) step aside so the module's own
transformers forward runs and calls its projections; fasttune's RMSNorm forwards step aside too (at one token per
row the compiled kernel's call overhead, ~0.3 ms on CPU, is more than transformers' handful of ops). A projection that the fused path cannot take
(:func:`fasttune.kernels.lora_parts.lora_parts` gives a reason: DoRA, dropout, several adapters, QAT) keeps its
forward; mixture-of-experts blocks keep theirs. Every replaced forward is put back on exit, even on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fasttune.kernels.lora_parts import LoraParts, base_compute_dtype, lora_parts
from fasttune.models.registry import get_family
from fasttune.quant import dequantize_weight, is_quantized_linear

_MISSING = object()


class _Group:
    """Sibling projections of one module that read the same input: one product over their concatenated weights.

    ``weight`` ``(sum out, in)``, ``bias`` (or None), ``bounds`` the column range of each member; ``lora`` per member:
    None (merged or no adapter) or ``(A, B, s)`` still to add (half precision)."""

    def __init__(self, parts: list[LoraParts], dtype: torch.dtype):
        weights, biases, self.lora, self.bounds = [], [], [], []
        start = 0
        for p in parts:
            weight = dequantize_weight(p.base, dtype)
            merge = p.lora_A is not None and dtype == torch.float32 and p.lora_A.dtype == torch.float32
            if merge:
                weight = weight.float() + p.scaling * (p.lora_B.float() @ p.lora_A.float())
            self.lora.append(None if merge or p.lora_A is None else (p.lora_A, p.lora_B, p.scaling))
            weights.append(weight)
            biases.append(p.bias)
            self.bounds.append((start, start + weight.shape[0]))
            start += weight.shape[0]
        self.dtype = dtype
        self.weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        if all(b is None for b in biases):
            self.bias = None
        else:
            self.bias = torch.cat([torch.zeros(w.shape[0], dtype=dtype, device=w.device) if b is None else b.to(dtype)
                                   for w, b in zip(weights, biases)])
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``member``'s projection of ``x``; computes every member's when ``x`` is new."""
        ready = self.pending.pop(member, None)
        if ready is not None and ready[0] is x:
            return ready[1]
        y = F.linear(x.to(self.dtype), self.weight, self.bias)
        outs = [y[..., a:b] for a, b in self.bounds]
        for i, (out, lora) in enumerate(zip(outs, self.lora)):
            if lora is not None:
                lora_A, lora_B, scaling = lora
                outs[i] = out + F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B).to(out.dtype) * scaling
        outs = [out.to(x.dtype) for out in outs]
        self.pending = {i: (x, out) for i, out in enumerate(outs) if i != member}
        return outs[member]


def _projection_forward(group: _Group, member: int, previous: Callable) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # peft's mixed-adapter batches and the like: the layer's own forward
            return previous(x, *args, **kwargs)
        return group.output(member, x)

    return forward


def _input_groups(lm: nn.Module) -> list[tuple[str, ...]]:
    """Names of the projections of one attention / MLP module that read its input (the family spec's lists without
    the output projection: ``o_proj``, and the MLP's last, its down projection); [] for a family without a spec."""
    spec = get_family(lm.config.get_text_config().model_type) or get_family(lm.config.model_type)
    if spec is None:
        return []
    return [tuple(n for n in spec.attention if n != "o_proj"), tuple(spec.mlp[:-1])]


def _projections(module: nn.Module, probe: torch.Tensor, shared: list[tuple[str, ...]]
                 ) -> list[list[tuple[nn.Module, LoraParts]]]:
    """The direct children of ``module`` worth a decode weight (LoRA layers, quantized linears), grouped: the ones
    named together in ``shared`` that have the same compute dtype form one group, every other one its own."""
    found: dict[str, tuple[nn.Module, LoraParts, torch.dtype]] = {}
    for name, child in module.named_children():
        parts = lora_parts(child)
        if isinstance(parts, str) or (parts.lora_A is None and not is_quantized_linear(parts.base)):
            continue  # the fused path cannot take it, or it is one plain product already
        found[name] = (child, parts, base_compute_dtype(parts.base, probe))
    groups = []
    for names in shared:
        by_dtype: dict[torch.dtype, list[tuple[nn.Module, LoraParts]]] = {}
        for name in names:
            if name in found:
                child, parts, dtype = found.pop(name)
                by_dtype.setdefault(dtype, []).append((child, parts))
        groups += by_dtype.values()
    return groups + [[(child, parts)] for child, parts, _ in found.values()]


def _decoder_blocks(lm: nn.Module) -> list[nn.Module]:
    """The attention and MLP modules of every decoder layer (a layer has ``self_attn`` and ``mlp``)."""
    return [block for layer in lm.modules() if hasattr(layer, "self_attn") and hasattr(layer, "mlp")
            for block in (layer.self_attn, layer.mlp)]


def _norms(lm: nn.Module) -> list[nn.Module]:
    """RMSNorm modules running an instance forward (fasttune's fused norm, :mod:`fasttune.patch.forwards`)."""
    return [m for m in lm.modules() if type(m).__name__.endswith("RMSNorm") and "forward" in m.__dict__]


@contextmanager
def decode_weights(lm: nn.Module) -> Iterator[int]:
    """Within the block, every decoder projection of ``lm`` (a ``*ForCausalLM``, LoRA layers live) runs as one
    product with weights built now (see the module docstring); yields how many projections were replaced.

    Use only where the adapters and base weights cannot change (under ``torch.no_grad``, no optimizer step)."""
    probe = torch.empty(0, dtype=lm.get_input_embeddings().weight.dtype)
    shared = _input_groups(lm)
    saved: list[tuple[nn.Module, object]] = []
    count = 0
    try:
        for norm in _norms(lm):  # transformers' own RMSNorm: at a few rows, a compiled kernel's call costs more
            saved.append((norm, norm.__dict__.pop("forward")))
        for block in _decoder_blocks(lm):
            groups = _projections(block, probe, shared)
            if not groups:
                continue
            saved.append((block, block.__dict__.get("forward", _MISSING)))
            block.__dict__.pop("forward", None)  # fasttune's fused forward steps aside: the class forward runs
            for members in groups:
                dtype = base_compute_dtype(members[0][1].base, probe)
                group = _Group([parts for _, parts in members], dtype)
                for i, (child, _) in enumerate(members):
                    saved.append((child, child.__dict__.get("forward", _MISSING)))
                    child.forward = _projection_forward(group, i, child.forward)
                    count += 1
        yield count
    finally:
        for module, previous in reversed(saved):
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
