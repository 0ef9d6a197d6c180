"""Fused LoRA blocks against peft's own forward: outputs, input gradients, A/B gradients; dense and 4-bit bases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fast_helpers import assert_close, load_peft
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from fasttune.kernels.lora_linear import lora_linear, lora_projections
from fasttune.kernels.lora_mlp import lora_mlp
from fasttune.kernels.lora_parts import LoraParts, lora_parts

# fp32: the same maths in another order. bf16 (factors in bf16 too): 8 mantissa bits, errors relative to the
# tensor's largest value.
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5, scaled=True), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2, scaled=True)}


class Block(nn.Module):
    """Three projections sharing an input and a gated MLP, odd sizes on purpose."""

    def __init__(self, hidden: int, inter: int, bias: bool) -> None:
        super().__init__()
        self.q = nn.Linear(hidden, 96, bias=bias)
        self.k = nn.Linear(hidden, 32, bias=bias)
        self.v = nn.Linear(hidden, 32, bias=bias)
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)

    def mlp(self, x: torch.Tensor, act) -> torch.Tensor:
        return self.down(act(self.gate(x)) * self.up(x))


def make_block(dtype: torch.dtype, bias: bool = True, hidden: int = 123, inter: int = 77, **lora) -> Block:
    torch.manual_seed(0)
    block = Block(hidden, inter, bias)
    config = LoraConfig(r=5, lora_alpha=13, target_modules=["q", "k", "v", "gate", "up", "down", "gate_up"],
                        lora_dropout=lora.pop("lora_dropout", 0.0), init_lora_weights=False, **lora)
    block = inject_adapter_in_model(config, block)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name)
    return block.to(dtype) if dtype != torch.float32 else block


def grads_of(params) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def lora_params(*layers) -> list[torch.Tensor]:
    return [w for layer in layers for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_matches_peft(dtype, bias):
    check_fused_qkv(dtype, bias, "cpu")


def check_fused_qkv(dtype: torch.dtype, bias: bool, device: str) -> None:
    """Fused Q/K/V on ``device`` against peft's three layers: outputs, dx, factor gradients (test_lora_blocks_cuda
    runs it on a GPU)."""
    block = make_block(dtype, bias).to(device)
    layers = (block.q, block.k, block.v)
    x = torch.randn(5, 7, 123, dtype=dtype).to(device).requires_grad_(True)
    weights = [torch.randn(5, 7, out, dtype=dtype).to(device) for out in (96, 32, 32)]
    ref = [layer(x) for layer in layers]
    sum((r * w).sum() for r, w in zip(ref, weights)).backward()
    ref_dx, ref_g = x.grad.clone(), grads_of(lora_params(*layers))
    x.grad = None
    parts = tuple(lora_parts(layer) for layer in layers)
    assert all(isinstance(p, LoraParts) and p.lora_A is not None for p in parts)
    outs = lora_projections(x, parts)
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    for name, got, want in zip("qkv", outs, ref):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device == x.device
        assert_close(got, want, **TOL[dtype], what=f"{name} output")
    assert_close(x.grad, ref_dx, **TOL[dtype], what="dx")
    for i, (got, want) in enumerate(zip(grads_of(lora_params(*layers)), ref_g)):
        assert_close(got, want, **TOL[dtype], what=f"factor grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fused_mlp_matches_peft(dtype, activation):
    check_fused_mlp(dtype, activation, "cpu")


def check_fused_mlp(dtype: torch.dtype, activation: str, device: str) -> None:
    """The fused gated MLP on ``device`` against peft's gate/up/down (test_lora_blocks_cuda runs it on a GPU)."""
    block = make_block(dtype).to(device)
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    x = torch.randn(3, 11, 123, dtype=dtype).to(device).requires_grad_(True)
    w = torch.randn(3, 11, 123, dtype=dtype).to(device)
    ref = block.mlp(x, act)
    (ref * w).sum().backward()
    layers = (block.gate, block.up, block.down)
    ref_dx, ref_g = x.grad.clone(), grads_of(lora_params(*layers))
    x.grad = None
    out = lora_mlp(x, *(lora_parts(layer) for layer in layers), activation)
    assert out.grad_fn is not None and "LoRAMLP" in type(out.grad_fn).__name__
    (out * w).sum().backward()
    assert_close(out, ref, **TOL[dtype], what="mlp output")
    assert_close(x.grad, ref_dx, **TOL[dtype], what="mlp dx")
    for i, (got, want) in enumerate(zip(grads_of(lora_params(*layers)), ref_g)):
        assert_close(got, want, **TOL[dtype], what=f"mlp factor grad {i}")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32-adapters", "bf16-autocast"])
