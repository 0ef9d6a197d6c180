"""Which implementation of an op runs: Triton on CUDA, the memory-saving torch path elsewhere, or the reference.

The choice is made per call from the input's device. ``FASTTUNE_KERNEL_BACKEND`` (``auto``, ``reference``, ``torch``,
``triton``) or the :func:`use_backend` context manager force one; ``auto`` is the default. ``triton`` is optional:
it is imported only when a Triton kernel is about to run.

The forced backend is a ``ContextVar`` (like :mod:`fasttune.kernels.recompute`): a ``use_backend`` block in one thread
or asyncio task does not change what another one runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from contextvars import ContextVar
from functools import lru_cache

import torch

__all__ = ["BACKENDS", "select_backend", "triton_available", "use_backend"]

BACKENDS = ("auto", "reference", "torch", "triton")
_ENV_VAR = "FASTTUNE_KERNEL_BACKEND"
# The innermost ``use_backend`` block's name; None outside any (resetting its token restores the enclosing one).
_forced: ContextVar[str | None] = ContextVar("fasttune_kernel_backend", default=None)


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is never imported here)."""
    return importlib.util.find_spec("triton") is not None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: {name!r} is not a kernel backend; allowed values are {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests, benchmarks): ``with use_backend("reference"): ...``."""
    token = _forced.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.reset(token)


def select_backend(tensor: torch.Tensor) -> str:
    """The backend for an op whose main input is ``tensor``: ``"reference"``, ``"torch"`` or ``"triton"``.

    ``auto``: Triton when the tensor is on CUDA and triton is installed, the torch path on CPU and on CUDA without
    triton, the reference on any other device. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (tests).
    """
    forced = _forced.get()
    name = forced if forced is not None else _check_name(os.environ.get(_ENV_VAR, "auto"), _ENV_VAR)
    if name == "triton" and not triton_available():
        raise RuntimeError(f"{_ENV_VAR}/use_backend asked for 'triton' but triton is not installed: "
                           "pip install 'fasttune[triton]', or pick 'torch'")
    if name != "auto":
        return name
    if tensor.device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if tensor.device.type == "cpu":
        return "torch"
    return "reference"


def autocast_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Under ``torch.autocast``: the inputs of a fused LM-head kernel cast to the autocast dtype, what ``F.linear``
    does (the casts are autograd ops, so gradients still reach the originals in their own dtypes); None outside it.
    The caller then runs itself again with autocast disabled."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
