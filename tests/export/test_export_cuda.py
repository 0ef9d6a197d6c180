"""Exports of a model that lives on the GPU (``pytest -m cuda``; skipped with the reason without one): a 4-bit
(bitsandbytes CUDA) LoRA model's merge is the exact dequantized weight plus the LoRA delta, and its GGUF files hold
that merge, read back; the merged 16-bit folder reloads to the same logits."""

from __future__ import annotations

import pytest
import torch
from cuda_testing import device
from gguf import GGUFReader

from fasttune import FastLanguageModel
from fasttune.export.gguf.reader import read_gguf_state
from fasttune.export.merge import merged_state_dict
from fasttune.quant import dequantize_weight

pytestmark = pytest.mark.cuda
DEV = device()


@pytest.fixture(scope="module")
def gpu_lora(tiny_model_dir):
    """The notebook's model on the GPU: 4-bit base, LoRA with random (non-zero) B factors."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), max_seq_length=64,
                                                         load_in_4bit=True, dtype=None, device_map={"": str(DEV)})
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen).to(param.dtype))
    return model, tokenizer


def test_merge_of_a_gpu_4bit_model_is_dequantized_weight_plus_delta(gpu_lora):
    model, _ = gpu_lora
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.device.type == DEV.type and model.is_loaded_in_4bit
    state = merged_state_dict(model, dtype=torch.float32)
    a, b = q_proj.lora_A["default"].weight.float(), q_proj.lora_B["default"].weight.float()
    want = dequantize_weight(q_proj.base_layer, torch.float32) + q_proj.scaling["default"] * (b @ a)
    got = state["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(got.to(want.device), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["f16", "q8_0"])
def test_gguf_of_a_gpu_model_holds_its_merge(gpu_lora, tmp_path, method):
    model, tokenizer = gpu_lora
    state = merged_state_dict(model, dtype=torch.float32)
    (path,) = model.save_pretrained_gguf(str(tmp_path / method), tokenizer, quantization_method=method)
    assert path.is_file() and len(GGUFReader(path).tensors) > 0
    back = read_gguf_state(path, model.config)
    # f16: half precision rounding; q8_0: 8-bit blocks of 32 (error <= half a step of the block's absmax / 127)
    rel = 1e-3 if method == "f16" else 1.0 / 127
    for name, tensor in state.items():
        tensor = tensor.cpu()
        err = (back[name] - tensor).abs().max().item()
        assert err <= rel * max(1.0, tensor.abs().max().item()), f"{method} {name}: off by {err}"


def test_merged_16bit_folder_reloads_to_the_same_logits(gpu_lora, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = gpu_lora
    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).to(DEV)
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(1)).to(DEV)
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = reloaded(input_ids=ids).logits.float()
    # the 4-bit model computes in bf16; the reloaded merge holds its weights rounded to 16 bits
    torch.testing.assert_close(got, want, atol=0.1 * float(want.abs().max()), rtol=0.1)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
