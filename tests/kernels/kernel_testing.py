"""Shared helpers of the kernel parity tests: run an op forward and backward on fresh leaf copies of its inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fasttune.kernels import use_backend

# Named tolerances. fp32: a few ulps of accumulated rounding. fp16: Triton kernels compute in fp32 and round once.
# bf16 (8-bit mantissa, one ulp = 2^-8 relative): the fast path and the reference round at different points.
FP32 = {"atol": 1e-5, "rtol": 1e-5}
FP16 = {"atol": 2e-3, "rtol": 2e-3}
BF16 = {"atol": 2e-2, "rtol": 2e-2}
TOLERANCES = {torch.float32: FP32, torch.float16: FP16, torch.bfloat16: BF16}

def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A fresh leaf copy of t."""
    return t.detach().clone().requires_grad_(requires_grad)


def cotangents(outputs: Sequence[torch.Tensor], seed: int = 1234) -> list[torch.Tensor]:
    """Fixed random output gradients (same seed -> same values for the fast op and the reference).

    Rounded through bf16 so the values are exact in every dtype the tests use; drawn on the CPU, placed on each
    output's device (the same values on CPU and GPU).
    """
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen).to(torch.bfloat16).to(o.dtype).to(o.device) for o in outputs]


def forward_backward(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    grad_mask: Sequence[bool],
    backend: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Runs ``fn(*inputs)`` under ``backend`` on leaf copies, backpropagates fixed cotangents.

    Returns (outputs, input grads) with grads None where ``grad_mask`` is False.
    """
    leaves = [leaf(t, m) for t, m in zip(inputs, grad_mask)]
    with use_backend(backend):
        out = fn(*leaves)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.backward(outs, cotangents(outs))
    return [o.detach() for o in outs], [t.grad for t in leaves]


def assert_all_close(actual: Sequence[torch.Tensor | None], expected: Sequence[torch.Tensor | None],
                     tol: dict, names: Sequence[str]) -> None:
    """assert_close on each pair (in fp32), naming which tensor differs; both None is fine, one None is not."""
    for a, e, name in zip(actual, expected, names):
        if a is None or e is None:
            assert a is None and e is None, f"{name}: one side has no gradient (fast {a is None}, ref {e is None})"
            continue
        torch.testing.assert_close(a.float(), e.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


def saved_bytes(fn: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs.

    Distinct storages are counted once; storages of ``exclude`` (inputs that stay alive anyway) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for ptr, n in seen.items() if ptr not in skip)


def assert_bf16_parity(fn, ref, inputs: Sequence[torch.Tensor], grad_mask: Sequence[bool], backend: str,
                       names: Sequence[str], slack: float = 1.5) -> None:
    """bf16 check: the fast op on bf16 inputs is within ``BF16`` of the fp32 reference on the same (upcast) values,
    and its largest error is at most ``slack`` x the bf16 reference's own largest error (plus one bf16 ulp at 1).
    """
    out, grads = forward_backward(fn, inputs, grad_mask, backend)
    truth_out, truth_grads = forward_backward(ref, [t.float() for t in inputs], grad_mask, "reference")
    ref_out, ref_grads = forward_backward(ref, inputs, grad_mask, "reference")
    assert_all_close(out + grads, truth_out + truth_grads, BF16, names)
    for a, r, t, name in zip(out + grads, ref_out + ref_grads, truth_out + truth_grads, names):
        if t is None:
            continue
        fast_err = (a.float() - t).abs().max().item()
        ref_err = (r.float() - t).abs().max().item()
        assert fast_err <= slack * ref_err + 2**-8, (
            f"{name}: bf16 error {fast_err:.3g} vs the reference's {ref_err:.3g}")
