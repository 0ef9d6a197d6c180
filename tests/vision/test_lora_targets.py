"""``FastVisionModel.get_peft_model``'s four ``finetune_*`` switches adapt exactly the layers they name."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from fasttune import FastVisionModel
from fasttune.vision.towers import classify, compact_regex

QWEN_LANGUAGE_ATTN = [f"model.language_model.layers.{i}.self_attn.{p}" for i in range(2)
                      for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
QWEN_LANGUAGE_MLP = [f"model.language_model.layers.{i}.mlp.{p}" for i in range(2)
                     for p in ("gate_proj", "up_proj", "down_proj")]
QWEN_VISION_ATTN = [f"model.visual.blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")]
QWEN_VISION_MLP = [f"model.visual.blocks.{i}.mlp.{p}" for i in range(2) for p in ("fc1", "fc2")] + [
    "model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]

GEMMA_VISION_ATTN = [f"model.vision_tower.encoder.layers.{i}.self_attn.{p}" for i in range(2)
                     for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
GEMMA_VISION_MLP = [f"model.vision_tower.encoder.layers.{i}.mlp.{p}" for i in range(2) for p in ("fc1", "fc2")]


def _adapted(peft_model) -> set[str]:
    prefix = "base_model.model."
    return {n[len(prefix):-len(".lora_A")] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}


def _load(tiny_vlm_dir, family):
    model, _ = FastVisionModel.from_pretrained(str(tiny_vlm_dir(family)), load_in_4bit=False, dtype=torch.float32)
    return model


@pytest.mark.parametrize(("vision", "language", "attention", "mlp"),
                         [c for c in itertools.product([True, False], repeat=4) if (c[0] or c[1]) and (c[2] or c[3])])
def test_qwen2_vl_switch_combinations(tiny_vlm_dir, vision, language, attention, mlp):
    model = FastVisionModel.get_peft_model(
        _load(tiny_vlm_dir, "qwen2_vl"), r=4, finetune_vision_layers=vision, finetune_language_layers=language,
        finetune_attention_modules=attention, finetune_mlp_modules=mlp)
    expected = set()
    if language and attention:
        expected |= set(QWEN_LANGUAGE_ATTN)
    if language and mlp:
        expected |= set(QWEN_LANGUAGE_MLP)
    if vision and attention:
        expected |= set(QWEN_VISION_ATTN)
    if vision and mlp:
        expected |= set(QWEN_VISION_MLP)
    assert _adapted(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_gemma3_vision_only_attention_and_mlp(tiny_vlm_dir):
    model = FastVisionModel.get_peft_model(_load(tiny_vlm_dir, "gemma3"), r=4, finetune_language_layers=False)
    assert _adapted(model) == set(GEMMA_VISION_ATTN) | set(GEMMA_VISION_MLP)


def test_mllama_cross_attention_and_the_single_linear_projector(tiny_vlm_dir):
    adapted = _adapted(FastVisionModel.get_peft_model(_load(tiny_vlm_dir, "mllama"), r=4))
    assert "model.multi_modal_projector" in adapted
    assert "model.language_model.layers.1.cross_attn.q_proj" in adapted
    assert "model.vision_model.global_transformer.layers.0.mlp.fc1" in adapted
    assert not any("lm_head" in n or "embed" in n for n in adapted)


def test_target_modules_list_or_regex_overrides_the_switches(tiny_vlm_dir):
    model = FastVisionModel.get_peft_model(_load(tiny_vlm_dir, "qwen2_vl"), r=4, target_modules=["q_proj", "v_proj"],
                                           finetune_vision_layers=True)
    assert _adapted(model) == {n for n in QWEN_LANGUAGE_ATTN if n.endswith(("q_proj", "v_proj"))}
    model = FastVisionModel.get_peft_model(_load(tiny_vlm_dir, "qwen2_vl"), r=4,
                                           target_modules=r".*visual\.blocks\.\d+\.attn\.qkv")
    assert _adapted(model) == {n for n in QWEN_VISION_ATTN if n.endswith("qkv")}


def test_switches_that_select_nothing_are_errors(tiny_vlm_dir):
    model = _load(tiny_vlm_dir, "qwen2_vl")
    with pytest.raises(ValueError, match="finetune_vision_layers=False and finetune_language_layers=False"):
        FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=False)
    with pytest.raises(ValueError, match="finetune_attention_modules=False and finetune_mlp_modules=False"):
        FastVisionModel.get_peft_model(model, finetune_attention_modules=False, finetune_mlp_modules=False)
    with pytest.raises(TypeError, match="finetune_mlp_modules: 'yes' must be True or False"):
        FastVisionModel.get_peft_model(model, finetune_mlp_modules="yes")


def test_classify_and_compact_regex():
    assert classify("model.visual.blocks.3.attn.qkv") == ("vision", "attention")
    assert classify("model.visual.merger.mlp.0") == ("vision", "mlp")
    assert classify("model.multi_modal_projector.linear_1") == ("vision", "mlp")
    assert classify("model.language_model.layers.0.self_attn.q_proj") == ("language", "attention")
    assert classify("model.language_model.layers.0.mlp.down_proj") == ("language", "mlp")
    assert classify("lm_head") == (None, None)
    names = ["a.layers.0.q", "a.layers.1.q", "a.layers.0.k"]
    regex = compact_regex(names)
    assert [n for n in [*names, "a.layers.1.k", "a.layers.10.q", "b.layers.0.q"] if re.fullmatch(regex, n)] == [
        "a.layers.0.q", "a.layers.1.q", "a.layers.0.k", "a.layers.1.k", "a.layers.10.q"]
