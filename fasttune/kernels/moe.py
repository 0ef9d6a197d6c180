"""The experts of a mixture-of-experts layer, grouped by expert, with split LoRA and a recomputing backward.

A MoE block sends each of ``N`` tokens to ``k`` of ``E`` experts (the router's top-k indices and weights). Expert
``e`` computes a gated MLP on the tokens it received::

    gu = x W_gu[e]^T (+ b_gu[e]) + s_gu * (x A_gu[e]^T) B_gu[e]^T       (n_e, 2I)
    h  = act(gu)                                                       (n_e, I)
    y  = h W_d[e]^T (+ b_d[e]) + s_d * (h A_d[e]^T) B_d[e]^T            (n_e, H)
    out[token] += weight * y

What :func:`moe_experts` does differently from transformers' eager experts (one Python iteration per expert that
received tokens, autograd keeping every expert's intermediates) and from peft's ``target_parameters`` LoRA (which
materialises ``W + s B A`` for *every* expert on every forward):

* the ``N * k`` (token, expert) pairs are sorted by expert once; every product is one grouped matrix product over
  the sorted rows (``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm``; a loop over the experts that
  received tokens where neither exists), forward and backward, experts without tokens cost nothing;
* split LoRA: the adapter terms are computed on the grouped tokens through the factors (rank ``r``), never as merged
  expert weights;
* the backward recomputes ``gu``, ``h`` and ``y`` from the block's input: nothing of size ``(N * k, I)`` is kept
  between forward and backward, only the input, the routing and its sort order;
* gradients flow to the input, to the routing weights (so the router trains through them, as in the reference) and to
  the LoRA factors; the expert weights and biases are frozen (full fine-tuning of experts takes the reference path).

Layouts (:class:`ExpertLayout`): weights stored ``(E, out, in)`` (Qwen3-MoE, Mixtral) or ``(E, in, out)``
(gpt-oss, ``transposed``); gate and up as the two halves of ``gu`` or interleaved columns (gpt-oss). Activations:
``"silu"`` (``silu(gate) * up``) and ``"clamped_swiglu"`` (gpt-oss:
``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with
``g = clamp(gate, max=l)``). LoRA factors come in peft's ``ParamWrapper`` layout: ``A`` is ``(E * r, in)``
expert-major, ``B`` is ``(out, r * E)`` rank-major (``B.reshape(out, r, E)[:, :, e]`` is expert ``e``'s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fasttune.quant.experts import is_packed

__all__ = ["ExpertLayout", "ExpertLora", "expert_delta", "grouped_mm_available", "moe_experts", "moe_experts_reference"]

ACTIVATIONS = ("silu", "clamped_swiglu")


@dataclass(frozen=True)
class ExpertLayout:
    """How one family stores its experts and which gated activation they use (read from ``models/<family>.py``)."""

    transposed: bool = False  # (E, in, out) instead of (E, out, in)
    interleaved: bool = False  # gate/up alternate along gu's columns instead of gate half | up half
    activation: str = "silu"
    alpha: float = 1.702  # clamped_swiglu: the sigmoid's slope
    limit: float = 7.0  # clamped_swiglu: the clamp

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: {self.activation!r} is not an expert activation; supported: {ACTIVATIONS}")


@dataclass(frozen=True)
class ExpertLora:
    """One LoRA on a 3-D expert parameter, in peft's ``ParamWrapper`` layout (see the module docstring)."""

    A: torch.Tensor  # (E * r, in)
    B: torch.Tensor  # (out, r * E)
    scaling: float


def _split(gu: torch.Tensor, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor]:
    if layout.interleaved:
        return gu[..., ::2], gu[..., 1::2]
    return gu.chunk(2, dim=-1)


