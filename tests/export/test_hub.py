"""push_to_hub_merged / push_to_hub_gguf through huggingface_hub's real client, against a local Hub server."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
from export_helpers import lora_model
from local_hub import LocalHub
from safetensors.torch import load

from fasttune.export import push_to_hub_gguf, push_to_hub_merged
from fasttune.export.merge import merged_state_dict

TOKEN = "hf_local_test_token"


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # only this local server is reached
    with LocalHub() as server:
        yield server


def test_push_merged_uploads_the_merged_folder(hub, tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir("llama"), "llama")
    url = push_to_hub_merged(model, "tester/tiny-merged", tiny_tokenizer("llama"), token=TOKEN, private=True,
                             endpoint=hub.endpoint, commit_message="merged upload")
    repo = hub.repos["tester/tiny-merged"]
    assert url.startswith(hub.endpoint) and repo["private"] is True and repo["commits"] == ["merged upload"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(repo["files"])
    uploaded = load(repo["files"]["model.safetensors"])
    expected = merged_state_dict(model)
    assert set(uploaded) == set(expected)
    assert all(torch.equal(uploaded[k], expected[k]) for k in expected)
    assert "quantization_config" not in json.loads(repo["files"]["config.json"])


def test_push_gguf_uploads_files_and_modelfile(hub, tiny_model_dir, tiny_tokenizer, tmp_path):
    from gguf import GGUFReader

    from fasttune.data.chat import get_chat_template

    model = lora_model(tiny_model_dir("qwen2"), "qwen2")
    tokenizer = get_chat_template(tiny_tokenizer("qwen2"), "chatml")
    push_to_hub_gguf(model, "tester/tiny-gguf", tokenizer, quantization_method=["q8_0", "q4_0"], token=TOKEN,
                     endpoint=hub.endpoint)
    files = hub.repos["tester/tiny-gguf"]["files"]
    assert set(files) == {"model.Q8_0.gguf", "model.Q4_0.gguf", "Modelfile"}
    assert files["Modelfile"].decode().startswith("FROM ./model.Q8_0.gguf")
    reader = GGUFReader(_tmp(files["model.Q8_0.gguf"], tmp_path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0"


def test_bad_token_is_reported(hub, tiny_model_dir):
    model = lora_model(tiny_model_dir("llama"), "llama")
    with pytest.raises(Exception, match="401"):
        push_to_hub_merged(model, "tester/x", None, token="wrong", endpoint=hub.endpoint)
    assert "tester/x" not in hub.repos


def _tmp(data: bytes, folder):
    path = folder / "downloaded.gguf"
    path.write_bytes(data)
    return path
