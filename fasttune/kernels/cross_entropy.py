"""Fused linear cross-entropy: lm_head + cross-entropy over chunks of tokens, never holding all the logits.

For the selected rows (labels != ignore_index; the others are dropped before any matmul) and each chunk of them::

    logits = h W^T + b                          (chunk, V), in the input dtype, then fp32
    z      = softcap * tanh(logits / softcap)   (only when softcap is set; Gemma-2's final logit softcapping)
    loss_i = logsumexp(z_i) - z_i[y_i]          (fp32)
    dz     = softmax(z) - onehot(y)             dlogits = dz * (1 - tanh^2)  with softcap, else dz
    dh     = dlogits W                          dW += dlogits^T h          db += sum_rows(dlogits)

The loss is ``sum_i loss_i / D``; D is ``num_items_in_batch`` when given (transformers' gradient-accumulation
convention: the number of label tokens in the whole accumulated batch) else the number of non-ignored labels here.
The gradients w.r.t. h, W and b (already divided by D) are computed inside forward, chunk by chunk, and they are
all autograd keeps: at most ``(labelled tokens, H) + (V, H) + (V,)`` in the inputs' dtype (dW is accumulated over
chunks in fp32) instead of the ``(tokens, V)`` fp32 logits and their gradient. No dW work is done when the weight is
frozen (the LoRA case). Backward only multiplies them by ``grad_output``. A chunk's logits are the largest
temporary: ``chunk_size * V`` values.

Labels must already be aligned with hidden (label i is the target of hidden row i): the caller shifts them.

Token statistics (``return_stats=True``), for the metrics TRL's ``SFTTrainer`` logs, taken from the same chunks under
no_grad and summed over the labelled rows (never more than one chunk of logits exists)::

    num_correct = sum_i [argmax_v z_iv == y_i]      (first index wins a tie, as torch.argmax and TRL's is_top1)
    entropy_sum = sum_i H(softmax(z_i)) = sum_i (logsumexp(z_i) - sum_v p_iv z_iv)

They cost one more pass over each chunk's logits and only run when asked for.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fasttune.kernels.compiling import cpu_compiled
from fasttune.kernels.dispatch import autocast_linear_inputs, select_backend
from fasttune.kernels.reference import linear_cross_entropy_ref

__all__ = ["FusedLinearCrossEntropyFunction", "TokenStats", "fused_linear_cross_entropy", "token_stats_ref"]


class TokenStats(NamedTuple):
    """Sums over the labelled rows of one loss call (fp32 scalars, no gradient): see the module docstring."""

    num_correct: torch.Tensor
    entropy_sum: torch.Tensor
    num_labels: torch.Tensor


@cpu_compiled
def _rows_loss_and_grad_torch(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits ``(c, V)`` (overwritten), targets ``(c,)``, scale ``()`` fp32 or None (no gradient wanted) ->
    (loss summed over the rows, fp32; ``scale * dloss/dlogits`` ``(c, V)`` in the logits' dtype and storage, or None).
    """
    z = logits.float() if logits.dtype != torch.float32 else logits
    t = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()
        z = t * softcap
    # log-sum-exp in place (torch.logsumexp would allocate another (c, V) buffer): z becomes exp(z - max)
    target_z = z.gather(1, targets.unsqueeze(1)).squeeze(1)
    row_max = z.amax(dim=-1, keepdim=True)
    exp = z.sub_(row_max).exp_()
    total = exp.sum(dim=-1, keepdim=True)
    loss = (row_max + total.log()).squeeze(1).sub_(target_z).sum()
    if scale is None:
        return loss, None
    grad = exp.div_(total)
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
    if t is not None:
        grad.mul_(t.square_().neg_().add_(1.0))
    return loss, logits.copy_(grad.mul_(scale))  # written over the logits: no third (c, V) buffer


def _rows_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                        scale: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if backend == "triton":
        from fasttune.kernels.triton.cross_entropy import cross_entropy_rows

        losses = cross_entropy_rows(logits, targets, softcap, scale)
        return losses.sum(), (logits if scale is not None else None)
    return _rows_loss_and_grad_torch(logits, targets, softcap, scale)


