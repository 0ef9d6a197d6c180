"""FastVisionModel loads tiny VLMs of five families (16-bit and 4-bit), patches the language tower exactly, and
``FastModel`` dispatches to it; text models and videos get clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText
from vision_helpers import circle, conversation

from fasttune import FastLanguageModel, FastModel, FastVisionModel
from fasttune.patch import is_patched, unpatch_model
from fasttune.quant import is_quantized_linear
from fasttune.vision.processor import load_processor
from fasttune.vision.towers import classify

FULL = ["qwen2_vl", "qwen2_5_vl", "gemma3"]
ONCE = ["mllama", "llava"]


def _batch(processor, n: int = 2):
    texts, images = [], []
    for colour in ("red", "blue")[:n]:
        example = conversation(circle(colour), answer=colour)
        messages = [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                                    for p in m["content"]]} for m in example["messages"]]
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images.append([circle(colour)])
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("family", "bits"), [(f, b) for f in FULL for b in (16, 4)] + [(f, 16) for f in ONCE])
def test_fast_path_equals_transformers_forward_and_gradients(tiny_vlm_dir, family, bits):
    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir(family)), load_in_4bit=bits == 4,
                                                       dtype=torch.float32, use_gradient_checkpointing=False)
    assert is_patched(model)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=8, init_lora_weights=False,
                                           use_gradient_checkpointing=False)
    model.train()
    batch = _batch(processor)
    loss, grads = _loss_and_grads(model, batch)
    unpatch_model(model)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert torch.isfinite(loss) and loss.item() > 1.0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    assert any(".visual." in n or "vision" in n for n in grads), "vision-tower adapters get gradients"
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FULL + ["llava"])
def test_4bit_quantizes_the_language_tower_only(tiny_vlm_dir, family):
    model, _ = FastVisionModel.from_pretrained(str(tiny_vlm_dir(family)), load_in_4bit=True, dtype=torch.float32)
    towers = {"language": [], "vision": []}
    for name, module in model.named_modules():
        tower, _ = classify(name)
        if tower and (isinstance(module, nn.Linear) or is_quantized_linear(module)):
            towers[tower].append(is_quantized_linear(module))
    assert towers["language"] and all(towers["language"])
    assert towers["vision"] and not any(towers["vision"])
    assert not is_quantized_linear(model.get_output_embeddings())


def test_fastmodel_dispatches_on_the_config(tiny_vlm_dir, tiny_model_dir):
    model, processor = FastModel.from_pretrained(str(tiny_vlm_dir("qwen2_vl")), load_in_4bit=False)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and hasattr(processor, "image_processor")
    peft_model = FastModel.get_peft_model(model, r=4, finetune_vision_layers=False)
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    assert adapted and not any("visual" in n for n in adapted)
    text_model, tokenizer = FastModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False)
    assert type(text_model).__name__ == "LlamaForCausalLM" and not hasattr(tokenizer, "image_processor")


def test_text_model_and_text_peft_are_refused_with_the_way_out(tiny_model_dir):
    with pytest.raises(ValueError, match="is a text model .*load it with FastLanguageModel"):
        FastVisionModel.from_pretrained(str(tiny_model_dir("llama")))
    text_model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False)
    with pytest.raises(ValueError, match="has no vision tower; use FastLanguageModel.get_peft_model"):
        FastVisionModel.get_peft_model(text_model)


def test_processor_without_torchvision_saves_files_transformers_reads(tiny_vlm_dir, tmp_path):
    processor = load_processor(str(tiny_vlm_dir("qwen2_vl")))
    assert type(processor).__name__ == "Qwen2VLProcessor"
    with pytest.raises(ValueError, match="videos: .* without a video processor"):
        processor(text=["hi"], videos=[[circle("red")]])
    processor.save_pretrained(tmp_path)
    again = load_processor(str(tmp_path))
    batch = _batch(processor)
    torch.testing.assert_close(_batch(again)["pixel_values"], batch["pixel_values"])
    assert '"processor_class": "Qwen2VLProcessor"' in (tmp_path / "processor_config.json").read_text()


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])  # built without its video part / by AutoProcessor
def test_processor_answers_as_its_tokenizer_where_notebooks_use_it_so(tiny_vlm_dir, family):
    processor = load_processor(str(tiny_vlm_dir(family)))
    tokenizer = processor.tokenizer
    assert (processor.pad_token, processor.pad_token_id, processor.eos_token_id) == \
        (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.eos_token_id)
    processor.pad_token = tokenizer.eos_token  # writes go to the tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == processor.pad_token_id
    text = ["Say hello.", "Count to three, please."]
    assert processor(text)["input_ids"] == processor(text=text)["input_ids"] == tokenizer(text)["input_ids"]
    again = pickle.loads(pickle.dumps(processor))  # datasets' workers, DataLoader workers under spawn
    assert type(again).__name__ == type(processor).__name__ and again.pad_token_id == tokenizer.eos_token_id
    torch.testing.assert_close(_batch(again)["pixel_values"], _batch(processor)["pixel_values"])


def test_a_folder_without_processor_is_named(tiny_model_dir):
    with pytest.raises(ValueError, match="has no processor config"):
        load_processor(str(tiny_model_dir("llama")))


@pytest.mark.parametrize("bits", [16, 4])
def test_merged_export_and_adapter_reload_give_the_same_logits(tiny_vlm_dir, tmp_path, bits):
    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir("gemma3")), load_in_4bit=bits == 4,
                                                       dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=8, init_lora_weights=False)
    FastVisionModel.for_inference(model)
    batch = _batch(processor, n=1)
    with torch.no_grad():
        reference = model(**batch).logits
    model.save_pretrained_merged(str(tmp_path / "merged"), processor)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, reference, rtol=1e-4, atol=2e-5)
    model.save_pretrained(tmp_path / "adapter")
    processor.save_pretrained(tmp_path / "adapter")
    again, _ = FastVisionModel.from_pretrained(str(tmp_path / "adapter"), load_in_4bit=bits == 4, dtype=torch.float32)
    FastVisionModel.for_inference(again)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, reference)
