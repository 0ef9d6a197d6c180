"""Offloaded activation checkpointing of one decoder layer: keep only its input, off the accelerator.

Forward runs the layer without building a graph and keeps its input hidden states: on CUDA in pinned CPU memory via an
asynchronous copy, on CPU as is (the input is the previous layer's output, alive anyway, so nothing is copied).
Backward brings the input back, re-runs the layer with autograd (same RNG state and autocast state as the first run,
marked as a recompute so fused blocks may keep their intermediates), and back-propagates through it.
:func:`fasttune.patch.enable_checkpointing` installs :func:`offloaded_checkpoint` on a model ("unsloth" mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from .recompute import CheckpointScope, checkpoint_scope, recomputing


def _offload(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cuda":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


class OffloadedCheckpoint(torch.autograd.Function):
    """``y = layer(x)`` saving only ``x`` (in pinned host memory on CUDA); backward recomputes ``layer(x)``.

    ``anchor`` is an empty tensor that requires grad, so the output is part of the graph even when ``x`` is not
    (the first layer's input is a frozen embedding) and the LoRA weights inside the layer still receive gradients.
    """

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], Any], anchor: torch.Tensor, x: torch.Tensor):
        ctx.run = run
        ctx.device = x.device
        ctx.x_requires_grad = x.requires_grad
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        ctx.autocast = {dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda")}
        ctx.scope = CheckpointScope()  # what the first forward keeps for the recompute (kernels/segment_attention.py)
        with torch.no_grad(), checkpoint_scope(ctx.scope):
            out = run(x)
        ctx.saved_input = _offload(x.detach())
        if isinstance(out, tuple):
            return out
        return out

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x = ctx.saved_input.to(ctx.device, non_blocking=True).detach().requires_grad_(ctx.x_requires_grad)
        del ctx.saved_input
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            for dev, (enabled, dtype) in ctx.autocast.items():
                if enabled:
                    stack.enter_context(torch.autocast(dev, dtype=dtype))
            stack.enter_context(recomputing())
            stack.enter_context(checkpoint_scope(ctx.scope))
            with torch.enable_grad():
                out = ctx.run(x)
        ctx.scope = None
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return None, None, (x.grad if ctx.x_requires_grad else None)


def offloaded_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Drop-in for ``torch.utils.checkpoint.checkpoint(function, hidden_states, ...)`` as transformers calls it.

    The first positional argument is the layer input that is kept (offloaded on CUDA); every other argument is
    captured as is (masks, rotary tables: not copied, they are shared by all layers).
    """
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("offloaded_checkpoint: the first positional argument must be the layer's hidden-states tensor")
    x, rest = args[0], args[1:]
    kwargs.pop("use_reentrant", None)

    def run(inp: torch.Tensor) -> Any:
        return function(inp, *rest, **kwargs)

    anchor = torch.empty(0, requires_grad=True)
    return OffloadedCheckpoint.apply(run, anchor, x)
