"""Merged exports reload with plain transformers and match the LoRA model; failures never clobber a good folder."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from export_helpers import lora_model, sample_ids
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.export import save_pretrained_merged
from fasttune.export.merge import NonFiniteWeightError, merged_state_dict
from fasttune.quant import dequantize_weight


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_merged_fp32_reload_matches_lora(tiny_model_dir, tiny_tokenizer, tmp_path, family):
    model = lora_model(tiny_model_dir(family), family)
    ids = sample_ids(model.config.vocab_size)
    want = _logits(model, ids)
    out = save_pretrained_merged(model, tmp_path / "merged", tiny_tokenizer(family))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = _logits(reloaded, ids)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)), ids)
    assert (want - base_logits).abs().max() > 1e-2, "the adapters must change the output for this test to mean much"
    diff = (got - want).abs().max().item()
    assert diff < 2e-4, f"{family}: merged fp32 logits differ from the LoRA model by {diff:.2e}"
    assert not any(k.startswith("base_model") or "lora" in k for k in reloaded.state_dict())


def test_merged_bf16_within_bf16_rounding(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir("qwen2"), "qwen2", dtype=torch.bfloat16)
    ids = sample_ids(model.config.vocab_size)
    want = _logits(model, ids)
    out = save_pretrained_merged(model, tmp_path / "m16", None)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    got = _logits(reloaded, ids)
    # Exact reference: the merge done in float32, rounded to bf16 once. The reload must hold those very weights.
    state = merged_state_dict(model, dtype=torch.float32)
    for name, tensor in reloaded.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff < 0.05 * scale, f"bf16 merged logits differ by {diff:.3f} (logit scale {scale:.3f})"


def test_4bit_base_is_dequantized_exactly(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir("llama"), "llama", four_bit=True)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    state = merged_state_dict(model, dtype=torch.float32)
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expected = dequantize_weight(layer.base_layer).float() + (b @ a) * layer.scaling["default"]
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], expected)
    out = save_pretrained_merged(model, tmp_path / "from4bit", None, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = sample_ids(model.config.vocab_size)
    want, got = _logits(model, ids), _logits(reloaded, ids)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 0.05 * scale  # the 4-bit model computes in bf16


def test_nan_is_caught_before_anything_is_written(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir("llama"), "llama")
    target = tmp_path / "good"
    save_pretrained_merged(model, target, None)
    before = {p.name: p.stat().st_size for p in target.iterdir()}
    with torch.no_grad():
        model.base_model.model.model.layers[2].mlp.down_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="layers.2.mlp.down_proj.weight has .* NaN"):
        save_pretrained_merged(model, target, None)
    assert {p.name: p.stat().st_size for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["good"], "no scratch folder may be left behind"


def test_sharded_save_with_tokenizer_and_chat_template(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = lora_model(tiny_model_dir("llama"), "llama")
    tok = tiny_tokenizer("llama")
    tok.chat_template = "{% for m in messages %}<|start_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"
    out = save_pretrained_merged(model, tmp_path / "sharded", tok, max_shard_size="1MB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert (out / "generation_config.json").exists()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok.chat_template == tok.chat_template
    ids = sample_ids(model.config.vocab_size)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (_logits(reloaded, ids) - _logits(model, ids)).abs().max() < 2e-4


def test_lora_method_saves_adapters_only(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir("llama"), "llama")
    out = save_pretrained_merged(model, tmp_path / "adapters", None, save_method="lora")
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    again = PeftModel.from_pretrained(base, out).eval()
    ids = sample_ids(model.config.vocab_size)
    assert (_logits(again, ids) - _logits(model, ids)).abs().max() < 1e-5


def test_bad_arguments_are_explicit(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir("llama"), "llama")
    with pytest.raises(ValueError, match="save_method: 'merged_8bit' is not supported"):
        save_pretrained_merged(model, tmp_path / "x", None, save_method="merged_8bit")
    with pytest.raises(ValueError, match="merged_4bit_forced"):
        save_pretrained_merged(model, tmp_path / "x", None, save_method="merged_4bit")
    with pytest.raises(TypeError, match="unexpected keyword"):
        save_pretrained_merged(model, tmp_path / "x", None, safe_serialisation=False)
    assert not (tmp_path / "x").exists()


def test_merged_4bit_forced_reloads_as_4bit(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir("llama"), "llama")
    out = save_pretrained_merged(model, tmp_path / "q4", None, save_method="merged_4bit_forced")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    merged = merged_state_dict(model, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).state_dict()
    for i, layer in enumerate(reloaded.model.layers):
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{proj}.weight"
            deq = dequantize_weight(layer.get_submodule(proj)).float()
            err_merged = (deq - merged[name]).norm() / merged[name].norm()
            err_base = (deq - base[name]).norm() / merged[name].norm()
            packed, state = bnbf.quantize_4bit(merged[name].to(torch.bfloat16), quant_type="nf4",
                                               compress_statistics=True)
            assert torch.equal(deq, bnbf.dequantize_4bit(packed, state).float()), f"{name}: not NF4 of the merge"
            assert err_merged < err_base, f"{name}: the reloaded 4-bit weight does not hold the LoRA delta"


def test_modules_to_save_copy_is_exported(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])).eval()
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # the trained copy
    state = merged_state_dict(model, dtype=torch.float32)
    trained = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(state["lm_head.weight"], trained)
    out = save_pretrained_merged(model, tmp_path / "mts", None)
    ids = sample_ids(model.config.vocab_size)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (_logits(reloaded, ids) - _logits(model, ids)).abs().max() < 2e-4


def test_dora_is_refused_with_a_way_out(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="save_method='lora'"):
        save_pretrained_merged(model, tmp_path / "dora", None)
    assert not (tmp_path / "dora").exists()
