"""QLoRA is correct on CPU: 4-bit (and 8-bit) layers match a plain layer holding the dequantized weight, in output and
LoRA gradients, before and after an eval/no-grad pass, for dimensions that are not multiples of 32."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from fasttune import FastLanguageModel
from fasttune.patch import is_patched, patch_model, unpatch_model
from fasttune.quant import FastLinear4bit, dequantize_weight, is_quantized_linear, restore_layers


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), _lora_grads(model)


def _dense_twin(quant_model) -> nn.Module:
    """The same peft model without fasttune's fast path, each quantized base layer replaced by an nn.Linear holding
    its dequantized weight: the plain-peft reference."""
    unpatch_model(quant_model)  # the patched forwards close over the original modules: copy the plain model
    twin = copy.deepcopy(quant_model)
    patch_model(quant_model)
    for module in list(twin.modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and is_quantized_linear(base):
            weight = dequantize_weight(base, torch.float32)
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            dense.weight = nn.Parameter(weight.clone(), requires_grad=False)
            if base.bias is not None:
                dense.bias = nn.Parameter(base.bias.detach().float().clone(), requires_grad=False)
            module.base_layer = dense
    return twin.float()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_layer_matches_dense_twin_before_and_after_eval(tiny_model_dir, bits):
    path = str(tiny_model_dir("llama"))  # intermediate 688: not a multiple of 32
    model, _ = FastLanguageModel.from_pretrained(
        path, dtype=torch.float32, load_in_4bit=bits == 4, load_in_8bit=bits == 8
    )
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, init_lora_weights="gaussian",
                                             use_gradient_checkpointing=False)
    # non-zero B so LoRA gradients flow to A as well
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    assert is_patched(model)  # the fused LoRA path over the quantized base is what is compared
    twin = _dense_twin(model)
    assert not is_patched(twin)
    ids = torch.randint(5, 500, (2, 11), generator=torch.Generator().manual_seed(0))

    loss_q, grads_q = _step(model, ids)
    loss_d, grads_d = _step(twin, ids)
    assert len(grads_q) == len(grads_d) > 0
    torch.testing.assert_close(loss_q, loss_d, rtol=1e-5, atol=1e-5)
    for name in grads_d:
        torch.testing.assert_close(grads_q[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)

    # the trap: an eval/no-grad pass (generate) must not change what training computes afterwards
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        model.generate(input_ids=ids[:1, :4], max_new_tokens=4, do_sample=False)
        model(input_ids=ids)
    FastLanguageModel.for_training(model)
    loss_after, grads_after = _step(model, ids)
    torch.testing.assert_close(loss_after, loss_d, rtol=1e-5, atol=1e-5)
    for name in grads_d:
        torch.testing.assert_close(grads_after[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


def test_4bit_layer_odd_shapes_output_and_input_grad():
    torch.manual_seed(0)
    for out_f, in_f in [(688, 256), (123, 123), (5, 96), (256, 688)]:
        dense = nn.Linear(in_f, out_f, bias=True)
        q = bnb.nn.Linear4bit(in_f, out_f, bias=True, quant_type="nf4", compute_dtype=torch.float32)
        q.load_state_dict(dense.state_dict())
        q = q.to("cpu")  # quantizes
        assert q.weight.bnb_quantized
        q.__class__ = FastLinear4bit
        w = dequantize_weight(q, torch.float32)
        assert w.shape == (out_f, in_f)
        assert (w - dense.weight).abs().max() < 0.5 * dense.weight.abs().max()  # NF4 is a 4-bit approximation
        x = torch.randn(3, 7, in_f, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        q.eval()
        with torch.no_grad():
            q(x)  # an eval pass first: must not alter later results
        y = q(x)
        y_ref = torch.nn.functional.linear(x_ref, w, q.bias.float())
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_restore_layers_gives_back_bitsandbytes_classes(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=True)
    assert any(type(m) is FastLinear4bit for m in model.modules())
    n = restore_layers(model)
    assert n == 28  # 4 layers x 7 projections
    assert all(type(m) is not FastLinear4bit for m in model.modules())
    assert sum(type(m) is bnb.nn.Linear4bit for m in model.modules()) == 28


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_reads_bitsandbytes_cpu_repacked_layer(double_quant):
    """A 4-bit layer that bitsandbytes repacked for its AVX512 CPU kernel (which only happens on such CPUs, so the
    repack is applied by hand here) dequantizes to the weight it held before, within the bf16 rounding of its scales.

    Tolerance: the repack stores each block's absmax ``a`` in bf16, so ``|bf16(a) - a| <= 2^-8 a``; every NF4 code is
    in [-1, 1], so each weight moves by at most ``2^-8 a`` (plus fp32 rounding of the product). ``a`` is the block's
    largest |weight| before the repack (that element has code +-1). A 4-bit code read from the wrong place moves a
    weight by at least one NF4 step (>= 0.079 a), far outside that bound.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(96, 256, generator=gen) * 0.05
    dense[3, :64] *= 40  # one block with a much larger scale than the rest
    layer = bnb.nn.Linear4bit(256, 96, bias=False, compute_dtype=torch.float32, compress_statistics=double_quant,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, compress_statistics=double_quant, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    before = dequantize_weight(layer).clone()
    block = layer.weight.quant_state.blocksize
    absmax = before.reshape(-1, block).abs().amax(dim=1, keepdim=True)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    after = dequantize_weight(layer, torch.float32)
    diff = (after - before).reshape(-1, block).abs()
    bound = absmax * (2**-8 + 2**-22)
    worst = int((diff / absmax).argmax())
    assert bool((diff <= bound).all()), (
        f"repacked layer: |diff| {diff.flatten()[worst]:.3e} at flat index {worst} exceeds 2^-8 x block absmax "
        f"{absmax.flatten()[worst // block]:.3e}")
    x = torch.randn(5, 256, generator=gen)
    layer.__class__ = FastLinear4bit
    torch.testing.assert_close(layer(x), x @ after.T, rtol=1e-5, atol=1e-5)
