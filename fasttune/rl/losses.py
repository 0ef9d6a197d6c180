"""GRPO-family policy losses (grpo, bnpo, dr_grpo, dapo; token- or sequence-level ratios) with exact accumulation.

For completions ``i`` with tokens ``t`` (``m_it`` the completion mask, ``A_i`` or ``A_it`` the advantages) the
clipped surrogate of PPO, as GRPO uses it, is::

    log r_it = logp_it - old_logp_it                                   importance_sampling_level="token"
    log r_i  = sum_t m_it (logp_it - old_logp_it) / sum_t m_it         "sequence" (GSPO, arXiv:2507.18071)
    l_it     = -min(r' A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)     r' = min(r, delta) when delta is set
               + beta * kl_it                                          (INTELLECT-2's two-sided clipping, 2505.07291)
    kl_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1          k3 estimator of KL(pi || pi_ref), >= 0
    kl_it   *= r                                                       with bias_correction_kl (DeepSeek-V3.2)

A sequence-level ratio is one value per sequence, broadcast over its tokens. The loss types differ only in how
the ``l_it`` are summed and normalised; each is written as ``numerator / normalizer``::

    grpo     numerator = sum_i (sum_t m_it l_it / max(1, sum_t m_it))    normalizer = number of sequences
             (DeepSeekMath, arXiv:2402.03300: mean over a sequence's tokens, then over sequences)
    bnpo     numerator = sum_it m_it l_it                                normalizer = number of active tokens
             (token mean over the batch)
    dr_grpo  numerator = sum_it m_it l_it                                normalizer = sequences * max_completion_length
             (Dr. GRPO, arXiv:2503.20783: a constant, so no length bias)
    dapo     numerator = sum_it m_it l_it                                normalizer = active tokens of the GLOBAL batch
             (DAPO, arXiv:2503.14476: token-level normalisation over all the batch's tokens)

Exact gradient accumulation: the normalizer is a parameter. ``normalizer=None`` uses this micro-batch's own value
(the formulas above on this batch alone). A trainer accumulating k micro-batches passes the normalizer of the whole
window (:func:`window_normalizer`), and then the sum of the k micro-batch losses, and of their gradients, is exactly
the loss of the one batch that holds them all, whatever the completion lengths. bnpo and dapo differ only in what
the caller passes: bnpo's window is this process's accumulation window; dapo's is the global batch. Under data
parallelism that averages gradients over W ranks, pass the global count divided by W (as TRL does with
``num_items_in_batch / num_processes``).

Where this departs from TRL 1.16's ``GRPOTrainer._compute_loss`` (same per-token maths, same clipping and metrics
definitions): TRL divides grpo, bnpo and dr_grpo by each micro-batch's own normalizer and then by the number of
accumulation steps, which is exact for grpo and dr_grpo when micro-batches hold equally many sequences, but not for
bnpo when their token counts differ (short micro-batches then weigh more per token). ``bias_correction_kl`` defaults
to False here (TRL's ``use_bias_correction_kl`` defaults to True).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["IMPORTANCE_SAMPLING_LEVELS", "LOSS_TYPES", "GRPOLossOutput", "grpo_loss", "window_normalizer"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")


class GRPOLossOutput(NamedTuple):
    """What :func:`grpo_loss` returns. Only ``loss`` and ``per_token_loss`` carry gradients; the rest are detached
    fp32 scalars for logging (no host sync is made to compute them).

    loss:             ``numerator / normalizer`` (scalar).
    per_token_loss:   ``l_it`` ``(B, T)`` before masking and normalisation (part of the graph).
    kl_mean:          mean of ``kl_it`` (bias-corrected when asked) over active tokens; None without ``ref_logps``.
    clip_low_frac:    fraction with ``r < 1 - epsilon_low`` and ``A < 0`` (the clip holds the ratio up).
    clip_high_frac:   fraction with ``r > 1 + epsilon_high`` and ``A > 0`` (the clip holds the ratio down).
    clip_region_frac: fraction in either region. Fractions are over active tokens, or over sequences with at least
                      one active token when the ratio is per sequence (sequence level, advantages ``(B,)``).
    num_tokens:       active tokens in this micro-batch (``sum m``), to weight the metrics of several micro-batches.
    normalizer:       the normalizer the loss was divided by.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    kl_mean: torch.Tensor | None
    clip_low_frac: torch.Tensor
    clip_high_frac: torch.Tensor
    clip_region_frac: torch.Tensor
    num_tokens: torch.Tensor
    normalizer: torch.Tensor


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not supported; allowed values are {', '.join(allowed)}")


