"""from_pretrained / get_peft_model / for_inference / for_training and adapter save/reload."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fasttune import FastLanguageModel, is_bfloat16_supported
from fasttune.models import family as family_spec
from fasttune.patch import is_checkpointing
from fasttune.quant import FastLinear4bit, FastLinear8bitLt
from fasttune.quant.experts import PackedExperts
from fasttune.tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_in_4bit_and_generates(tiny_model_dir, family):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), max_seq_length=256)
    quant = [m for m in model.modules() if isinstance(m, FastLinear4bit)]
    if family_spec(family).moe is not None:  # attention in bitsandbytes 4-bit; every expert NF4-packed
        assert len(quant) == 4 * 4
        assert sum(isinstance(p, PackedExperts) for p in model.parameters()) == 4 * 2
    else:
        assert len(quant) == 4 * (4 if family == "phi3" else 7)
    assert tokenizer.pad_token is not None and tokenizer.model_max_length == 256
    model = FastLanguageModel.get_peft_model(model, r=4)
    assert model.max_seq_length == 256  # Unsloth's public attribute, read by notebooks (through the peft wrapper)
    FastLanguageModel.for_inference(model)
    assert tokenizer.padding_side == "left" and model.config.use_cache and not model.training
    batch = tokenizer(["The capital of", "A"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch.input_ids.shape[1] + 5)
    FastLanguageModel.for_training(model)
    assert tokenizer.padding_side == "right" and not model.config.use_cache and model.training


def test_dtype_default_and_explicit(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False)
    assert model.dtype == (torch.bfloat16 if is_bfloat16_supported() else torch.float32)
    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False, dtype="float32")
    assert model.dtype == torch.float32


def test_8bit_and_full_finetuning(tiny_model_dir, caplog):
    path = str(tiny_model_dir("qwen3"))
    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False, load_in_8bit=True)
    assert sum(isinstance(m, FastLinear8bitLt) for m in model.modules()) == 28
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        model, _ = FastLanguageModel.from_pretrained(path, full_finetuning=True)  # load_in_4bit defaults True
    assert "loads in 16-bit" in caplog.text
    assert not any(isinstance(m, FastLinear4bit) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_architecture_loads_generic_with_note(tmp_path, caplog, tiny_tokenizer):
    tok = tiny_tokenizer("llama")
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=2, vocab_size=640, n_positions=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype="float32")
    notes = [r.message for r in caplog.records if "no fast path" in r.message]
    assert len(notes) == 1 and "gpt2" in notes[0]
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids).logits.shape == (1, 3, 640)


def test_trust_remote_code_is_off_by_default(tiny_model_dir, monkeypatch):
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen["trust_remote_code"] = kwargs.get("trust_remote_code")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False)
    assert seen["trust_remote_code"] is False


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_adapter_reloads_in_plain_peft_with_same_logits(tiny_model_dir, tmp_path, load_in_4bit):
    path = str(tiny_model_dir("gemma2"))
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights="gaussian")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    FastLanguageModel.for_inference(model)
    ids = tokenizer(["hello world, this is a test"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")

    if load_in_4bit:
        # plain transformers + peft, no fasttune involved: bitsandbytes' own 4-bit forward
        from transformers import BitsAndBytesConfig

        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=qc,
                                                    device_map={"": "cpu"})
    else:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # 4-bit: keep bitsandbytes in train mode (no dropout anywhere, so nothing random) so it runs its exact
    # dequantize-and-matmul; its CPU eval kernel computes in bf16 and fails on dimensions like 688.
    base.train(load_in_4bit)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter")
    plain.train(load_in_4bit)
    with torch.no_grad():
        theirs = plain(input_ids=ids).logits
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes the output, so the comparison means something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # fasttune loads the adapter folder directly too (base from adapter_config.json)
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32,
                                                 load_in_4bit=load_in_4bit)
    assert isinstance(again, PeftModel)
    # loaded to train further: the default checkpointing mode is on, as after get_peft_model
    assert is_checkpointing(again) and again.get_base_model().fasttune_checkpointing == "unsloth"
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "adapter").eos_token == tokenizer.eos_token


def test_export_methods_bound_on_instances_only(tiny_model_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")), load_in_4bit=False,
                                                         dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.05)  # a non-zero adapter, so the merge has something to get right
    for name in ("save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf"):
        assert getattr(model, name).__self__ is model
        assert not hasattr(type(model), name)  # nothing added to peft's or transformers' classes
    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_checkpointing_modes_follow_inference_and_training(tiny_model_dir):

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4)  # use_gradient_checkpointing="unsloth" by default
    assert is_checkpointing(model)
    FastLanguageModel.for_inference(model)
    assert not is_checkpointing(model)
    FastLanguageModel.for_training(model)
    assert is_checkpointing(model) and model.get_base_model().fasttune_checkpointing == "unsloth"
    ids = torch.randint(5, 500, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_fasttune_models_are_never_kernelized_by_transformers(tiny_model_dir, monkeypatch):
    """transformers >= 5.25 fetches Hub kernels for decorated layers at load and again at every train()/eval() (on
    CUDA: code downloaded from the Hub, then replaced by fasttune's forwards anyway). A fasttune model asks for none."""
    import transformers.modeling_utils as modeling_utils

    def refuse(*args, **kwargs):
        raise AssertionError("transformers kernelized a fasttune model")

    monkeypatch.setattr(modeling_utils, "kernelize", refuse)
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4)
    FastLanguageModel.for_inference(model)
    FastLanguageModel.for_training(model)
    assert not model.get_base_model().use_kernels


def test_checkpoints_are_read_not_mapped_and_load_bit_identical(tiny_model_dir, monkeypatch):
    """fasttune's load reads safetensors tensor by tensor (pread: no mapped file pages left resident) and gets the
    very weights transformers' own mapped load gets; outside fasttune's load transformers' safe_open is untouched."""
    import transformers.modeling_utils as modeling_utils

    path = tiny_model_dir("llama")
    original = modeling_utils.safe_open
    backends = []

    def spy(filename, framework, device="cpu", **kwargs):
        backends.append(kwargs.get("backend"))
        return original(filename, framework, device, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_open", spy)
    model, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.bfloat16, load_in_4bit=False)  # fp32 files
    assert backends and set(backends) == {"pread"}, backends
    assert modeling_utils.safe_open is spy, "the wrapper must be removed after the load"
    backends.clear()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert set(backends) == {"mmap"}, backends  # transformers' own choice, unchanged outside fasttune's load
    ours = {k.replace("base_model.model.", ""): v for k, v in model.state_dict().items()}
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    backends.clear()
    FastLanguageModel.from_pretrained(str(path), dtype=torch.float32, load_in_4bit=False)  # no narrowing: mapped
    assert set(backends) == {"mmap"}, backends
