"""The CPU torch path compiled with torch.compile (the default on CPU): parity with the references, and the fallback."""

from __future__ import annotations

import warnings
from contextvars import ContextVar

import pytest
import torch
from kernel_testing import assert_bf16_parity

import fasttune.kernels.compiling as compiling
from fasttune.kernels import apply_rope, fused_linear_cross_entropy, geglu, rms_norm, swiglu
from fasttune.kernels.compiling import compile_enabled, cpu_compiled, use_compile
from fasttune.kernels.cross_entropy import _rows_loss_and_grad_torch
from fasttune.kernels.reference import (
    apply_rope_ref,
    geglu_ref,
    linear_cross_entropy_ref,
    rms_norm_ref,
    swiglu_ref,
)
from fasttune.kernels.rms_norm import _backward_torch, _forward_torch
from fasttune.kernels.rope import _rotate_torch
from fasttune.kernels.swiglu import _backward_torch as glu_backward
from fasttune.kernels.swiglu import _forward_torch as glu_forward


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _labels(n, vocab):
    labels = torch.randint(0, vocab, (n,), generator=_gen(5))
    labels[::3] = -100
    return labels


LABELS = _labels(2 * 37, 301)
CASES = {
    "rms_norm": (lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_ref(x, w, 1e-6),
                 lambda g: [torch.randn(5, 37, 123, generator=g), torch.randn(123, generator=g)], [True, True],
                 ("y", "dx", "dw")),
    "rms_norm_offset": (lambda x, w: rms_norm(x, w, 1e-6, True), lambda x, w: rms_norm_ref(x, w, 1e-6, True),
                        lambda g: [torch.randn(3, 11, 64, generator=g), torch.randn(64, generator=g)], [True, False],
                        ("y", "dx", "dw")),
    "rope": (apply_rope, apply_rope_ref,
             lambda g: [torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g),
                        torch.rand(2, 9, 16, generator=g), torch.rand(2, 9, 16, generator=g)],
             [True, True, False, False], ("q", "k", "dq", "dk", "dcos", "dsin")),
    "swiglu": (swiglu, swiglu_ref, lambda g: [torch.randn(5, 13, 123, generator=g) * 3,
                                              torch.randn(5, 13, 123, generator=g)], [True, True], ("h", "dg", "du")),
    "geglu": (geglu, geglu_ref, lambda g: [torch.randn(4, 100, generator=g) * 3, torch.randn(4, 100, generator=g)],
              [True, True], ("h", "dg", "du")),
    "cross_entropy": (lambda h, w: fused_linear_cross_entropy(h, w, LABELS, chunk_size=32, softcap=20.0),
                      lambda h, w: linear_cross_entropy_ref(h, w, LABELS, softcap=20.0),
                      lambda g: [torch.randn(2 * 37, 40, generator=g), torch.randn(301, 40, generator=g) * 0.2],
                      [True, True], ("loss", "dh", "dw")),
}


COMPILED = {
    "rms_norm": [_forward_torch, _backward_torch],
    "rms_norm_offset": [_forward_torch, _backward_torch],
    "rope": [_rotate_torch],
    "swiglu": [glu_forward, glu_backward],
    "geglu": [glu_forward, glu_backward],
    "cross_entropy": [_rows_loss_and_grad_torch],
}


@pytest.mark.parametrize("op", CASES)
def test_compiled_matches_reference(op):
    """bf16 (the CPU training dtype) only: the compiled code is the eager code the fp32 tests check tightly, and each
    extra dtype costs a compile (seconds each on this machine, more with a cold inductor cache)."""
    fast, ref, make, mask, names = CASES[op]
    inputs = [t.to(torch.bfloat16) for t in make(_gen())]
    with use_compile(True), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure (fallback warning) fails the test
        assert_bf16_parity(fast, ref, inputs, mask, "torch", names)
    for fn in COMPILED[op]:
        assert fn.compile_state["compiled"] is not None and not fn.compile_state["broken"], fn.__name__


def test_compiler_failure_falls_back_once_with_a_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(compiling.torch, "compile", broken_compile)

    @cpu_compiled
    def double(x):
        if x.sum() < 0:
            raise ValueError("a real error")
        return x * 2

    with use_compile(True):
        with pytest.warns(RuntimeWarning, match="inductor exploded"):
            assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(double(torch.ones(2)), torch.full((2,), 2.0))  # uncompiled now, no second warning
        with pytest.raises(ValueError, match="a real error"):
            double(-torch.ones(2))


def test_real_errors_are_not_hidden_by_the_fallback(monkeypatch):
    @cpu_compiled
    def pick(x, index):
        return x[index]

    with use_compile(True), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(IndexError):
            pick(torch.ones(3), 7)


def test_switches(monkeypatch):
    # drop the test suite's use_compile(False): a fresh switch, unset
    monkeypatch.setattr(compiling, "_forced", ContextVar("fasttune_compile", default=None))
    monkeypatch.setenv("FASTTUNE_COMPILE", "1")
    assert compile_enabled()
    monkeypatch.setenv("FASTTUNE_COMPILE", "0")
    with use_compile(True):
        assert compile_enabled()
    assert not compile_enabled()
    monkeypatch.setenv("FASTTUNE_COMPILE", "yes")
    with pytest.raises(ValueError, match="FASTTUNE_COMPILE: 'yes' is not allowed"):
        compile_enabled()
    with pytest.raises(ValueError, match="not a bool"):
        with use_compile("on"):
            pass
