"""Bad input gets a clear error naming the parameter, the value and what is allowed."""

from __future__ import annotations

import pytest

from fasttune import FastLanguageModel
from fasttune.config import ConfigError, LoadConfig, LoraSettings


def test_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=r"model_name: folder .*no_such_model.* does not exist"):
        FastLanguageModel.from_pretrained(str(missing))


def test_folder_without_config_lists_contents(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"has no config.json.*contains: weights.bin"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_hub_id_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'nobody-here/not-a-model' is not a local folder and the Hugging Face Hub is offline"):
        FastLanguageModel.from_pretrained("nobody-here/not-a-model")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(dtype="float12"), r"dtype: 'float12' is not a known dtype"),
        (dict(load_in_4bit=True, load_in_8bit=True), r"load_in_4bit=True and load_in_8bit=True"),
        (dict(max_seq_length=0), r"max_seq_length: 0 must be a positive integer"),
        (dict(max_seq_length=-5), r"max_seq_length: -5 must be a positive integer"),
    ],
)
def test_load_options_rejected_before_loading(tiny_model_dir, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), **kwargs)


def test_all_load_mistakes_reported_at_once():
    with pytest.raises(ConfigError) as err:
        LoadConfig("some/model", max_seq_length=0, dtype="int3", load_in_4bit=True, load_in_8bit=True)
    text = str(err.value)
    assert "3 invalid option(s)" in text
    for piece in ("max_seq_length: 0", "dtype: 'int3'", "load_in_8bit=True"):
        assert piece in text


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(r=0), r"r: 0 must be a positive integer"),
        (dict(r=-4), r"r: -4 must be a positive integer"),
        (dict(lora_alpha=0), r"lora_alpha: 0 must be a positive number"),
        (dict(lora_alpha=-1.5), r"lora_alpha: -1.5 must be a positive number"),
        (dict(lora_dropout=1.0), r"lora_dropout: 1.0 must be in \[0, 1\)"),
        (dict(bias="some"), r"bias: 'some' is not allowed; choose one of \['none', 'all', 'lora_only'\]"),
        (dict(use_gradient_checkpointing="fast"), r"use_gradient_checkpointing: 'fast' is not allowed"),
    ],
)
def test_lora_options_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LoraSettings(**kwargs)


def test_bad_target_module_lists_linear_layers(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")), load_in_4bit=False)
    with pytest.raises(ValueError) as err:
        FastLanguageModel.get_peft_model(model, target_modules=["q_prj", "v_proj"])
    text = str(err.value)
    assert text.startswith("target_modules: 'q_prj' is not a module of this Qwen2 model")
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text
    assert "lm_head" not in text


def test_phi3_default_targets_map_to_fused_projections(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("phi3")), load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model)
    targets = set(model.peft_config["default"].target_modules)
    assert targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
