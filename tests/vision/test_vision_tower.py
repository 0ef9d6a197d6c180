"""The vision tower's fast path (patch/vision_tower.py) against transformers' + peft's own tower: outputs, input and
adapter gradients, with LoRA on every tower linear and two images of different sizes packed as the tower gets them."""

from __future__ import annotations

import pytest
import torch
from vision_helpers import circle

from fasttune import FastVisionModel
from fasttune.kernels import lora_linear as lora_linear_module
from fasttune.kernels import segment_attention as segment_module
from fasttune.lora.unwrap import base_model
from fasttune.patch import patch_model, unpatch_model
from fasttune.patch.vision_tower import tower_linears, tower_prefixes

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def _adapted(tiny_vlm_dir, family: str):
    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir(family)), load_in_4bit=False,
                                                       dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, finetune_vision_layers=True,
                                           finetune_language_layers=False)
    model.train()  # the tower's blocks are checkpointed in training: forward, then recompute in backward
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the low-rank term and the A gradients count
            torch.nn.init.normal_(param, std=0.05)
    images = [circle("red", 56), circle("blue", 112)]  # 16 and 64 patches: two segments of cu_seqlens
    pixels = processor.image_processor(images=images, return_tensors="pt")
    return model, pixels["pixel_values"], pixels["image_grid_thw"]


def _run(model, pixel_values, grid_thw, grad_seed: int = 1):
    """The tower's output, then the gradients of ``<output, g>`` w.r.t. the pixels and every LoRA factor."""
    visual = base_model(model).model.visual
    model.zero_grad(set_to_none=True)
    pixels = pixel_values.clone().requires_grad_(True)
    out = visual(pixels, grid_thw=grid_thw).pooler_output
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), pixels.grad, grads


def _close(name: str, fast: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    diff = (fast - ref).abs()
    assert torch.allclose(fast, ref, rtol=rtol, atol=atol), (
        f"{name}: max abs diff {diff.max():.3e} at {divmod(int(diff.argmax()), ref.shape[-1])}, ref scale "
        f"{ref.abs().max():.3e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_tower_equals_transformers_and_peft(tiny_vlm_dir, family, monkeypatch):
    model, pixel_values, grid_thw = _adapted(tiny_vlm_dir, family)
    layers = tower_linears(base_model(model))
    assert len(layers) >= 8 and all(hasattr(layer, "lora_A") for _, layer in layers), [n for n, _ in layers]
    calls = []
    real = lora_linear_module.LoRAProjections.apply
    monkeypatch.setattr(lora_linear_module.LoRAProjections, "apply", lambda *a: calls.append(1) or real(*a))
    kept = []
    real_attention = segment_module.SegmentAttention.apply
    monkeypatch.setattr(segment_module.SegmentAttention, "apply",
                        lambda *a: kept.append(a[5] is not None) or real_attention(*a))  # a[5]: kept
    fast = _run(model, pixel_values, grid_thw)
    blocks = len(base_model(model).model.visual.blocks)
    assert kept == [True] * blocks  # each block's recompute took its first forward's attention, none recomputed it
    in_blocks = sum(".blocks." in name for name, _ in layers)  # checkpointed: forward, then recompute in backward
    assert len(calls) == 2 * in_blocks + (len(layers) - in_blocks)  # every tower linear went through the fused function
    calls.clear()
    unpatch_model(model)
    assert all("forward" not in layer.__dict__ for _, layer in layers)  # peft's own forward is back
    kept.clear()
    reference = _run(model, pixel_values, grid_thw)
    assert not calls and not kept
    _close("tower output", fast[0], reference[0])
    _close("pixel gradient", fast[1], reference[1])
    assert fast[2].keys() == reference[2].keys() and len(fast[2]) == 2 * len(layers)
    for name in reference[2]:
        assert reference[2][name].abs().max() > 0, name
        _close(name, fast[2][name], reference[2][name])


def test_text_model_has_no_tower():
    config = type("Config", (), {"model_type": "llama"})()
    assert tower_prefixes(type("Model", (), {"config": config})()) == ()


def test_repatch_after_peft_keeps_the_tower_fused(tiny_vlm_dir):
    model, pixel_values, grid_thw = _adapted(tiny_vlm_dir, "qwen2_vl")
    patch_model(model)  # patching again (as get_peft_model and for_training do) replaces, never stacks
    layers = tower_linears(base_model(model))
    assert all(getattr(layer.__dict__.get("forward"), "_fasttune_projection", False) for _, layer in layers)
    unpatch_model(model)
    assert all("forward" not in layer.__dict__ for _, layer in layers)


def test_a_training_step_through_the_model_uses_the_tower_path(tiny_vlm_dir, monkeypatch):
    """The model's own forward passes more keyword arguments down to the tower than the tower alone gets: the fast
    attention must still run there (no fallback), and loss and every LoRA gradient equal the unpatched model's."""
    from vision_helpers import conversation

    from fasttune.vision import UnslothVisionDataCollator

    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir("qwen2_vl")), load_in_4bit=False,
                                                       dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    model.train()
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    rows = [conversation(circle("red", 56), answer="red"), conversation(circle("blue", 112), answer="blue")]
    batch = UnslothVisionDataCollator(model, processor, padding_free=False)(rows)
    kept = []
    real_attention = segment_module.SegmentAttention.apply
    monkeypatch.setattr(segment_module.SegmentAttention, "apply",
                        lambda *a: kept.append(a[5] is not None) or real_attention(*a))  # a[5]: kept

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = step()
    assert kept == [True] * len(base_model(model).model.visual.blocks)
    unpatch_model(model)
    reference = step()
    _close("loss", fast[0][None], reference[0][None])
    assert fast[1].keys() == reference[1].keys()
    assert any(".visual." in n for n in reference[1]) and any("language_model" in n for n in reference[1])
    for name in reference[1]:
        _close(name, fast[1][name], reference[1][name])
