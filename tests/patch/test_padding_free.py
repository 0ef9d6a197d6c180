"""Padding-free collator: layout, label masking, and exactness (packed loss == sum of per-sequence losses)."""

from __future__ import annotations

import weakref

import pytest
import torch
from fast_helpers import assert_close, load_peft

from fasttune.patch import patch_model
from fasttune.train import PaddingFreeCollator
from fasttune.train.padding_free import segment_lengths


def test_layout_positions_and_labels():
    batch = PaddingFreeCollator()([
        {"input_ids": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [-100, 9]},
        {"input_ids": [1, 2, 3, 4], "assistant_masks": [0, 0, 1, 1]},
        {"input_ids": [4, 3, 2], "completion_mask": [0, 1, 1]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 4, 3, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 3, 4, -100, 3, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 12]
    assert batch["max_length_k"] == 4
    assert "attention_mask" not in batch and batch["use_cache"] is False


def test_completion_mask_ignored_when_asked_and_packed_seq_lengths():
    collator = PaddingFreeCollator(completion_only_loss=False, pad_to_multiple_of=8, pad_token_id=0)
    batch = collator([{"input_ids": [1, 2, 3, 4, 5], "completion_mask": [0, 0, 0, 1, 1], "seq_lengths": [2, 3]}])
    assert batch["labels"].tolist() == [[-100, 2, -100, 4, 5, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert segment_lengths(batch["position_ids"]) == [2, 3, 3]


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PaddingFreeCollator(pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="labels: length"):
        PaddingFreeCollator()([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="empty"):
        PaddingFreeCollator()([])


def _examples(vocab: int, lengths: list[int], seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)  # prompt then completion
        out.append({"input_ids": ids, "completion_mask": mask})
    return out


@pytest.mark.parametrize("family,patched", [("llama", False), ("llama", True), ("gemma2", True), ("gemma3", True),
                                            ("qwen3", True)])
def test_packed_loss_equals_sum_of_sequence_losses(family, patched, tiny_model_dir):
    """Sliding window (gemma2/3: 64, every other layer) and softcapping included: the longest sequence (90) is longer
    than the window, so gemma3's per-segment path runs both the plain causal and the window-masked case."""
    model = load_peft(tiny_model_dir(family))
    if patched:
        patch_model(model)
    examples = _examples(model.config.vocab_size, [37, 90, 5, 21], seed=1)
    collator = PaddingFreeCollator()
    total = 0.0
    for example in examples:
        single = collator([example])
        total = total + model(input_ids=single["input_ids"], labels=single["labels"], num_items_in_batch=1).loss
    total.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = collator(examples)
    got = model(**packed, num_items_in_batch=1).loss
    got.backward()
    assert_close(got, total, atol=1e-6, rtol=1e-5, scaled=True, what=f"{family} packed loss")
    for name, grad in ref_grads.items():
        param = dict(model.named_parameters())[name]
        assert_close(param.grad, grad, atol=1e-5, rtol=1e-4, scaled=True, what=f"{family} {name}")


def test_packing_without_boundaries_would_differ(tiny_model_dir):
    """The check above can fail: one row with positions 0..n-1 (attention crossing examples) gives another loss."""
    model = load_peft(tiny_model_dir("llama"))
    examples = _examples(model.config.vocab_size, [37, 90, 5, 21], seed=1)
    packed = PaddingFreeCollator()(examples)
    with torch.no_grad():
        good = model(**packed).loss
        crossing = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
        crossing.pop("cu_seq_lens_q"), crossing.pop("cu_seq_lens_k")
        bad = model(**crossing).loss
    assert (good - bad).abs() > 1e-3


def test_packed_attention_choice_on_cpu():
    from fasttune.train.padding_free import packed_attention_implementation

    assert packed_attention_implementation("cpu") == "sdpa"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_packed_rows_use_per_segment_sdpa(family, tiny_model_dir, monkeypatch):
    """On an SDPA model, patch_model switches packed rows to SDPA per segment (sliding-window layers too); unpatch
    restores 'sdpa'."""
    import fasttune.patch.attention as attention
    from fasttune.patch import unpatch_model

    monkeypatch.setattr(attention, "_users", weakref.WeakValueDictionary())  # models patched by earlier tests
    model = load_peft(tiny_model_dir(family))
    assert model.config._attn_implementation == "sdpa"
    patch_model(model)
    assert model.config._attn_implementation == attention.NAME
    import fasttune.kernels.segment_attention as sa

    segments = []
    real_forward = sa._FORWARD

    def counting_forward(q, *args, **kwargs):  # the flash kernel, once per segment
        segments.append(q.shape[2])
        return real_forward(q, *args, **kwargs)

    def no_fallback(*args, **kwargs):
        raise AssertionError("a packed row fell back to the masked SDPA")

    monkeypatch.setattr(sa, "_FORWARD", counting_forward)
    monkeypatch.setattr(attention, "sdpa_attention_forward", no_fallback)
    examples = _examples(model.config.vocab_size, [37, 90, 5, 21], seed=1)
    with torch.no_grad():
        model(**PaddingFreeCollator()(examples))
    assert segments == [37, 90, 5, 21] * model.config.num_hidden_layers
    assert attention.is_registered()
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert not attention.is_registered(), "the last unpatch must remove fasttune's name from transformers' registry"


def test_packed_attention_stays_registered_while_a_patched_model_uses_it(tiny_model_dir, monkeypatch):
    import fasttune.patch.attention as attention
    from fasttune.patch import unpatch_model

    monkeypatch.setattr(attention, "_users", weakref.WeakValueDictionary())  # models patched by earlier tests
    first, second = load_peft(tiny_model_dir("llama")), load_peft(tiny_model_dir("llama"))
    patch_model(first)
    patch_model(second)
    unpatch_model(first)
    assert attention.is_registered() and second.config._attn_implementation == attention.NAME
    unpatch_model(second)
    assert not attention.is_registered()