def test_fused_blocks_match_peft_with_fp32_adapters_on_a_bf16_base(autocast):
    """peft's default for a bf16 model: fp32 adapters. Without autocast the LoRA branch runs in fp32; under the
    Trainer's bf16 autocast every product (forward and backward) runs in bf16. The fused blocks follow both."""
    import contextlib

    block = make_block(torch.bfloat16)
    for name, p in block.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    qkv, mlp = (block.q, block.k, block.v), (block.gate, block.up, block.down)
    x = torch.randn(4, 9, 123, dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(4, 9, n, dtype=torch.bfloat16) for n in (96, 32, 32, 123)]

    def loss(outs):
        return sum((o.float() * w.float()).sum() for o, w in zip(outs, weights))

    with ctx():
        ref = [layer(x) for layer in qkv] + [block.mlp(x, F.silu)]
        loss(ref).backward()
    ref_dx, ref_g = x.grad.clone(), grads_of(lora_params(*qkv, *mlp))
    x.grad = None
    with ctx():
        outs = [*lora_projections(x, tuple(lora_parts(layer) for layer in qkv)),
                lora_mlp(x, *(lora_parts(layer) for layer in mlp), "silu")]
        loss(outs).backward()
    for name, got, want in zip(["q", "k", "v", "mlp"], outs, ref):
        assert got.dtype == want.dtype == torch.bfloat16
        assert_close(got, want, **TOL[torch.bfloat16], what=f"{name} output")
    assert_close(x.grad, ref_dx, **TOL[torch.bfloat16], what="dx")
    for i, (got, want) in enumerate(zip(grads_of(lora_params(*qkv, *mlp)), ref_g)):
        assert got.dtype == torch.float32
        assert_close(got, want, **TOL[torch.bfloat16], what=f"factor grad {i}")


def test_fused_gate_up_halves_match_phi3_style_mlp():
    """phi3: one gate_up projection, gate = first half of its rows; A is shared by both halves."""
    block = make_block(torch.float32)
    x = torch.randn(2, 9, 123, requires_grad=True)
    gate_ref, up_ref = block.gate_up(x).chunk(2, dim=-1)
    ref = block.down(F.silu(gate_ref) * up_ref)
    ref.square().sum().backward()
    ref_dx, ref_g = x.grad.clone(), grads_of(lora_params(block.gate_up, block.down))
    x.grad = None
    gu = lora_parts(block.gate_up)
    out = lora_mlp(x, gu.sliced(slice(0, 77)), gu.sliced(slice(77, 154)), lora_parts(block.down), "silu")
    out.square().sum().backward()
    assert_close(out, ref, **TOL[torch.float32], what="output")
    assert_close(x.grad, ref_dx, **TOL[torch.float32], what="dx")
    for i, (got, want) in enumerate(zip(grads_of(lora_params(block.gate_up, block.down)), ref_g)):
        assert_close(got, want, **TOL[torch.float32], what=f"factor grad {i}")


def test_fallback_reasons():
    assert "lora_dropout" in lora_parts(make_block(torch.float32, lora_dropout=0.1).q)
    assert "variant" in lora_parts(make_block(torch.float32, use_dora=True).q)
    block = make_block(torch.float32)
    block.q.merge()
    assert "merged" in lora_parts(block.q)
    block.k.enable_adapters(False)
    disabled = lora_parts(block.k)
    assert isinstance(disabled, LoraParts) and disabled.lora_A is None  # base only, like peft
    trainable = nn.Linear(4, 4)
    assert "trainable" in lora_parts(trainable)


def _saved_sizes(fn) -> list[int]:
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_4bit_fused_blocks_match_peft_and_keep_no_dense_weight(tiny_model_dir):
    model = load_peft(tiny_model_dir("llama"), dtype=torch.bfloat16, four_bit=True)
    mlp = model.base_model.model.model.layers[0].mlp
    attn = model.base_model.model.model.layers[0].self_attn
    assert type(mlp.gate_proj.base_layer).__name__ == "FastLinear4bit"
    x = torch.randn(2, 13, 256, dtype=torch.bfloat16, requires_grad=True)
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    ref = mlp(x)
    ref.float().square().sum().backward()
    ref_dx, ref_g = x.grad.clone(), grads_of(lora_params(*layers))
    x.grad = None
    parts = [lora_parts(layer) for layer in layers]
    sizes = _saved_sizes(lambda: lora_mlp(x, *parts, "silu"))
    assert max(sizes) < 256 * 688, f"a saved tensor of {max(sizes)} elements looks like a dense weight"
    out = lora_mlp(x, *parts, "silu")
    out.float().square().sum().backward()
    assert_close(out, ref, **TOL[torch.bfloat16], what="4-bit mlp output")
    assert_close(x.grad, ref_dx, **TOL[torch.bfloat16], what="4-bit mlp dx")
    for i, (got, want) in enumerate(zip(grads_of(lora_params(*layers)), ref_g)):
        assert_close(got, want, **TOL[torch.bfloat16], what=f"4-bit factor grad {i}")
    o_parts = lora_parts(attn.o_proj)
    o_sizes = _saved_sizes(lambda: lora_linear(x, o_parts))
    assert max(o_sizes) < 256 * 256
    assert_close(lora_linear(x, o_parts), attn.o_proj(x), **TOL[torch.bfloat16], what="4-bit o_proj")


def test_rslora_scale_on_fused_and_peft_paths(tiny_model_dir):
    """use_rslora=True scales the LoRA branch by alpha / sqrt(r), not alpha / r, on both paths.

    r=16, alpha=8: rsLoRA gives 2.0, plain LoRA 0.5, so either mistake moves the output by the whole branch.
    """
    from fasttune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=8, use_rslora=True,
                                             use_gradient_checkpointing=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.nn.init.normal_(lora_b, std=0.05)  # B starts at zero: make the branch count
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        by_hand = base + (8 / 16**0.5) * (x @ lora_a.T) @ lora_b.T
        peft_out = type(layer).forward(layer, x)  # peft's class forward, under fasttune's instance patch
        assert "forward" in layer.__dict__ and isinstance(lora_parts(layer), LoraParts), "the fused path is not on"
        fused_out = layer(x)
    assert_close(peft_out, by_hand, **TOL[torch.float32], what="peft rsLoRA output")
    assert_close(fused_out, by_hand, **TOL[torch.float32], what="fused rsLoRA output")
