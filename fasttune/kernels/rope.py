"""Rotary position embedding of q and k together, rotate-half style, with per-token cos/sin.

With ``x = [x1, x2]`` split in two halves of the head dim and ``c = [c1, c2]``, ``s = [s1, s2]`` likewise::

    forward:   y1 = x1 * c1 - x2 * s1          y2 = x2 * c2 + x1 * s2
    backward:  dx1 = dy1 * c1 + dy2 * s2       dx2 = dy2 * c2 - dy1 * s1

cos/sin are ``(batch, seq, head_dim)``, gathered by the caller from per-token position ids, so packed sequences whose
positions restart need nothing special. The autograd function saves only cos and sin (which the caller keeps anyway,
one copy shared by every layer), as autograd on the reference does too; what it saves is work: the reference builds
``rotate_half`` (a negation and a concatenation) and two products per tensor in forward and as many in backward,
this path one product and two in-place fused multiply-adds each way uncompiled, one fused loop compiled (CPU) or
one Triton pass (CUDA).
cos/sin get no gradient; when either requires one, the reference (plain autograd) runs instead.

Not used in the model path (on purpose, for now): transformers applies RoPE inside each family's attention forward
through a module-level ``apply_rotary_pos_emb`` of that family's modeling file, between the q/k norms and the attention
kernel. fasttune keeps that forward transformers' own (``fasttune.patch.forwards.make_attention_forward`` only hands
it pre-computed q/k/v), so the attention maths -- q/k norms, partial rotary (phi3), sliding windows, softcapping --
stays upstream's for every family. Using this kernel would mean owning a copy of every family's attention forward, for
an op that is a few elementwise passes over q and k (the kernel benchmark: 4.3x faster than the reference in isolation;
its share of a training step was not measured). It stays a tested, benchmarked op for when fasttune owns attention
(e.g. a fused RoPE + flash-attention path on CUDA).
"""

from __future__ import annotations

import torch

from fasttune.kernels.compiling import cpu_compiled
from fasttune.kernels.dispatch import select_backend
from fasttune.kernels.reference import apply_rope_ref

__all__ = ["RoPEFunction", "apply_rope"]


def _rotate_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x ``(b, h, s, d)``; cos/sin ``(b, 1, s, d)``. ``inverse=True`` applies the transpose (the backward).

    Uncompiled form: one product and two in-place fused multiply-adds.
    """
    half = x.shape[-1] // 2
    out = x * cos
    x1, x2 = x[..., :half], x[..., half:]
    if inverse:
        out[..., :half].addcmul_(x2, sin[..., half:])
        out[..., half:].addcmul_(x1, sin[..., :half], value=-1.0)
    else:
        out[..., :half].addcmul_(x2, sin[..., :half], value=-1.0)
        out[..., half:].addcmul_(x1, sin[..., half:])
    return out


@cpu_compiled(eager=_rotate_inplace)
def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Same as ``_rotate_inplace``, written without in-place slices so that inductor fuses it into one loop."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if inverse:
        return torch.cat([x1 * c1 + x2 * s2, x2 * c2 - x1 * s1], dim=-1)
    return torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, backend: str) -> torch.Tensor:
    if backend == "triton":
        from fasttune.kernels.triton.rope import rope_rotate

        return rope_rotate(x, cos, sin, inverse)
    return _rotate_torch(x, cos.unsqueeze(1), sin.unsqueeze(1), inverse)


class RoPEFunction(torch.autograd.Function):
    """``RoPEFunction.apply(q, k, cos, sin, backend) -> (q_rot, k_rot)``."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str):
        ctx.save_for_backward(cos, sin)
        ctx.backend = backend
        return _rotate(q, cos, sin, False, backend), _rotate(k, cos, sin, False, backend)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq_in = _rotate(dq, cos, sin, True, ctx.backend) if ctx.needs_input_grad[0] else None
        dk_in = _rotate(dk, cos, sin, True, ctx.backend) if ctx.needs_input_grad[1] else None
        return dq_in, dk_in, None, None, None


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (batch, heads, seq, head_dim)")
    b, _, s, d = q.shape
    if d % 2:
        raise ValueError(f"apply_rope: head_dim {d} must be even")
    if k.shape[0] != b or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must match q {tuple(q.shape)} except in the heads dim")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (s, d) or cos.shape[0] not in (1, b):
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must both be "
                         f"(batch, seq, head_dim) = ({b} or 1, {s}, {d})")


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``(batch, q_heads, seq, head_dim)`` and k ``(batch, kv_heads, seq, head_dim)`` by per-token angles.

    cos, sin: ``(batch, seq, head_dim)`` (batch may be 1 to broadcast), as transformers' rotary embedding returns for
    the position ids. Same maths as transformers' ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``).
    """
    _check(q, k, cos, sin)
    backend = select_backend(q)
    if backend == "reference" or cos.requires_grad or sin.requires_grad:
        return apply_rope_ref(q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin, backend)
