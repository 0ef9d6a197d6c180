"""Grouped experts with split LoRA (kernels/moe.py) against the per-expert, merged-weight reference; 4-bit experts."""

from __future__ import annotations

import contextlib
import dataclasses

import bitsandbytes.functional as bnbf
import pytest
import torch
from kernel_testing import BF16

import fasttune.kernels.moe as moe
from fasttune.kernels.moe import ExpertLayout, ExpertLora, moe_experts, moe_experts_reference
from fasttune.quant.experts import PackedExperts

N, H, I, E, K, R = 40, 64, 48, 8, 2, 4  # tokens, hidden, expert width, experts, top-k, LoRA rank  # noqa: E741
LAYOUTS = {
    "qwen3_moe": ExpertLayout(),  # (E, out, in), gate half | up half, silu
    "gpt_oss": ExpertLayout(transposed=True, interleaved=True, activation="clamped_swiglu", limit=1.5),
}


def _case(layout: ExpertLayout, lora: str, packed: bool, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    gate_up = rand(E, H, 2 * I, scale=0.2) if layout.transposed else rand(E, 2 * I, H, scale=0.2)
    down = rand(E, I, H, scale=0.2) if layout.transposed else rand(E, H, I, scale=0.2)
    if packed:
        gate_up, down = PackedExperts.pack(gate_up), PackedExperts.pack(down)
    biases = (rand(E, 2 * I), rand(E, H)) if layout.transposed else (None, None)
    x = rand(N, H)
    logits = rand(N, E)
    top = torch.topk(logits, K).indices
    top[top == 5] = 4  # expert 5 receives no token
    adapters = {}
    if lora in ("both", "gate_up"):
        adapters["gate_up"] = (rand(E * R, H, scale=0.3), rand(2 * I, R * E, scale=0.3), 0.5)
    if lora == "both":
        adapters["down"] = (rand(E * R, I, scale=0.3), rand(H, R * E, scale=0.3), 2.0)
    return x, logits, top, gate_up, down, biases, adapters


def _run(fn, layout, case, dtype=None, forward_hooks=None):
    """Output and gradients (input, router logits, every LoRA factor) of ``fn`` on fresh leaves; ``forward_hooks``:
    saved-tensor hooks active during the forward only."""
    x, logits, top, gate_up, down, (b_gu, b_d), adapters = case
    cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)
    x = cast(x).detach().requires_grad_(True)
    logits = cast(logits).detach().requires_grad_(True)
    factors = {k: (cast(a).detach().requires_grad_(True), cast(b).detach().requires_grad_(True), s)
               for k, (a, b, s) in adapters.items()}
    loras = {k: ExpertLora(a, b, s) for k, (a, b, s) in factors.items()}
    weights = torch.softmax(logits.float(), -1).gather(1, top).to(x.dtype)
    hooks = torch.autograd.graph.saved_tensors_hooks(*forward_hooks) if forward_hooks else contextlib.nullcontext()
    with hooks:
            out = fn(x, weights, top,
                 gate_up if dtype is None or isinstance(gate_up, PackedExperts) else gate_up.to(dtype),
                 down if dtype is None or isinstance(down, PackedExperts) else down.to(dtype), layout,
                 None if b_gu is None else cast(b_gu), None if b_d is None else cast(b_d),
                 loras.get("gate_up"), loras.get("down"))
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype).to(out.device)
    leaves = [x, logits] + [t for a, b, _ in factors.values() for t in (a, b)]
    grads = torch.autograd.grad(out, leaves, cot)
    return [out, *grads]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("lora", ["none", "gate_up", "both"])
@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_grouped_experts_match_the_reference_fp32(family, lora, packed):
    layout = LAYOUTS[family]
    case = _case(layout, lora, packed)
    got, want = _run(moe_experts, layout, case), _run(moe_experts_reference, layout, case)
    names = ["output", "grad x", "grad router logits", "grad A gate_up", "grad B gate_up", "grad A down", "grad B down"]
    for name, g, w in zip(names, got, want):
        scale = float(w.abs().max())
        torch.testing.assert_close(g, w, atol=2e-6 * scale, rtol=1e-5,
                                   msg=lambda m, name=name: f"{family} {lora} {name}: {m}")
    if lora != "none":  # the expert without tokens gets exactly zero LoRA gradient
        grad_a = got[3].reshape(E, R, H)
        assert torch.count_nonzero(grad_a[5]) == 0 and torch.count_nonzero(grad_a[4]) > 0


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_grouped_experts_bf16_close_to_fp32_reference(family):
    # gpt-oss at its released clamp (7): at the fp32 tests' 1.5 many pre-activations sit at the clamp, where one bf16
    # rounding switches an element's derivative between 0 and 1 (in the bf16 reference too)
    layout = dataclasses.replace(LAYOUTS[family], limit=7.0)
    case = _case(layout, "both", packed=False)
    got = _run(moe_experts, layout, case, dtype=torch.bfloat16)
    want = _run(moe_experts_reference, layout, case)
    for g, w in zip(got, want):
        scale = float(w.abs().max())
        torch.testing.assert_close(g.float(), w, atol=BF16["atol"] * scale, rtol=BF16["rtol"])