@cpu_compiled
def _rows_stats_torch(logits: torch.Tensor, targets: torch.Tensor,
                      softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits ``(c, V)`` (read only), targets ``(c,)`` -> (argmax-correct count, entropy sum), fp32 scalars.

    ``H = log(s) - sum_v e_v z'_v / s`` with ``z' = z - max(z)``, ``e = exp(z')``, ``s = sum_v e_v``: compiled on CPU
    this is a few fused reductions over the chunk; eager it allocates chunk-sized temporaries.
    """
    z = logits.float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    correct = (z.argmax(dim=-1) == targets).sum(dtype=torch.float32)
    shifted = z - z.amax(dim=-1, keepdim=True)
    exp = shifted.exp()
    total = exp.sum(dim=-1)
    entropy = total.log() - (exp * shifted).sum(dim=-1) / total
    return correct, entropy.sum()


def token_stats_ref(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                    ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of the token statistics from full logits ``(..., V)`` and aligned targets ``(...)``.

    Returns (argmax-correct count, entropy sum, labelled count) over the positions whose target is not ignored.
    """
    z = logits.float().reshape(-1, logits.shape[-1])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    keep = targets.reshape(-1) != ignore_index
    z, y = z[keep], targets.reshape(-1)[keep]
    log_p = torch.log_softmax(z, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (z.argmax(-1) == y).sum().float(), entropy.sum(), keep.sum().float()


def _times(t: torch.Tensor | None, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``(t * factor).to(dtype)`` with the product in fp32.

    ``loss.backward()`` passes a factor of 1: the saved gradient is then returned as it is, not copied (for the
    lm_head that is a (vocab, hidden) tensor, which would otherwise exist twice at the peak of backward). Reading the
    factor is one host sync per backward on CUDA.
    """
    if t is None:
        return None
    if factor.numel() == 1 and float(factor) == 1.0:
        return t.to(dtype)
    return (t.float() * factor).to(dtype)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(h (M, H), weight (V, H), bias (V,) | None, targets (M,), denom (), softcap, chunk_size, backend
    [, want_stats])``.

    Rows of h are the already-selected positions (every target is a class index). Returns ``sum(loss_i) / denom``,
    and with ``want_stats`` also the (non-differentiable) argmax-correct count and entropy sum of those rows.
    Forward computes ``d(loss)/d(h, weight, bias)`` chunk by chunk (already divided by denom) and saves only them.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, denom, softcap, chunk_size, backend, want_stats=False):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        scale = (1.0 / denom) if (need_h or need_w or need_b) else None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.float32, device=h.device)
        entropy = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size]
            logits = hc @ weight.T if bias is None else torch.addmm(bias, hc, weight.T)
            if want_stats:  # before the loss overwrites the logits with their gradient
                chunk_correct, chunk_entropy = _rows_stats_torch(logits, targets[start:start + chunk_size], softcap)
                correct += chunk_correct
                entropy += chunk_entropy
            chunk_loss, grad = _rows_loss_and_grad(logits, targets[start:start + chunk_size], softcap, scale, backend)
            loss += chunk_loss
            if grad is None:
                continue
            if need_b:
                grad_b += grad.sum(0, dtype=torch.float32)
            if need_h:
                torch.matmul(grad, weight, out=grad_h[start:start + chunk_size])
            if need_w:
                if grad.dtype == torch.float32:
                    grad_w.addmm_(grad.T, hc)
                else:  # bf16/fp16 matmul, accumulated over chunks in fp32
                    grad_w += grad.T @ hc
        # kept in the parameters' dtype (what backward returns anyway): half the bytes of fp32 for a bf16 lm_head
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(weight.dtype) if grad_b is not None else None
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.w_dtype = weight.dtype
        if not want_stats:
            return loss / denom
        ctx.mark_non_differentiable(correct, entropy)
        return loss / denom, correct, entropy

    @staticmethod
    def backward(ctx, grad_output, *_stats_grads):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype = grad_h.dtype if grad_h is not None else None
        grads = (_times(grad_h, grad_output, h_dtype), _times(grad_w, grad_output, ctx.w_dtype),
                 _times(grad_b, grad_output, ctx.w_dtype))
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def _check(hidden, weight, labels, softcap, chunk_size, bias) -> None:
    name = "fused_linear_cross_entropy"
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: weight {tuple(weight.shape)} must be (vocab, hidden) with hidden = "
                         f"{hidden.shape[-1]} (hidden's last dim)")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"{name}: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}; labels are aligned with hidden (the caller shifts them)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden dtype {hidden.dtype} differs from weight dtype {weight.dtype}; cast one")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap={softcap!r} must be a positive number or None")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size={chunk_size!r} must be a positive int")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} must be (vocab,) = ({weight.shape[0]},)")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Mean token cross-entropy of ``hidden @ weight.T (+ bias)`` against labels, as a scalar fp32 loss.

    hidden: ``(N, H)`` or ``(batch, seq, H)``; weight: ``(V, H)``; labels: ``(N,)`` or ``(batch, seq)``, ALREADY
    aligned with hidden (the caller shifts; label i is hidden row i's target), ``ignore_index`` marks positions
    without loss, which are dropped before the matmul. ``softcap`` applies ``softcap * tanh(logits / softcap)``.
    The sum of per-token losses is divided by ``num_items_in_batch`` when given, else by the number of
    non-ignored labels (0 labels -> loss 0). ``chunk_size`` tokens of logits exist at a time (each chunk's logits
    take ``chunk_size * V * 4`` bytes in fp32: lower it for very large vocabularies). fp32 or bf16 inputs; the
    log-sum-exp is always accumulated in fp32. Under ``torch.autocast`` the matmuls run in the autocast dtype, as
    ``F.linear`` would. ``return_stats=True`` returns ``(loss, TokenStats)`` (see the module docstring).
    """
    cast = autocast_linear_inputs(hidden, weight, bias)
    if cast is not None:
        hidden, weight, bias = cast
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, softcap=softcap,
                                              num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, bias=bias,
                                              return_stats=return_stats)
    _check(hidden, weight, labels, softcap, chunk_size, bias)
    backend = select_backend(hidden)
    if backend == "reference":
        loss = linear_cross_entropy_ref(hidden, weight, labels, ignore_index=ignore_index, softcap=softcap,
                                        num_items_in_batch=num_items_in_batch, bias=bias)
        return (loss, _reference_stats(hidden, weight, bias, labels, softcap, ignore_index, chunk_size)) \
            if return_stats else loss
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != ignore_index).nonzero().squeeze(1)
    targets = flat_labels[keep]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"fused_linear_cross_entropy: labels must be in [0, {weight.shape[0]}) or {ignore_index} "
                         f"(ignore_index); got values from {int(targets.min())} to {int(targets.max())}")
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    if num_items_in_batch is None:
        denom = torch.tensor(float(max(targets.numel(), 1)), device=hidden.device)
    else:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32).reshape(())
    if not return_stats:
        return FusedLinearCrossEntropyFunction.apply(h, weight, bias, targets, denom, softcap, chunk_size, backend)
    loss, correct, entropy = FusedLinearCrossEntropyFunction.apply(
        h, weight, bias, targets, denom, softcap, chunk_size, backend, True)
    return loss, TokenStats(correct, entropy, torch.tensor(float(targets.numel()), device=hidden.device))


@torch.no_grad()
def _reference_stats(hidden, weight, bias, labels, softcap, ignore_index, chunk_size) -> TokenStats:
    """The token statistics of the reference backend: :func:`token_stats_ref` over chunks of rows."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
    for start in range(0, h.shape[0], chunk_size):
        logits = torch.nn.functional.linear(h[start:start + chunk_size], weight, bias)
        sums += torch.stack(token_stats_ref(logits, y[start:start + chunk_size], softcap, ignore_index))
    return TokenStats(sums[0], sums[1], sums[2])
