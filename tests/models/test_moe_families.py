"""The mixture-of-experts families through the public API: loading (4-bit experts), LoRA on every expert, adapters
saved and reloaded in peft's format, exact merges, checkpointing, the router's load-balancing loss."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fasttune import FastLanguageModel
from fasttune.models import family as family_spec
from fasttune.quant import FastLinear4bit, FastLinear8bitLt
from fasttune.quant.experts import PackedExperts
from fasttune.tiny import FAMILIES

MOE = [f for f in FAMILIES if family_spec(f).moe is not None]
pytestmark = pytest.mark.usefixtures("eager_kernels_one_thread")


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


def _randomise_lora_b(model) -> None:
    """peft starts B at zero (an adapter that changes nothing); a random B makes merges and reloads checkable."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", MOE)
def test_default_targets_adapt_every_expert_and_merge_exactly(family, tiny_model_dir, tmp_path):
    moe = family_spec(family).moe
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), max_seq_length=64,
                                                         load_in_4bit=False, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)  # Unsloth's default target names
    config = model.peft_config["default"]
    assert sorted(config.target_parameters) == sorted(f"mlp.{p}" for p in moe.parameters)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") \
        else model.config.num_experts
    lora_a = [p for n, p in model.named_parameters() if f"{moe.experts}.base_layer.lora_A" in n]
    assert lora_a and all(p.shape[0] == 4 * experts for p in lora_a)  # one rank-4 adapter per expert
    router = [p for n, p in model.named_parameters() if f"mlp.{moe.router}." in n]
    assert router and not any(p.requires_grad for p in router)  # the router stays frozen
    _randomise_lora_b(model)
    ids = _ids(model.config.vocab_size)
    want = _logits(model, ids)

    model.save_pretrained(str(tmp_path / "lora"))
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(config.target_parameters)
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "lora"), max_seq_length=64, load_in_4bit=False,
                                                    dtype="float32")
    assert isinstance(reloaded, PeftModel)
    torch.testing.assert_close(_logits(reloaded, ids), want, atol=1e-5, rtol=1e-5)

    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("family", MOE)
def test_4bit_experts_train_and_merge_to_their_dequantized_weights(family, tiny_model_dir, tmp_path):
    moe = family_spec(family).moe
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), max_seq_length=64,
                                                         dtype="float32")  # load_in_4bit defaults True
    experts = model.model.layers[0].mlp.experts
    packed = getattr(experts, moe.gate_up)
    assert isinstance(packed, PackedExperts) and isinstance(getattr(experts, moe.down), PackedExperts)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FastLinear4bit)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    _randomise_lora_b(model)
    ids = _ids(model.config.vocab_size, seed=1)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    want = _logits(model, ids)
    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    base = merged.model.layers[0].mlp.experts
    assert not isinstance(getattr(base, moe.gate_up), PackedExperts)
    torch.testing.assert_close(_logits(merged, ids), want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


def test_8bit_loads_attention_in_8bit_and_experts_in_16bit(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")), load_in_4bit=False,
                                                 load_in_8bit=True)
    assert sum(isinstance(m, FastLinear8bitLt) for m in model.modules()) == 4 * 4
    assert not any(isinstance(p, PackedExperts) for p in model.parameters())
    ids = _ids(model.config.vocab_size)
    assert torch.isfinite(_logits(model, ids)).all()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_checkpointing_gives_the_same_gradients(family, tiny_model_dir):
    grads = {}
    for mode in (False, "unsloth"):
        model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), max_seq_length=64,
                                                     load_in_4bit=False, dtype="float32")
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=mode)
        _randomise_lora_b(model)
        ids = _ids(model.config.vocab_size, seed=2)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads["unsloth"].keys() and any("experts" in n for n in grads[False])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads["unsloth"][name], grad, atol=1e-6 * float(grad.abs().max()), rtol=1e-5)


def test_router_aux_loss_is_added_as_transformers_adds_it(tiny_model_dir):
    path = str(tiny_model_dir("qwen3_moe"))
    ids = _ids(512, seed=3)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    want = reference(input_ids=ids, labels=ids, output_router_logits=True)
    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False, dtype="float32")
    got = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert got.logits is None  # the fused loss ran
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert got.loss != model(input_ids=ids, labels=ids).loss  # without router logits there is no aux term


def test_dropout_on_experts_is_refused_with_the_reason(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("mixtral")), load_in_4bit=False)
    with pytest.raises(ValueError, match="lora_dropout: 0.05 cannot be used with LoRA on the experts"):
        FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.05)
    attention_only = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.05,
                                                      target_modules=["q_proj", "v_proj"])
    assert not attention_only.peft_config["default"].target_parameters


def test_trainer_weights_the_aux_loss_as_trl_does(tiny_model_dir, tmp_path):
    """fasttune.trl.SFTTrainer's fused loss on a MoE equals TRL's own compute_loss (cross-entropy plus
    router_aux_loss_coef times the load-balancing loss, which TRL turns on for MoE models), and logs aux_loss."""
    from datasets import Dataset

    from fasttune.trl import SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen3_moe")), max_seq_length=64,
                                                         load_in_4bit=False, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True, bf16=False, max_length=64, router_aux_loss_coef=0.5)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args,
                         train_dataset=Dataset.from_dict({"text": ["one two three four", "five six seven"]}))
    assert trainer.aux_loss_enabled and model.config.output_router_logits
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.train()
    fast = trainer.compute_loss(model, dict(batch))
    trainer.fasttune_fast_loss = False
    trl = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(fast, trl, atol=1e-5, rtol=1e-5)
    assert trainer._metrics["train"]["aux_loss"]