def _check_options(loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta,
                   max_completion_length) -> None:
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    for name, value in (("beta", beta), ("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    if epsilon_low >= 1:
        raise ValueError(f"epsilon_low={epsilon_low!r} must be < 1: the lower clip bound 1 - epsilon_low is a ratio")
    if delta is not None and not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta={delta!r} must be a finite number > 0 (recommended > 1 + epsilon_high) or None")
    if max_completion_length is not None and (isinstance(max_completion_length, bool)
                                              or not isinstance(max_completion_length, int)
                                              or max_completion_length < 1):
        raise ValueError(f"max_completion_length={max_completion_length!r} must be a positive int or None")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length: loss_type='dr_grpo' normalises by sequences * max_completion_length; "
                         "pass the generation's max_completion_length")


def _check_shapes(logps, old_logps, advantages, mask, ref_logps, beta) -> None:
    if logps.dim() != 2:
        raise ValueError(f"logps {tuple(logps.shape)} must be (batch, completion_len)")
    shape = tuple(logps.shape)
    for name, t in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} {tuple(t.shape)} must have logps' shape {shape}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (batch,) = {shape[:1]} or logps' shape "
                         f"{shape}")
    if beta != 0 and ref_logps is None:
        raise ValueError(f"ref_logps: beta={beta!r} adds a KL penalty against the reference model, which needs the "
                         "reference log-probs; pass ref_logps (batch, completion_len) or set beta=0")


def _log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``log(pi / pi_old)``: ``(B, T)`` per token, or ``(B, 1)`` the masked token mean per sequence (GSPO)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
                       delta: float | None) -> torch.Tensor:
    """``-min(r' A, clip(r) A)``: the clip bounds how far one step moves the policy; ``delta`` also caps the
    unclipped ratio, which otherwise is unbounded for negative advantages."""
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    capped = ratio.clamp(max=delta) if delta is not None else ratio
    return -torch.minimum(capped * advantages, clipped * advantages)


def _k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of ``KL(pi || pi_ref)`` per token: ``e^x - x - 1 >= 0``, ``x = ref - logp``; unbiased
    under samples of pi and lower-variance than ``-x``."""
    x = ref_logps - logps
    return torch.exp(x) - x - 1.0


def _numerator(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The summed part of the loss (module docstring): per-sequence token means for grpo, a token sum otherwise."""
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    return masked.sum()


def _own_normalizer(loss_type: str, mask: torch.Tensor, max_completion_length: int | None) -> torch.Tensor:
    """This micro-batch's normalizer alone (``normalizer=None``); at least 1, so an empty batch gives loss 0."""
    sequences = torch.tensor(float(mask.shape[0]), device=mask.device)
    if loss_type == "grpo":
        return sequences.clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (sequences * max_completion_length).clamp(min=1.0)
    return mask.sum().float().clamp(min=1.0)


