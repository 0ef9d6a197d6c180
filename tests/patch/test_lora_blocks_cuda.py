"""The fused LoRA blocks on a GPU against peft's own forward (``pytest -m cuda``; skipped with the reason without one):
dense bases in fp32 and bf16, and 4-bit bases through bitsandbytes' CUDA kernels (NF4 dequantized on the GPU)."""

from __future__ import annotations

import pytest
import torch
from cuda_testing import device
from fast_helpers import assert_close, lora_config
from peft import get_peft_model
from test_lora_blocks import TOL, check_fused_mlp, check_fused_qkv, grads_of, lora_params
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fasttune.kernels.lora_linear import lora_linear
from fasttune.kernels.lora_mlp import lora_mlp
from fasttune.kernels.lora_parts import lora_parts
from fasttune.quant import dequantize_weight, patch_quantized_layers

pytestmark = pytest.mark.cuda
DEV = device()


def _rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_on_gpu_matches_peft(dtype):
    check_fused_qkv(dtype, True, DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fused_mlp_on_gpu_matches_peft(dtype, activation):
    check_fused_mlp(dtype, activation, DEV)


def _four_bit_peft(path):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": str(DEV)})
    patch_quantized_layers(model)
    torch.manual_seed(0)
    return get_peft_model(model, lora_config())


def test_4bit_fused_blocks_on_gpu_match_peft(tiny_model_dir):
    import bitsandbytes.functional as bnbf

    model = _four_bit_peft(tiny_model_dir("llama"))
    mlp = model.base_model.model.model.layers[0].mlp
    base = mlp.gate_proj.base_layer
    assert type(base).__name__ == "FastLinear4bit" and base.weight.device.type == DEV.type
    # fasttune's dequantization is bitsandbytes' own, on the GPU
    want = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(dequantize_weight(base, torch.bfloat16), want)
    x = _rand(2, 13, 256, dtype=torch.bfloat16).requires_grad_(True)
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    ref = mlp(x)
    ref.float().square().sum().backward()
    ref_dx, ref_g = x.grad.clone(), grads_of(lora_params(*layers))
    x.grad = None
    out = lora_mlp(x, *(lora_parts(layer) for layer in layers), "silu")
    out.float().square().sum().backward()
    assert_close(out, ref, **TOL[torch.bfloat16], what="4-bit mlp output")
    assert_close(x.grad, ref_dx, **TOL[torch.bfloat16], what="4-bit mlp dx")
    for i, (got, want) in enumerate(zip(grads_of(lora_params(*layers)), ref_g)):
        assert_close(got, want, **TOL[torch.bfloat16], what=f"4-bit factor grad {i}")
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    assert_close(lora_linear(x, lora_parts(o_proj)), o_proj(x), **TOL[torch.bfloat16], what="4-bit o_proj")
