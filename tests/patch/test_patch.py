"""patch_model / unpatch_model on every family: same loss and gradients, fused paths really used, exact undo."""

from __future__ import annotations

import logging

import pytest
import torch
from fast_helpers import assert_close, load_peft
from transformers import AutoModelForCausalLM

import fasttune.patch.forwards as forwards
import fasttune.patch.loss as loss_mod
import fasttune.patch.moe as moe_mod
from fasttune import notes
from fasttune.models import family as family_spec
from fasttune.patch import FAST_PATHS, is_patched, patch_model, unpatch_model
from fasttune.tiny import FAMILIES

FP32 = dict(atol=2e-6, rtol=1e-5, scaled=True)


class Spy:
    """Counts calls of the fast functions the patched forwards use."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        for module, name in ((forwards, "lora_mlp"), (forwards, "lora_projections"), (forwards, "lora_linear"),
                             (forwards, "rms_norm"), (loss_mod, "fused_linear_cross_entropy"),
                             (moe_mod, "moe_experts")):
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, fn):
        def spy(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return spy


def _batch(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 24), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_every_family_is_registered():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"} <= set(FAST_PATHS)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_peft_model_matches_and_unpatch_is_exact(family, tiny_model_dir, monkeypatch):
    model = load_peft(tiny_model_dir(family))
    ids, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
    ref, ref_grads = _loss_and_grads(model, ids, labels)

    spy = Spy(monkeypatch)
    patch_model(model)
    assert is_patched(model)
    out, grads = _loss_and_grads(model, ids, labels)
    assert out.logits is None  # fused CE never builds them
    n_layers = model.config.num_hidden_layers
    sparse = family_spec(family).moe is not None  # every decoder MLP a mixture of experts: the grouped experts
    assert spy.calls.get("lora_mlp", 0) == (0 if sparse else n_layers)
    assert spy.calls.get("moe_experts", 0) == (n_layers if sparse else 0)
    assert spy.calls.get("fused_linear_cross_entropy") == 1
    assert spy.calls.get("rms_norm", 0) >= 2 * n_layers + 1
    if family == "phi3":  # fused qkv_proj and o_proj: single projections
        assert spy.calls.get("lora_linear") == 2 * n_layers
    else:
        assert spy.calls.get("lora_projections") == n_layers and spy.calls.get("lora_linear") == n_layers
    assert_close(out.loss, ref.loss, **FP32, what=f"{family} loss")
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, scaled=True, what=f"{family} {name}")

    with torch.no_grad():
        patched_logits = model(input_ids=ids).logits  # no labels: ordinary logits
    assert_close(patched_logits, logits_before, **FP32, what=f"{family} logits")
    unpatch_model(model)
    assert not is_patched(model)
    with torch.no_grad():
        logits_after = model(input_ids=ids).logits
    assert torch.equal(logits_after, logits_before), f"{family}: logits after unpatch are not bit-identical"


def test_plain_model_patch_generate_and_exact_unpatch(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), dtype=torch.float32)
    ids, labels = _batch(model.config.vocab_size, seed=1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        ref_loss = model(input_ids=ids, labels=labels).loss
    generated = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)
    patch_model(model)
    patch_model(model)  # idempotent
    with torch.no_grad():
        assert_close(model(input_ids=ids, labels=labels).loss, ref_loss, **FP32, what="plain-model loss")
    assert torch.equal(model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False), generated)
    unpatch_model(model)
    assert "forward" not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_train_and_eval_switches_keep_the_fast_path(tiny_model_dir, monkeypatch):
    """transformers >= 5.25 re-kernelizes a model on every train()/eval() switch, which dropped every patched RMSNorm
    forward (found on a fresh install: nothing failed, the fused norms were simply gone). The patch must survive mode
    switches, and unpatch must give back transformers' kernelization as it was."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    kernelized = getattr(model, "use_kernels", False)
    ids, labels = _batch(model.config.vocab_size, seed=2)
    patch_model(model)
    record = model.__dict__["_fasttune_fast_patches"]
    for switch in (model.train, model.eval, model.train):
        switch()
        lost = [type(m).__name__ for m, _, ours in record.entries if m.__dict__.get("forward") is not ours]
        assert not lost, f"after {switch.__name__}(): the fast forwards of {lost[:3]} were replaced"
    spy = Spy(monkeypatch)
    model(input_ids=ids, labels=labels).loss.backward()
    assert spy.calls.get("rms_norm", 0) >= 2 * model.config.num_hidden_layers + 1
    unpatch_model(model)
    assert getattr(model, "use_kernels", False) == kernelized


