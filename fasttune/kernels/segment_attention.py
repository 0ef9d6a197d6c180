"""Attention over packed segments (a vision tower's images, a padding-free row's examples), whose checkpoint
recompute reuses the first forward's result instead of running the attention again.

For q ``(heads, N, d)``, k, v ``(kv_heads, N, d)`` (grouped-query when fewer; the kernel reads them shared) holding
segments of lengths ``n_1..n_k`` (``sum n_i = N``):
    ``out[:, s] = softmax(q[:, s] k[:, s]^T * scale + mask) v[:, s]`` for every segment ``s``, with the log-sum-exp
    ``lse[:, s]`` ``(heads, N)``; ``mask`` is none (bidirectional: images), causal (text) or causal within the last
    ``window`` positions (a sliding-window layer: transformers' ``q - window < k <= q``).
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


def window_mask(n: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, n)`` boolean mask of causal attention within the last ``window`` positions (itself included), as
    transformers' sliding-window mask: key ``k`` is seen from query ``q`` when ``q - window < k <= q``."""
    q = torch.arange(n, device=device).unsqueeze(1)
    k = torch.arange(n, device=device).unsqueeze(0)
    return (k <= q) & (k > q - window)


def _mask(n: int, causal: bool, window: int | None, dtype: torch.dtype) -> tuple[bool, torch.Tensor | None]:
    """``(is_causal, additive mask or None)`` for one segment of ``n`` positions (the flash op takes a float mask)."""
    if not causal or window is None or n <= window:
        return causal, None
    return False, torch.zeros(n, n, dtype=dtype).masked_fill_(~window_mask(n, window), float("-inf"))


def _segments_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float,
                      causal: bool = False, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    outs, lses, start = [], [], 0
    for n in lengths:
        s = slice(start, start + n)
        is_causal, mask = _mask(n, causal, window, q.dtype)
        out, lse = _FORWARD(q[None, :, s], k[None, :, s], v[None, :, s], 0.0, is_causal, attn_mask=mask, scale=scale)
        outs.append(out[0])
        lses.append(lse[0])
        start += n
    return torch.cat(outs, 1), torch.cat(lses, 1)


class SegmentAttention(torch.autograd.Function):
    """``(q, k, v) (heads, N, d) -> out (heads, N, d)``; see the module docstring. ``kept``: a first forward's
    ``(out, lse)`` to use instead of computing them."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float,
                kept: tuple[torch.Tensor, torch.Tensor] | None, causal: bool = False,
                window: int | None = None) -> torch.Tensor:
        out, lse = kept if kept is not None else _segments_forward(q, k, v, lengths, scale, causal, window)
        ctx.lengths, ctx.scale, ctx.causal, ctx.window = lengths, scale, causal, window
        ctx.save_for_backward(q, k, v, out, lse)
        return out.clone() if kept is not None else out  # a kept tensor is not handed out as the output itself

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads: list[list[torch.Tensor]] = [[], [], []]
        start = 0
        for n in ctx.lengths:
            s = slice(start, start + n)
            is_causal, mask = _mask(n, ctx.causal, ctx.window, q.dtype)
            parts = _BACKWARD(grad[None, :, s].contiguous(), q[None, :, s], k[None, :, s], v[None, :, s],
                              out[None, :, s], lse[None, :, s], 0.0, is_causal, attn_mask=mask, scale=ctx.scale)
            for acc, g in zip(grads, parts):
                acc.append(g[0])
            start += n
        dq, dk, dv = (torch.cat(g, 1) for g in grads)
        return dq, dk, dv, None, None, None, None, None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float,
                      causal: bool = False, window: int | None = None) -> torch.Tensor:
    """Attention of each segment of ``q`` ``(heads, N, d)``, ``k, v`` ``(kv_heads, N, d)`` on its own (``lengths``
    sum to N; ``causal``, optionally within a sliding ``window``); ``(heads, N, d)``.

    Inside fasttune's checkpoint, the first forward keeps ``(out, lse)`` and the recompute reuses them."""
    if window is not None and not causal:
        raise ValueError(f"window: {window} needs causal=True (a sliding window is causal attention)")
    if q.shape[0] % k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError(f"heads: q has {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}; k and v need the same count, "
                         "a divisor of q's")
    if sum(lengths) != q.shape[1]:
        raise ValueError(f"lengths: {list(lengths)} sum to {sum(lengths)}, but q has {q.shape[1]} positions")
    if q.device.type != "cpu":
        raise ValueError(f"segment_attention: q is on {q.device}; this kernel runs on CPU only")
    scope = current_scope()
    if scope is not None and not torch.is_grad_enabled() and not in_recompute():  # a checkpoint's first forward
        out, lse = _segments_forward(q, k, v, lengths, scale, causal, window)
        scope.kept.append((out, lse))
        return out
    kept = scope.take(out_shape=q.shape[:2] + v.shape[2:]) if scope is not None and in_recompute() else None
    return SegmentAttention.apply(q, k, v, tuple(lengths), scale, kept, causal, window)


def segment_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...],
                                scale: float, causal: bool = False, window: int | None = None) -> torch.Tensor:
    """The reference: ``F.scaled_dot_product_attention`` on each segment (a boolean mask for a window), concatenated."""
    outs, start = [], 0
    gqa = q.shape[0] != k.shape[0]
    for n in lengths:
        s = slice(start, start + n)
        mask = window_mask(n, window) if window is not None else None
        outs.append(F.scaled_dot_product_attention(q[None, :, s], k[None, :, s], v[None, :, s], attn_mask=mask,
                                                   is_causal=causal and mask is None, scale=scale,
                                                   enable_gqa=gqa)[0])
        start += n
    return torch.cat(outs, 1)
