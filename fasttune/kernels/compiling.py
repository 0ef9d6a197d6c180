"""Optional ``torch.compile`` of the CPU torch path's inner maths (inductor fuses the elementwise passes).

On CPU the fast ops' forward/backward bodies are plain torch functions; :func:`cpu_compiled` wraps one so that, when
compiling is on, CPU calls go through ``torch.compile(fn, dynamic=True)`` (one graph for every shape). It is **off by
default** (``FASTTUNE_COMPILE=auto``), decided by measurement (``bench/bench_compile.py``, README "Measured"): over the
notebook flow a cold compile costs 17-19 s in the first step (a warm inductor cache 3-4 s), and the steady step was
6-8% slower compiled on the 1024-wide ``small`` llama and, on SmolLM2's 30 narrow layers, 8% faster in one run and 6%
slower in the other: compiling never paid for itself in a 10-step run and would at best after ~45 steps. ``FASTTUNE_COMPILE=1`` or ``with use_compile(True):`` turn it on (long runs of
deep, narrow models; it needs a C compiler on PATH), ``FASTTUNE_COMPILE=0`` states the default. Calls made while the caller's own
``torch.compile`` is tracing run the plain function, so they are traced with the rest of the model.

If compiling a function fails, the plain function runs instead; when that succeeds the failure was the compiler's,
so a ``RuntimeWarning`` names it once and that function stays uncompiled. If the plain function fails too, its error
is raised: real errors are never hidden.

The ``use_compile`` switch is a ``ContextVar`` (like :mod:`fasttune.kernels.recompute`), so a block in one thread or
asyncio task does not switch compiling for another.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

__all__ = ["compile_enabled", "cpu_compiled", "use_compile"]

_ENV_VAR = "FASTTUNE_COMPILE"
_CHOICES = ("auto", "1", "0")
# The innermost ``use_compile`` block's value; None outside any (resetting its token restores the enclosing one).
_forced: ContextVar[bool | None] = ContextVar("fasttune_compile", default=None)
F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def use_compile(enabled: bool) -> Iterator[None]:
    """Turn compiling of the CPU torch path on or off inside a ``with`` block."""
    if not isinstance(enabled, bool):
        raise ValueError(f"use_compile(enabled): {enabled!r} is not a bool")
    token = _forced.set(enabled)
    try:
        yield
    finally:
        _forced.reset(token)


def compile_enabled() -> bool:
    """Whether CPU torch-path bodies are compiled now (see the module docstring)."""
    forced = _forced.get()
    if forced is not None:
        return forced
    value = os.environ.get(_ENV_VAR, "auto")
    if value not in _CHOICES:
        raise ValueError(f"{_ENV_VAR}: {value!r} is not allowed; allowed values are {', '.join(_CHOICES)}")
    return value == "1"  # "auto": off on CPU (the module docstring says why); cpu_compiled only acts on CPU calls


def cpu_compiled(fn: F | None = None, *, eager: Callable[..., Any] | None = None) -> Any:
    """Decorator: route CPU calls of ``fn`` (first argument a tensor) through ``torch.compile`` when enabled.

    ``eager``: an equivalent function to run when not compiling (e.g. one written with in-place ops, fast
    uncompiled but a poor fit for inductor); default ``fn`` itself. Use as ``@cpu_compiled`` or
    ``@cpu_compiled(eager=other)``.
    """
    if fn is None:
        return functools.partial(cpu_compiled, eager=eager)
    plain = eager or fn
    state: dict[str, Any] = {"compiled": None, "broken": False}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if (state["broken"] or args[0].device.type != "cpu" or torch.compiler.is_compiling()
                or not compile_enabled()):
            return plain(*args, **kwargs)
        if state["compiled"] is None:
            state["compiled"] = torch.compile(fn, dynamic=True)
        try:
            return state["compiled"](*args, **kwargs)
        except Exception as compile_error:  # decided below: a compiler failure or a real error (re-raised)
            result = plain(*args, **kwargs)
            state["broken"] = True
            warnings.warn(f"fasttune.kernels: torch.compile of {fn.__qualname__} failed ({compile_error!r:.300}); "
                          "running it uncompiled from now on", RuntimeWarning, stacklevel=2)
            return result

    wrapper.uncompiled = plain  # type: ignore[attr-defined]
    wrapper.compile_state = state  # type: ignore[attr-defined]
    return wrapper