def _activate(gu: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    gate, up = _split(gu, layout)
    if layout.activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=layout.limit)
    up = up.clamp(min=-layout.limit, max=layout.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * layout.alpha))


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Grouped product: ``a`` (T, K) rows grouped by ``offs`` times ``b[e]`` (K, N) -> (T, N); or, with ``a``
    (M, T) and ``b`` (T, N), the per-group ``a[:, rows_e] @ b[rows_e]`` -> (E, M, N) (weight gradients)."""
    if a.dtype in _GROUPED_DTYPES.get(a.device.type, ()) and _aligned(a) and _aligned(b):
        if hasattr(F, "grouped_mm"):
            return F.grouped_mm(a, b, offs=offs)
        if hasattr(torch, "_grouped_mm"):
            return torch._grouped_mm(a, b, offs=offs)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    if b.dim() == 3:  # row-grouped
        out = a.new_empty(a.shape[0], b.shape[-1])
        for e, c in enumerate(counts):
            if c:
                torch.mm(a[starts[e]:starts[e + 1]], b[e], out=out[starts[e]:starts[e + 1]])
        return out
    out = a.new_zeros(len(counts), a.shape[0], b.shape[-1])
    for e, c in enumerate(counts):
        if c:
            torch.mm(a[:, starts[e]:starts[e + 1]], b[starts[e]:starts[e + 1]], out=out[e])
    return out


# What grouped_mm takes per device (others loop over the experts with tokens: float64 on CPU, fp32 on CUDA, where
# torch's grouped kernel is bf16-only; the CUDA case is not checked here: no GPU was lent)
_GROUPED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm's layout rule (CPU too): 16-byte aligned data and strides, one of the last two dims contiguous."""
    size = t.element_size()
    return (t.data_ptr() % 16 == 0 and 1 in t.stride()[-2:]
            and all((stride * size) % 16 == 0 for stride in t.stride() if stride != 1))


def _in_out(weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """The stored 3-D weight as ``(E, in, out)`` (a view, no copy)."""
    return weight if layout.transposed else weight.transpose(1, 2)


def _factors(lora: ExpertLora, experts: int, dtype: torch.dtype,
             groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^T, B^T)`` per expert: ``(E, in, r')`` and ``(E, r', out)`` from peft's factors, in ``dtype``; only the
    experts ``groups`` when given. The rank is padded with zeros to ``r'`` so rows are 16-byte multiples (grouped_mm's
    rule); the padding contributes exactly nothing."""
    rank = lora.A.shape[0] // experts
    a_t = lora.A.reshape(experts, rank, -1).transpose(1, 2)
    b_t = lora.B.reshape(lora.B.shape[0], rank, experts).permute(2, 1, 0)
    if groups is not None:
        a_t, b_t = a_t[groups], b_t[groups]
    pad = -rank % (16 // torch.empty((), dtype=dtype).element_size())  # zero rank columns: 16-byte rows
    a_t = F.pad(a_t.to(dtype), (0, pad))
    b_t = F.pad(b_t.to(dtype), (0, 0, 0, pad))
    return a_t.contiguous(), b_t.contiguous()


def expert_delta(lora: ExpertLora, experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scaling * (B_e A_e)^T`` for every expert, ``(E, in, out)``: the adapter as a merged-weight delta (the
    reference's and the merge's; the grouped kernel never forms it)."""
    a_t, b_t = _factors(lora, experts, dtype)
    return torch.bmm(a_t, b_t) * lora.scaling


