"""A GGUF file as the base model: FastLanguageModel.from_pretrained("model.gguf") (or a folder holding one, or
``gguf_file=``) loads it dequantized, with the tokenizer and chat template it carries, in 16-bit or 4-bit; LoRA,
training and every save work after it; a broken file is named and nothing is cached."""

from __future__ import annotations

import shutil

import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.chat_templates import get_chat_template


@pytest.fixture(scope="module")
def gguf_export(tiny_model_dir, tmp_path_factory):
    """A tiny llama exported as an F16 GGUF (llama-3.1 template), and the logits the original gives."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False,
                                                         dtype=torch.float32)
    tokenizer = get_chat_template(tokenizer, "llama-3.1")
    out = tmp_path_factory.mktemp("gguf-export")
    model.save_pretrained_gguf(out, tokenizer, quantization_method="f16")
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return out / "model.F16.gguf", ids, logits, tokenizer


def test_a_gguf_loads_as_the_base_model_and_trains_and_saves(gguf_export, tmp_path, monkeypatch, caplog):
    path, ids, logits, tokenizer = gguf_export
    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="fasttune"):
        model, loaded_tokenizer = FastLanguageModel.from_pretrained(str(path), load_in_4bit=False, dtype=torch.float32)
    assert "model.F16.gguf read from GGUF" in caplog.text
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    assert loaded_tokenizer.chat_template == tokenizer.chat_template  # the template the GGUF carries
    assert loaded_tokenizer(["a b"])["input_ids"] == tokenizer(["a b"])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=2e-2, rtol=0)  # F16 storage

    caplog.clear()  # the second time: the cached folder, in 4-bit; a folder holding the file and gguf_file= too
    with caplog.at_level("WARNING", logger="fasttune"):
        four, _ = FastLanguageModel.from_pretrained(str(path.parent), load_in_4bit=True, dtype=torch.float32)
        same, _ = FastLanguageModel.from_pretrained(str(path.parent), gguf_file=path.name, load_in_4bit=False,
                                                    dtype=torch.float32)
    assert "read from GGUF" not in caplog.text and four.is_loaded_in_4bit
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))

    four = FastLanguageModel.get_peft_model(four, r=4, lora_alpha=8, init_lora_weights=False)
    optimizer = torch.optim.SGD([p for p in four.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(3):
        loss = four(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    four.save_pretrained(tmp_path / "adapter")
    four.save_pretrained_merged(tmp_path / "merged", loaded_tokenizer)
    four.save_pretrained_gguf(tmp_path / "again", loaded_tokenizer, quantization_method="q8_0")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "again" / "model.Q8_0.gguf").is_file() and (tmp_path / "again" / "Modelfile").is_file()


def test_a_broken_gguf_is_named_and_nothing_is_cached(gguf_export, tmp_path, monkeypatch):
    path, *_ = gguf_export
    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model_name: '.*cut.gguf'.*(truncated|cannot be read)"):
        FastLanguageModel.from_pretrained(str(cut), load_in_4bit=False)
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a gguf file")
    with pytest.raises(ValueError, match=r"model_name: '.*notes.gguf' cannot be read as a GGUF model"):
        FastLanguageModel.from_pretrained(str(fake), load_in_4bit=False)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(path, two / name)
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\); pass the path of the one to load"):
        FastLanguageModel.from_pretrained(str(two), load_in_4bit=False)
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]


def _write_gguf(path, arch: str) -> None:
    """A minimal GGUF of ``arch`` with the llama keys and one tensor, and no tokenizer."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch, error", [
    ("llama", r"model_name: '.*llama.gguf' has no tokenizer transformers can read.*needs the tokenizer"),
    ("notamodel", r"model_name: '.*notamodel.gguf' cannot be read as a GGUF model.*notamodel.*architecture"),
])
def test_a_gguf_without_tokenizer_or_of_an_unknown_architecture_is_named(arch, error, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(path, arch)
    with pytest.raises(ValueError, match=error):
        FastLanguageModel.from_pretrained(str(path), load_in_4bit=False)
    assert not (tmp_path / "cache" / "gguf").exists() or not list((tmp_path / "cache" / "gguf").iterdir())
