"""Selective log-probabilities: lm_head + log-softmax + gather over chunks of tokens, never holding all the logits.

RL losses (GRPO and its family) need ``log p(y_i | context_i)`` of the sampled tokens only, not the loss of a whole
vocabulary row, so the ``(N, V)`` logits are pure temporaries. For each chunk of the scored rows::

    y    = logit_scale * (h W^T + b)                (chunk, V): matmul in the input dtype, then fp32
    z    = softcap * tanh(y / softcap)              only when softcap is set (Gemma-2/3 final logit softcapping)
    z    = z / temperature                          the sampling temperature
    lse  = logsumexp(z)                             fp32, kept: (N,)
    logp = z[target] - lse                          (N,)
    H    = lse - sum_v p_v z_v                      entropy, p = exp(z - lse); only with ``with_entropy``

The order ``logit_scale -> softcap -> temperature`` is the one TRL's fused LM head uses (``trl.trainer.utils.
add_fused_lm_head`` passes the config's ``logit_scale`` and ``final_logit_softcapping`` to its chunked log-prob kernel,
which scales, softcaps, then multiplies by ``1 / temperature``), so log-probs computed here and there agree.

Forward keeps only ``lse`` ``(N,)``; backward recomputes each chunk's logits (one more ``chunk x V`` matmul per chunk)
and, for the incoming ``g = dL/dlogp`` ``(N,)``::

    dz      = g * (onehot(target) - p)
    dy      = dz / temperature * (1 - tanh^2(y / softcap))     (the last factor only with softcap)
    dlogits = dy * logit_scale
    dh      = dlogits W          dW += dlogits^T h          db += sum_rows(dlogits)

dW and db are computed only when the weight and bias require grad: in LoRA training the LM head is frozen and that
work (a ``V x H`` accumulator and one more matmul per chunk) is skipped. dW is accumulated over chunks in fp32.

The entropy is returned DETACHED: it is for metrics and entropy masks (TRL's ``top_entropy_quantile``), not for an
entropy bonus. An entropy loss needs its own gradient ``-p (log p + H)``, which this op does not compute.

Autograd saves only the inputs (alive anyway) and ``lse``; the largest temporary is one chunk's logits,
``chunk_size * V`` fp32 values (plus its gradient in backward).
"""

from __future__ import annotations

import math

import torch

from fasttune.kernels.dispatch import autocast_linear_inputs, select_backend
from fasttune.kernels.reference import selective_log_probs_ref

__all__ = ["SelectiveLogProbFunction", "selective_log_probs"]


def _transform(logits: torch.Tensor, logit_scale: float, softcap: float | None,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits ``(c, V)`` in any dtype -> (z ``(c, V)`` fp32, ``tanh(y / softcap)`` or None), as in the docstring.

    Returns the tanh too: backward needs ``1 - tanh^2`` and recomputing it would cost another pass over the chunk.
    """
    z = logits.float()
    if logit_scale != 1.0:
        z = z * logit_scale
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    if temperature != 1.0:
        z = z / temperature
    return z, t


def _rows_forward(logits: torch.Tensor, targets: torch.Tensor, logit_scale: float, softcap: float | None,
                  temperature: float, want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits ``(c, V)``, targets ``(c,)`` -> (logp ``(c,)``, lse ``(c,)``, entropy ``(c,)`` or None), fp32."""
    z, _ = _transform(logits, logit_scale, softcap, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
    if not want_entropy:
        return logp, lse, None
    p = (z - lse.unsqueeze(1)).exp_()
    return logp, lse, lse - (p * z).sum(-1)


def _rows_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
               logit_scale: float, softcap: float | None, temperature: float) -> torch.Tensor:
    """``dL/dlogits`` ``(c, V)`` fp32 of one chunk, from its recomputed logits and ``g = dL/dlogp`` ``(c,)``."""
    z, t = _transform(logits, logit_scale, softcap, temperature)
    # dz = g * (onehot - p), built in z's buffer: p first, then the target column
    grad = z.sub_(lse.unsqueeze(1)).exp_().mul_(-grad_logp.unsqueeze(1))
    grad[torch.arange(grad.shape[0], device=grad.device), targets] += grad_logp
    factor = logit_scale / temperature
    if t is not None:
        grad.mul_(t.square_().neg_().add_(1.0))
    return grad.mul_(factor) if factor != 1.0 else grad


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h W^T + b`` ``(c, V)`` in the input dtype (what ``F.linear`` gives the naive path)."""
    return h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)


class SelectiveLogProbFunction(torch.autograd.Function):
    """``apply(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,), temperature, softcap, logit_scale,
    chunk_size, want_entropy)`` -> ``(logps (N,) fp32, entropy (N,) fp32 non-differentiable)``.

    ``entropy`` is an empty tensor when ``want_entropy`` is False. See the module docstring for the maths.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, logit_scale, chunk_size, want_entropy):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if want_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight, bias)
            logp, chunk_lse, chunk_entropy = _rows_forward(logits, targets[rows], logit_scale, softcap, temperature,
                                                           want_entropy)
            logps[rows], lse[rows] = logp, chunk_lse
            if want_entropy:
                entropy[rows] = chunk_entropy
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.settings = (temperature, softcap, logit_scale, chunk_size)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, softcap, logit_scale, chunk_size = ctx.settings
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        grad_logps = grad_logps.float()
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hc = hidden[rows]
            grad = _rows_grad(_chunk_logits(hc, weight, bias), targets[rows], lse[rows], grad_logps[rows],
                              logit_scale, softcap, temperature)
            if need_b:
                grad_b += grad.sum(0)
            grad = grad.to(weight.dtype)  # the matmuls run in the input dtype, as the forward's did
            if need_h:
                torch.matmul(grad, weight, out=grad_h[rows])
            if need_w:
                grad_w += grad.T @ hc  # bf16/fp16 product, summed over chunks in fp32
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_options(temperature, softcap, logit_scale, chunk_size) -> None:
    name = "selective_log_probs"
    if not (_finite_number(temperature) and temperature > 0):
        raise ValueError(f"{name}: temperature={temperature!r} must be a finite number > 0")
    if softcap is not None and not (_finite_number(softcap) and softcap > 0):
        raise ValueError(f"{name}: softcap={softcap!r} must be a finite number > 0 or None (no softcapping)")
    if not _finite_number(logit_scale):
        raise ValueError(f"{name}: logit_scale={logit_scale!r} must be a finite number (1.0: no scaling)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size={chunk_size!r} must be a positive int")