def test_num_items_in_batch_and_gemma2_softcap(tiny_model_dir):
    model = load_peft(tiny_model_dir("gemma2"))
    assert model.config.final_logit_softcapping == 30.0
    ids, labels = _batch(model.config.vocab_size, seed=2)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels, num_items_in_batch=100).loss
        patch_model(model)
        got = model(input_ids=ids, labels=labels, num_items_in_batch=100).loss
        default = model(input_ids=ids, labels=labels).loss
    assert_close(got, ref, **FP32, what="loss / num_items_in_batch")
    n_labels = int((labels[:, 1:] != -100).sum())
    assert_close(default * n_labels / 100, got, **FP32, what="normalisation")


def test_fallback_with_dropout_logs_once_and_matches_peft(tiny_model_dir, caplog):
    model = load_peft(tiny_model_dir("llama"), lora_dropout=0.1)
    model.eval()  # dropout inactive: peft's forward is deterministic, so it can be compared
    ids, labels = _batch(model.config.vocab_size, seed=3)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels).loss
        patch_model(model)
        notes._noted.clear()  # each note is logged once per process
        with caplog.at_level(logging.WARNING, logger="fasttune.patch"):
            got = model(input_ids=ids, labels=labels).loss
    messages = [r.getMessage() for r in caplog.records if "lora_dropout" in r.getMessage()]
    assert messages and len(messages) == len(set(messages)), messages
    assert_close(got, ref, **FP32, what="fallback loss")


def test_disabled_adapters_give_the_base_model(tiny_model_dir):
    model = load_peft(tiny_model_dir("mistral"))
    ids, _ = _batch(model.config.vocab_size, seed=4)
    patch_model(model)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        unpatch_model(model)
        with model.disable_adapter():
            ref = model(input_ids=ids).logits
    assert_close(base, ref, **FP32, what="disabled-adapter logits")
    assert (adapted - base).abs().max() > 1e-3  # the adapters do change the output when enabled


def test_patch_before_get_peft_model_then_repatch(tiny_model_dir, monkeypatch):
    """The loader's order: patch the plain model, inject LoRA, patch again. In between, results stay correct."""
    from fast_helpers import lora_config
    from peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3"), dtype=torch.float32)
    patch_model(model)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config())
    ids, labels = _batch(model.config.vocab_size, seed=5)
    with torch.no_grad():
        between = peft_model(input_ids=ids, labels=labels).loss
        spy = Spy(monkeypatch)
        patch_model(peft_model)
        after = peft_model(input_ids=ids, labels=labels).loss
        assert spy.calls.get("lora_projections") == model.config.num_hidden_layers
        unpatch_model(peft_model)
        ref = peft_model(input_ids=ids, labels=labels).loss
    assert_close(between, ref, **FP32, what="loss between patch and re-patch")
    assert_close(after, ref, **FP32, what="loss after re-patch")


def test_loss_chunk_size_bounds_the_logits_chunk():
    from fasttune.patch.loss import LOGITS_CHUNK_ELEMENTS, loss_chunk_size

    assert loss_chunk_size(32000) == 1024 and loss_chunk_size(128256) == 256
    for vocab in (1000, 32000, 128256, 262144):
        size = loss_chunk_size(vocab)
        assert 64 <= size <= 1024 and size & (size - 1) == 0
        assert size * vocab <= LOGITS_CHUNK_ELEMENTS or size == 64