def _as_normalizer(normalizer: float | int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer: a tensor of shape {tuple(normalizer.shape)}; it must hold one number")
        return normalizer.detach().to(device=device, dtype=torch.float32).reshape(())
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not normalizer > 0:
        raise ValueError(f"normalizer={normalizer!r} must be a number > 0 (see window_normalizer) or None")
    return torch.tensor(float(normalizer), device=device)


@torch.no_grad()
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over active tokens; x ``(B, 1)`` (one value per sequence) -> over sequences with a token."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        mask = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).float()


@torch.no_grad()
def _clip_fractions(ratio, advantages, mask, epsilon_low, epsilon_high) -> tuple[torch.Tensor, ...]:
    """Where the clip, not the ratio, sets the loss (TRL's ``clip_ratio/low_mean``, ``high_mean``, ``region_mean``)."""
    low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return tuple(_masked_mean(x.to(mask.dtype), mask) for x in (low, high, low | high))


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = "grpo",
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    normalizer: float | int | torch.Tensor | None = None,
    bias_correction_kl: bool = False,
) -> GRPOLossOutput:
    """The GRPO-family loss of one micro-batch (formulas and papers in the module docstring).

    logps: ``(batch, completion_len)`` log-probs of the sampled tokens under the policy being trained (with grad);
    old_logps: the same under the policy that sampled them (no grad; None means on-policy: ``logps.detach()``);
    advantages: ``(batch,)`` or ``(batch, completion_len)``; mask: ``(batch, completion_len)``, 1 on scored tokens
    (bool or float); ref_logps: the reference model's log-probs, needed when ``beta > 0`` (also gives ``kl_mean``).
    ``loss_type`` in grpo, bnpo, dr_grpo, dapo; ``importance_sampling_level`` "token" or "sequence" (GSPO).
    ``max_completion_length`` is required by dr_grpo. ``normalizer``: None for this micro-batch alone, or the whole
    accumulation window's (:func:`window_normalizer`) so that the micro-batch losses sum to the window's loss.
    """
    _check_options(loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta,
                   max_completion_length)
    _check_shapes(logps, old_logps, advantages, mask, ref_logps, beta)
    old_logps = logps.detach() if old_logps is None else old_logps
    # in at least fp32: exp(log ratio) decides the clip, and bf16 neither holds it to 0.4% nor counts past 256 tokens
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps, old_logps, mask, advantages = (t.to(dtype) for t in (logps, old_logps, mask, advantages))
    ref_logps = ref_logps.to(dtype) if ref_logps is not None else None
    advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(_log_ratio(logps, old_logps, mask, importance_sampling_level))
    per_token_loss = _clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high, delta).expand_as(logps)
    kl = None
    if ref_logps is not None:
        kl = _k3_kl(logps, ref_logps)
        kl = kl * ratio if bias_correction_kl else kl
        if beta != 0:
            per_token_loss = per_token_loss + beta * kl
    if normalizer is None:
        denom = _own_normalizer(loss_type, mask, max_completion_length)
    else:
        denom = _as_normalizer(normalizer, logps.device)
    loss = _numerator(per_token_loss, mask, loss_type) / denom
    low, high, region = _clip_fractions(ratio, advantages, mask, epsilon_low, epsilon_high)
    kl_mean = _masked_mean(kl, mask) if kl is not None else None
    return GRPOLossOutput(loss, per_token_loss, kl_mean, low, high, region, mask.sum().detach().float(), denom)


def window_normalizer(loss_type: str, masks: Sequence[torch.Tensor], max_completion_length: int | None = None) -> float:
    """The normalizer of a whole accumulation window, from the ``(batch, completion_len)`` masks of its micro-batches.

    grpo: sequences in the window; bnpo and dapo: active tokens in it (for dapo pass the masks of the whole global
    batch, or its token count yourself); dr_grpo: sequences * ``max_completion_length``. Never below 1. Passing it as
    ``grpo_loss(..., normalizer=...)`` to every micro-batch makes their losses sum to the window's loss exactly.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if isinstance(masks, torch.Tensor) or not masks:
        raise ValueError("masks: pass a non-empty list of the micro-batches' (batch, completion_len) masks")
    for i, m in enumerate(masks):
        if m.dim() != 2:
            raise ValueError(f"masks[{i}] {tuple(m.shape)} must be (batch, completion_len)")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(f"max_completion_length={max_completion_length!r}: loss_type='dr_grpo' needs the positive "
                         "max_completion_length of the generation")
    sequences = sum(m.shape[0] for m in masks)
    if loss_type == "grpo":
        return float(max(sequences, 1))
    if loss_type == "dr_grpo":
        return float(max(sequences * max_completion_length, 1))
    return max(float(sum(m.float().sum() for m in masks)), 1.0)
