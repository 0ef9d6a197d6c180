"""enable_checkpointing: same loss and gradients as no checkpointing, far less saved state, reversible."""

from __future__ import annotations

import pytest
import torch
from fast_helpers import assert_close, load_peft

from fasttune.patch import enable_checkpointing, patch_model
from fasttune.train import PaddingFreeCollator


def _saved_elements(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), total


def _run(model, batch):
    model.zero_grad()
    out, saved = _saved_elements(lambda: model(**batch, num_items_in_batch=50))
    out.loss.backward()
    return out.loss.detach(), saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["unsloth", True])
def test_checkpointing_keeps_the_maths_and_saves_memory(mode, tiny_model_dir):
    check_checkpointing(mode, tiny_model_dir("gemma3"), "cpu")


def check_checkpointing(mode, path, device) -> None:
    """Checkpointing on ``device``: the loss and gradients of no checkpointing, a fraction of the saved state, and
    off again restores it (test_checkpointing_cuda runs it on a GPU, where "unsloth" offloads to the CPU)."""
    model = load_peft(path, device=device)
    patch_model(model)
    model.train()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = PaddingFreeCollator()([{"input_ids": torch.randint(3, vocab, (n,), generator=gen).tolist()}
                                   for n in (40, 70, 19)])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    ref_loss, ref_saved, ref_grads = _run(model, batch)
    enable_checkpointing(model, mode)
    loss, saved, grads = _run(model, batch)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, what="loss")
    assert set(grads) == set(ref_grads) and len(grads) > 0
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, scaled=True, what=name)
    if mode == "unsloth":  # the layer inputs are kept outside autograd's saved tensors; nothing else is
        assert saved * 5 < ref_saved, (saved, ref_saved)
    enable_checkpointing(model, False)
    _, saved_off, _ = _run(model, batch)
    assert saved_off == ref_saved


def test_first_layer_input_without_grad_still_trains_lora(tiny_model_dir):
    """Embeddings are frozen, so layer 0's input needs no grad; its LoRA weights must still get gradients."""
    model = load_peft(tiny_model_dir("llama"))
    enable_checkpointing(model, "unsloth")
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (1, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    first = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_bad_mode_is_rejected(tiny_model_dir):
    model = load_peft(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="use_gradient_checkpointing: 'offload'"):
        enable_checkpointing(model, "offload")


def _seeded_step(model, ids, seed: int):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["unsloth", True])
def test_checkpointing_with_lora_dropout_replays_the_same_masks(mode, tiny_model_dir):
    check_dropout_replay(mode, tiny_model_dir("llama"), "cpu")


def check_dropout_replay(mode, path, device) -> None:
    """With lora_dropout > 0 the recompute must draw the same dropout masks as the first forward (the RNG state is
    restored: the CUDA generator's too on a GPU), so the gradients equal those without checkpointing for the same
    seed."""
    model = load_peft(path, lora_dropout=0.3, device=device)
    patch_model(model)  # dropout > 0: the LoRA layers fall back to peft's forward, the rest stays fused
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    ref_loss, ref_grads = _seeded_step(model, ids, seed=7)
    _, other_grads = _seeded_step(model, ids, seed=8)
    name = next(iter(ref_grads))
    assert not torch.allclose(other_grads[name], ref_grads[name]), "dropout is not active: the test would prove nothing"
    enable_checkpointing(model, mode)
    loss, grads = _seeded_step(model, ids, seed=7)
    enable_checkpointing(model, False)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, what="loss")
    assert set(grads) == set(ref_grads) and len(grads) > 0
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, scaled=True, what=name)