def test_backward_keeps_nothing_of_tokens_times_topk_times_width():
    """Between forward and backward only the input, the routing and the LoRA factors are kept; the reference keeps
    (N*k, I)-sized tensors."""
    layout = LAYOUTS["qwen3_moe"]
    case = _case(layout, "both", packed=False)

    def saved_sizes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        _run(fn, layout, case, forward_hooks=(pack, lambda t: t))
        return sizes

    fast, ref = saved_sizes(moe_experts), saved_sizes(moe_experts_reference)
    big = N * K * I // E  # even one expert's share of the intermediate activations
    kept_by_kernel = [s for s in fast if s >= big and s not in (N * H, E * R * H, 2 * I * R * E, E * R * I, H * R * E)]
    assert kept_by_kernel == [], f"the grouped kernel saved tensors of {kept_by_kernel} elements"
    assert max(ref) >= big  # the reference does keep them (the test can tell)


def test_grouped_products_do_not_loop_over_experts(monkeypatch):
    """The number of matrix products per forward+backward does not grow with the number of experts."""
    calls, grouped = [], []
    real, real_grouped = moe._gmm, moe.F.grouped_mm
    monkeypatch.setattr(moe, "_gmm", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(moe.F, "grouped_mm", lambda *a, **k: (grouped.append(1), real_grouped(*a, **k))[1])
    counts = {}
    for experts in (4, 64):
        calls.clear()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(N, H, generator=gen, requires_grad=True)
        top = torch.randint(0, experts, (N, K), generator=gen)
        w = torch.rand(N, K, generator=gen, requires_grad=True)
        lora = ExpertLora(torch.randn(experts * R, H, requires_grad=True), torch.randn(2 * I, R * experts), 1.0)
        out = moe_experts(x, w, top, torch.randn(experts, 2 * I, H), torch.randn(experts, H, I), ExpertLayout(),
                          lora_gate_up=lora)
        out.sum().backward()
        counts[experts] = len(calls)
        assert len(grouped) == len(calls)  # every product a grouped one: no loop over experts inside _gmm either
        grouped.clear()
    assert moe.grouped_mm_available() and counts[4] == counts[64]


def test_packed_experts_are_bitsandbytes_nf4_and_dequantize_only_hit_experts(monkeypatch):
    dense = torch.randn(E, 2 * I, H, generator=torch.Generator().manual_seed(3))
    packed = PackedExperts.pack(dense)
    q, state = bnbf.quantize_4bit(dense.reshape(-1), blocksize=64, compress_statistics=False, quant_type="nf4")
    want = bnbf.dequantize_4bit(q, state).reshape(dense.shape)
    assert torch.equal(packed.dequantize(), want)
    assert torch.equal(packed.dequantize(torch.tensor([6, 1])), want[[6, 1]])
    assert packed.codes.numel() == dense.numel() // 2  # 4 bits per weight
    asked = []
    real = PackedExperts.dequantize
    monkeypatch.setattr(PackedExperts, "dequantize", lambda self, experts=None, dtype=None:
                        (asked.append(None if experts is None else sorted(experts.tolist())),
                         real(self, experts, dtype))[1])
    top = torch.tensor([[0, 3], [3, 6], [0, 6]])
    x = torch.randn(3, H)
    moe_experts(x, torch.rand(3, 2), top, packed, PackedExperts.pack(torch.randn(E, H, I)), ExpertLayout())
    assert asked == [[0, 3, 6], [0, 3, 6]]  # gate_up and down: the three experts that received tokens


def test_bad_input_errors():
    with pytest.raises(ValueError, match="activation: 'relu'.*supported"):
        ExpertLayout(activation="relu")
    weight = torch.randn(E, 2 * I, H, requires_grad=True)
    with pytest.raises(ValueError, match="require grad"):
        moe_experts(torch.randn(2, H), torch.rand(2, K), torch.zeros(2, K, dtype=torch.long), weight,
                    torch.randn(E, H, I), ExpertLayout())
    with pytest.raises(ValueError, match="not a multiple of 64"):
        PackedExperts.pack(torch.randn(2, 3, 5))
