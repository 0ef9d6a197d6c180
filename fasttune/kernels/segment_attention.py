"""Bidirectional attention over packed segments (a vision tower's images), whose checkpoint recompute reuses the
first forward's result instead of running the attention again.

For q, k, v ``(heads, N, d)`` holding segments of lengths ``n_1..n_k`` (``sum n_i = N``; one image's patches each):
    ``out[:, s] = softmax(q[:, s] k[:, s]^T * scale) v[:, s]`` for every segment ``s``, with the log-sum-exp
    ``lse[:, s] = logsumexp(q[:, s] k[:, s]^T * scale, -1)`` ``(heads, N)``.
Backward: the flash-attention backward of each segment from ``(q, k, v, out, lse)`` (torch's CPU kernel).

Under fasttune's offloaded checkpoint (:mod:`fasttune.kernels.checkpoint`) a block runs twice: once without autograd
(forward), once in backward (recompute). Its attention's backward needs ``out`` and ``lse``, which the first forward
already computed: the first forward keeps them in the checkpoint's :class:`~fasttune.kernels.recompute.CheckpointScope`
(``heads x N x (d + 1)`` values per block, one block's input-sized tensor) and the recompute takes them back in call
order, so only q, k and v (cheap projections) are recomputed, never the ``sum n_i^2`` scores. The kept values die with
the checkpoint's context (after that block's backward, or with the graph when no backward comes). Outside a checkpoint
it is plain flash attention per segment. CPU only (torch's ``_scaled_dot_product_flash_attention_for_cpu``); the
reference is :func:`segment_attention_reference` (``F.scaled_dot_product_attention`` per segment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .recompute import current_scope, in_recompute

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _segments_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    outs, lses, start = [], [], 0
    for n in lengths:
        s = slice(start, start + n)
        out, lse = _FORWARD(q[None, :, s], k[None, :, s], v[None, :, s], 0.0, False, scale=scale)
        outs.append(out[0])
        lses.append(lse[0])
        start += n
    return torch.cat(outs, 1), torch.cat(lses, 1)


class SegmentAttention(torch.autograd.Function):
    """``(q, k, v) (heads, N, d) -> out (heads, N, d)``; see the module docstring. ``kept``: a first forward's
    ``(out, lse)`` to use instead of computing them."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float,
                kept: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        out, lse = kept if kept is not None else _segments_forward(q, k, v, lengths, scale)
        ctx.lengths, ctx.scale = lengths, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.clone() if kept is not None else out  # a kept tensor is not handed out as the output itself

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads: list[list[torch.Tensor]] = [[], [], []]
        start = 0
        for n in ctx.lengths:
            s = slice(start, start + n)
            parts = _BACKWARD(grad[None, :, s].contiguous(), q[None, :, s], k[None, :, s], v[None, :, s],
                              out[None, :, s], lse[None, :, s], 0.0, False, scale=ctx.scale)
            for acc, g in zip(grads, parts):
                acc.append(g[0])
            start += n
        dq, dk, dv = (torch.cat(g, 1) for g in grads)
        return dq, dk, dv, None, None, None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float
                      ) -> torch.Tensor:
    """Attention of each segment of ``q, k, v`` ``(heads, N, d)`` on its own (``lengths`` sum to N); ``(heads, N, d)``.

    Inside fasttune's checkpoint, the first forward keeps ``(out, lse)`` and the recompute reuses them."""
    if sum(lengths) != q.shape[1]:
        raise ValueError(f"lengths: {list(lengths)} sum to {sum(lengths)}, but q has {q.shape[1]} positions")
    if q.device.type != "cpu":
        raise ValueError(f"segment_attention: q is on {q.device}; this kernel runs on CPU only")
    scope = current_scope()
    if scope is not None and not torch.is_grad_enabled() and not in_recompute():  # a checkpoint's first forward
        out, lse = _segments_forward(q, k, v, lengths, scale)
        scope.kept.append((out, lse))
        return out
    kept = scope.take(out_shape=q.shape[:2] + v.shape[2:]) if scope is not None and in_recompute() else None
    return SegmentAttention.apply(q, k, v, tuple(lengths), scale, kept)


def segment_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...],
                                scale: float) -> torch.Tensor:
    """The reference: ``F.scaled_dot_product_attention`` on each segment, concatenated."""
    outs, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[None, :, s], k[None, :, s], v[None, :, s], scale=scale)[0])
        start += n
    return torch.cat(outs, 1)