def _check_tensors(hidden, weight, targets, bias) -> None:
    name = "selective_log_probs"
    if hidden.dim() != 2:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)} must be (N, hidden): select the scored positions "
                         "first, e.g. hidden_states[mask]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: weight {tuple(weight.shape)} must be (vocab, hidden) with hidden = "
                         f"{hidden.shape[1]} (hidden's last dim)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden dtype {hidden.dtype} differs from weight dtype {weight.dtype}; cast one")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} {bias.dtype} must be (vocab,) = ({weight.shape[0]},) "
                         f"in weight's dtype {weight.dtype}")
    if targets.shape != (hidden.shape[0],) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets {tuple(targets.shape)} {targets.dtype} must be integer token ids of "
                         f"shape (N,) = ({hidden.shape[0]},), one per row of hidden")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"{name}: targets must be in [0, {weight.shape[0]}) (the vocabulary); got values from "
                         f"{int(targets.min())} to {int(targets.max())}")


def selective_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target under ``softmax(f(hidden @ weight.T + bias))``, chunk by chunk.

    hidden: ``(N, H)``, only the positions to score (the caller selects them, so there is no ignore_index);
    weight: ``(V, H)``; targets: ``(N,)`` token ids in ``[0, V)``; bias: ``(V,)`` or None. ``f`` multiplies by
    ``logit_scale``, applies ``softcap * tanh(x / softcap)`` when ``softcap`` is set, then divides by
    ``temperature`` (TRL's fused LM head order). Returns ``(logps (N,) fp32, entropy (N,) fp32 or None)``; the
    entropy (only with ``with_entropy``) is detached: metrics and masks only. Gradients reach hidden, and weight and
    bias only when they require grad, in their own dtypes; fp16/bf16 inputs are upcast to fp32 after each matmul.
    ``chunk_size`` rows of logits exist at a time (``chunk_size * V * 4`` bytes). Under ``torch.autocast`` the
    matmuls run in the autocast dtype, as ``F.linear`` would.
    """
    cast = autocast_linear_inputs(hidden, weight, bias)
    if cast is not None:
        hidden, weight, bias = cast
        with torch.autocast(hidden.device.type, enabled=False):
            return selective_log_probs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                       logit_scale=logit_scale, chunk_size=chunk_size, with_entropy=with_entropy)
    _check_options(temperature, softcap, logit_scale, chunk_size)
    _check_tensors(hidden, weight, targets, bias)
    if select_backend(hidden) == "reference":
        return selective_log_probs_ref(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                       logit_scale=logit_scale, with_entropy=with_entropy)
    # "torch" and "triton" (no Triton kernel of this op: its chunks are matmul-bound) both run the torch path
    logps, entropy = SelectiveLogProbFunction.apply(hidden, weight, bias, targets.long(), float(temperature), softcap,
                                                    float(logit_scale), chunk_size, with_entropy)
    return logps, (entropy if with_entropy else None)
