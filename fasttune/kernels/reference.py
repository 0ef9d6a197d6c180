"""Plain-PyTorch references of every fasttune op.

These are the ground truth of the parity tests and the fallback wherever a fast implementation cannot run. They are
written the way transformers writes them (autograd does the backward), so they keep every intermediate autograd wants.

Shapes use ``(batch, seq, hidden)`` for activations, ``(batch, heads, seq, head_dim)`` for attention tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "apply_rope_ref",
    "geglu_ref",
    "linear_cross_entropy_ref",
    "rms_norm_ref",
    "selective_log_probs_ref",
    "rotate_half",
    "swiglu_ref",
]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim, statistics in fp32.

    ``offset=False`` (Llama): ``y = w * (x / sqrt(mean(x^2) + eps)).to(x.dtype)``.
    ``offset=True`` (Gemma):  ``y = (x / sqrt(mean(x^2) + eps) * (1 + w)).to(x.dtype)``, all in fp32.

    x: ``(..., hidden)``; weight: ``(hidden,)``.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim split in two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, rotate-half style (transformers Llama).

    q: ``(batch, q_heads, seq, head_dim)``; k: ``(batch, kv_heads, seq, head_dim)``;
    cos, sin: ``(batch, seq, head_dim)`` gathered from per-token position ids.
    ``q' = q * cos + rotate_half(q) * sin`` (same for k).
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; gate, up: ``(..., intermediate)``."""
    return F.silu(gate) * up


def geglu_ref(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` with ``approximate`` in ``{"tanh", "none"}``."""
    return F.gelu(gate, approximate=approximate) * up


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The naive lm_head + cross-entropy: materialises all ``(tokens, vocab)`` logits in fp32.

    hidden: ``(N, H)`` or ``(batch, seq, H)``; weight: ``(V, H)``; labels: ``(N,)`` or ``(batch, seq)`` already
    aligned with hidden (the caller shifts). ``z = softcap * tanh((h W^T + b) / softcap)`` when softcap is set;
    ``loss = sum_i [logsumexp(z_i) - z_i[y_i]] / D`` over non-ignored i, where D is ``num_items_in_batch`` when given,
    else the count of non-ignored labels.
    """
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = labels.reshape(-1)
    total = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        return total / (flat != ignore_index).sum().clamp(min=1)
    return total / num_items_in_batch


def selective_log_probs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities of ``targets`` from the full ``(N, V)`` fp32 logits (the naive RL log-prob path).

    hidden: ``(N, H)``; weight: ``(V, H)``; targets: ``(N,)``. With ``y = logit_scale * (h W^T + b)``,
    ``z = softcap * tanh(y / softcap)`` (or ``y`` without softcap) and ``z = z / temperature`` (TRL's fused LM head
    order), returns ``(log_softmax(z)[i, targets_i]`` ``(N,)``, the entropy ``-(p * log p).sum(-1)`` ``(N,)``
    detached, or None without ``with_entropy``).
    """
    z = F.linear(hidden, weight, bias).float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    logps = log_p.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    if not with_entropy:
        return logps, None
    return logps, -(log_p.exp() * log_p).sum(-1).detach()