def _weights(weight: torch.Tensor, layout: ExpertLayout, groups: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """``(G, in, out)`` weights of the groups: every expert of a dense weight (a view), or the dequantized experts
    ``groups`` of a 4-bit one (:class:`fasttune.quant.experts.PackedExperts`)."""
    if is_packed(weight):
        return _in_out(weight.dequantize(groups, dtype), layout)
    dense = weight if groups is None else weight[groups]
    return _in_out(dense, layout).to(dtype)


def _project(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, lora: tuple | None, expert_of: torch.Tensor,
             offs: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x W^T + b + s (x A^T) B^T`` on grouped rows; also returns ``x A^T`` (the backward needs it)."""
    out = _gmm(x, w_t, offs, counts)
    if bias is not None:
        out = out + bias.to(out.dtype)[expert_of]
    if lora is None:
        return out, None
    a_t, b_t, scale = lora
    xa = _gmm(x, a_t, offs, counts)
    return out.add_(_gmm(xa, b_t, offs, counts), alpha=scale), xa


class _Routing:
    """The (token, expert) pairs sorted by expert: which token each sorted row is, its expert, the groups of rows.

    The groups are every expert (``groups`` None: a dense weight is used as stored, experts without tokens are
    empty groups), or with ``hit_only`` just the experts that received tokens (``groups``: their indices; 4-bit
    weights are dequantized for those only).
    """

    def __init__(self, top_idx: torch.Tensor, experts: int, hit_only: bool):
        flat = top_idx.reshape(-1)
        self.experts = experts
        self.order = torch.argsort(flat, stable=True)
        self.token = self.order // top_idx.shape[-1]
        self.expert = flat[self.order]
        counts = torch.bincount(flat, minlength=experts)
        self.groups = torch.nonzero(counts).flatten() if hit_only else None
        if self.groups is not None:
            counts = counts[self.groups]
        self.counts = counts.tolist()
        self.offs = counts.cumsum(0).to(torch.int32)

    def scatter(self, grouped: torch.Tensor) -> torch.Tensor:
        """A per-group ``(G, ...)`` gradient as the per-expert ``(E, ...)`` one (zeros for experts without tokens)."""
        if self.groups is None:
            return grouped
        full = grouped.new_zeros(self.experts, *grouped.shape[1:])
        return full.index_copy_(0, self.groups, grouped)


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_w, top_idx, gate_up, down, gate_up_bias, down_bias, layout, lora_gu, lora_d, *adapters):
        routing = _Routing(top_idx, gate_up.shape[0], hit_only=is_packed(gate_up) or is_packed(down))
        out, _ = _MoEExperts._compute(x, top_w, routing, gate_up, down, gate_up_bias, down_bias, layout, lora_gu,
                                      lora_d, keep=False)
        ctx.save_for_backward(x, top_w, *adapters)
        ctx.routing = routing  # the sort by expert, made once (integer tensors of tokens x top-k entries)
        ctx.parts = (gate_up, down, gate_up_bias, down_bias, layout, lora_gu, lora_d, len(adapters))
        return out

    @staticmethod
    def _compute(x, top_w, routing, gate_up, down, gate_up_bias, down_bias, layout, lora_gu, lora_d, keep):
        dtype, experts, groups = x.dtype, gate_up.shape[0], routing.groups
        xs = x[routing.token]
        gu_lora = None if lora_gu is None else (*_factors(lora_gu, experts, dtype, groups), lora_gu.scaling)
        d_lora = None if lora_d is None else (*_factors(lora_d, experts, dtype, groups), lora_d.scaling)
        w_gu = _weights(gate_up, layout, groups, dtype)
        gu, xa = _project(xs, w_gu, gate_up_bias, gu_lora, routing.expert, routing.offs, routing.counts)
        h = _activate(gu, layout)
        w_d = _weights(down, layout, groups, dtype)
        y, ha = _project(h, w_d, down_bias, d_lora, routing.expert, routing.offs, routing.counts)
        weights = top_w.reshape(-1)[routing.order].to(dtype)
        out = torch.zeros_like(x).index_add_(0, routing.token, y * weights[:, None])
        saved = (xs, gu, h, y, xa, ha, weights, gu_lora, d_lora, w_gu, w_d) if keep else None
        return out, saved

    @staticmethod
    def backward(ctx, grad_out):
        x, top_w, *_ = ctx.saved_tensors
        gate_up, down, gate_up_bias, down_bias, layout, lora_gu, lora_d, n_adapters = ctx.parts
        routing = ctx.routing
        offs, counts = routing.offs, routing.counts
        with torch.no_grad():
            _, saved = _MoEExperts._compute(x, top_w, routing, gate_up, down, gate_up_bias, down_bias, layout,
                                            lora_gu, lora_d, keep=True)
        xs, gu, h, y, xa, ha, weights, gu_lora, d_lora, w_gu, w_d = saved
        grad_out = grad_out.to(x.dtype)
        gy = grad_out[routing.token]  # (T, H)
        grad_top_w = None
        if ctx.needs_input_grad[1]:
            grad_rows = (gy.float() * y.float()).sum(-1)
            grad_top_w = torch.empty_like(grad_rows).index_put_((routing.order,), grad_rows)
            grad_top_w = grad_top_w.reshape(top_w.shape).to(top_w.dtype)
        del y
        gy = gy * weights[:, None]

        adapter_grads: list[torch.Tensor | None] = []
        # down: h -> y
        grad_h = _gmm(gy, w_d.transpose(1, 2), offs, counts)
        if d_lora is not None:
            a_t, b_t, scale = d_lora
            gb = _gmm(gy, b_t.transpose(1, 2), offs, counts)  # (T, r)
            grad_h.add_(_gmm(gb, a_t.transpose(1, 2), offs, counts), alpha=scale)
            adapter_grads.append(_grad_A(routing.scatter(_gmm(h.t(), gb, offs, counts)), scale, lora_d))
            adapter_grads.append(_grad_B(routing.scatter(_gmm(ha.t(), gy, offs, counts)), scale, lora_d))
        del h, ha, w_d
        # activation
        with torch.enable_grad():
            gu_leaf = gu.detach().requires_grad_(True)
            (grad_gu,) = torch.autograd.grad(_activate(gu_leaf, layout), gu_leaf, grad_h)
        del gu, gu_leaf, grad_h
        # gate_up: x -> gu
        grad_xs = _gmm(grad_gu, w_gu.transpose(1, 2), offs, counts)
        if gu_lora is not None:
            a_t, b_t, scale = gu_lora
            gb = _gmm(grad_gu, b_t.transpose(1, 2), offs, counts)
            grad_xs.add_(_gmm(gb, a_t.transpose(1, 2), offs, counts), alpha=scale)
            adapter_grads = [_grad_A(routing.scatter(_gmm(xs.t(), gb, offs, counts)), scale, lora_gu),
                             _grad_B(routing.scatter(_gmm(xa.t(), grad_gu, offs, counts)), scale, lora_gu),
                             *adapter_grads]
        grad_x = torch.zeros_like(x).index_add_(0, routing.token, grad_xs) if ctx.needs_input_grad[0] else None
        grads = [g if ctx.needs_input_grad[10 + i] else None for i, g in enumerate(adapter_grads)]
        return (grad_x, grad_top_w, None, None, None, None, None, None, None, None, *_pad(grads, n_adapters))


def _pad(grads: list, n: int) -> list:
    return grads + [None] * (n - len(grads))


def _grad_A(grouped: torch.Tensor, scale: float, lora: ExpertLora) -> torch.Tensor:
    """``(E, in, r')`` per-expert ``dA^T`` (``r' >= r``: padded) -> the gradient of peft's ``A`` ``(E * r, in)``."""
    rank = lora.A.shape[0] // grouped.shape[0]
    return (grouped[..., :rank].transpose(1, 2).reshape(lora.A.shape) * scale).to(lora.A.dtype)


def _grad_B(grouped: torch.Tensor, scale: float, lora: ExpertLora) -> torch.Tensor:
    """``(E, r', out)`` per-expert ``dB^T`` (``r' >= r``: padded) -> the gradient of peft's ``B`` ``(out, r * E)``."""
    rank = lora.A.shape[0] // grouped.shape[0]
    return (grouped[:, :rank].permute(2, 1, 0).reshape(lora.B.shape) * scale).to(lora.B.dtype)


def moe_experts(x: torch.Tensor, top_w: torch.Tensor, top_idx: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, layout: ExpertLayout, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, lora_gate_up: ExpertLora | None = None,
                lora_down: ExpertLora | None = None) -> torch.Tensor:
    """The experts' output for ``x`` (N, H) routed by ``top_idx`` / ``top_w`` (N, k); see the module docstring.

    ``gate_up`` / ``down`` are the stored 3-D weights (frozen), the biases ``(E, 2I)`` / ``(E, H)`` or None.
    """
    if gate_up.requires_grad or down.requires_grad:
        raise ValueError("moe_experts: the expert weights require grad; the grouped path trains LoRA factors and "
                         "the router, not the experts themselves (use the reference for full fine-tuning)")
    adapters = [t for lora in (lora_gate_up, lora_down) if lora is not None for t in (lora.A, lora.B)]
    # the factors travel as separate inputs too, so autograd sees them
    return _MoEExperts.apply(x, top_w, top_idx, gate_up, down, gate_up_bias, down_bias, layout, lora_gate_up,
                             lora_down, *adapters)


def moe_experts_reference(x: torch.Tensor, top_w: torch.Tensor, top_idx: torch.Tensor, gate_up: torch.Tensor,
                          down: torch.Tensor, layout: ExpertLayout, gate_up_bias: torch.Tensor | None = None,
                          down_bias: torch.Tensor | None = None, lora_gate_up: ExpertLora | None = None,
                          lora_down: ExpertLora | None = None) -> torch.Tensor:
    """Plain autograd, one expert at a time, LoRA as merged weights ``W + s B A``: the parity tests' ground truth."""
    experts = gate_up.shape[0]
    out = torch.zeros_like(x)
    for e in range(experts):
        rows, slots = torch.where(top_idx == e)
        if rows.numel() == 0:
            continue
        xe = x[rows]
        w_gu = _in_out(gate_up, layout)[e].to(x.dtype)
        w_d = _in_out(down, layout)[e].to(x.dtype)
        if lora_gate_up is not None:
            w_gu = w_gu + expert_delta(lora_gate_up, experts, x.dtype)[e]
        if lora_down is not None:
            w_d = w_d + expert_delta(lora_down, experts, x.dtype)[e]
        gu = xe @ w_gu + (gate_up_bias[e] if gate_up_bias is not None else 0)
        y = _activate(gu, layout) @ w_d + (down_bias[e] if down_bias is not None else 0)
        out = out.index_add(0, rows, y * top_w[rows, slots, None].to(x.dtype))
    return out
