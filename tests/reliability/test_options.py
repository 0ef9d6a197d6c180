"""Option validation: every bad value is refused before any work, with the parameter, the value and what is allowed.

Covers non-finite numbers (nan/inf pass a plain range check because every comparison with nan is False), target
regexes and layer indices checked against the real model before peft sees them, a base model that peft already
changed in place, and the warning on pickle-only checkpoints.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fasttune import FastLanguageModel
from fasttune.config import ConfigError, LoraSettings
from fasttune.source import resolve_source

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(lora_alpha=NAN), r"lora_alpha: nan must be a positive number, finite"),
        (dict(lora_alpha=INF), r"lora_alpha: inf must be a positive number, finite"),
        (dict(lora_alpha=np.float32("nan")), r"lora_alpha: .*nan.* must be a positive number, finite"),
        (dict(lora_dropout=NAN), r"lora_dropout: nan must be in \[0, 1\) \(a finite number\)"),
        (dict(lora_dropout=-INF), r"lora_dropout: -inf must be in \[0, 1\) \(a finite number\)"),
        (dict(random_state=NAN), r"random_state: nan must be an integer seed"),
        (dict(random_state=1.5), r"random_state: 1.5 must be an integer seed"),
        (dict(random_state=2**70), r"random_state: \d+ must be an integer seed \(torch accepts"),
        (dict(r=INF), r"r: inf must be a positive integer"),
        (dict(layers_to_transform=[0, NAN]), r"layers_to_transform: \[0, nan\] must be non-negative layer indices"),
        (dict(layers_to_transform=True), r"layers_to_transform: True must be non-negative layer indices"),
        (dict(use_rslora="yes"), r"use_rslora: 'yes' must be True or False"),
    ],
)
def test_non_finite_and_mistyped_numbers_rejected(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LoraSettings(**kwargs)


def test_numeric_mistakes_reported_together():
    with pytest.raises(ConfigError) as err:
        LoraSettings(lora_alpha=INF, lora_dropout=NAN, random_state=NAN)
    assert "3 invalid option(s)" in str(err.value)


def test_numpy_scalars_and_finite_values_accepted():
    settings = LoraSettings(r=np.int64(8), lora_alpha=np.float32(16.0), lora_dropout=0.05, random_state=np.int64(1))
    assert math.isfinite(settings.lora_alpha)


def test_nan_alpha_is_refused_by_get_peft_model(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")), load_in_4bit=False, dtype="float32")
    with pytest.raises(ConfigError, match="lora_alpha: nan"):
        FastLanguageModel.get_peft_model(model, lora_alpha=NAN)
    assert not any("lora_" in n for n, _ in model.named_parameters()), "the model was changed before the check"


def _load(tiny_model_dir, family: str = "qwen2"):
    return FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), load_in_4bit=False, dtype="float32")[0]


def test_regex_matching_nothing_lists_the_linear_layers(tiny_model_dir):
    with pytest.raises(ValueError) as err:
        FastLanguageModel.get_peft_model(_load(tiny_model_dir), target_modules="nope")
    text = str(err.value)
    assert text.startswith("target_modules: the regex 'nope' matches no module of this Qwen2 model")
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text
    assert "model.layers.0." in text  # an example of the full names a regex is matched against


def test_invalid_regex_is_named(tiny_model_dir):
    with pytest.raises(ValueError, match=r"target_modules: '\(q_proj' is not a valid regular expression"):
        FastLanguageModel.get_peft_model(_load(tiny_model_dir), target_modules="(q_proj")


def test_regex_and_all_linear_still_work(tiny_model_dir):
    model = FastLanguageModel.get_peft_model(_load(tiny_model_dir), target_modules=r".*layers\.1\..*\.(q|v)_proj",
                                             use_gradient_checkpointing=False)
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {f"base_model.model.model.layers.1.self_attn.{n}_proj" for n in "qv"}
    model = FastLanguageModel.get_peft_model(_load(tiny_model_dir), target_modules="all-linear",
                                             use_gradient_checkpointing=False)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 4 * 7


def test_all_linear_with_layers_to_transform(tiny_model_dir):
    """peft refuses layers_to_transform with any string target; fasttune passes 'all-linear' as the explicit list."""
    model = FastLanguageModel.get_peft_model(_load(tiny_model_dir), target_modules="all-linear",
                                             layers_to_transform=[2], use_gradient_checkpointing=False)
    adapted = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(adapted) == 7 and all(".layers.2." in n for n in adapted)


def test_regex_with_layers_to_transform_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match=r"layers_to_transform cannot be combined with the regex target_modules"):
        FastLanguageModel.get_peft_model(_load(tiny_model_dir), target_modules=".*q_proj", layers_to_transform=[0])


@pytest.mark.parametrize("layers", [[99], 4, [0, 7]])
def test_layers_beyond_the_model_name_its_layer_count(tiny_model_dir, layers):
    with pytest.raises(ValueError, match=r"layers_to_transform: (99|4|7) is beyond this Qwen2 model's 4 layers; "
                                         r"allowed indices are 0 to 3"):
        FastLanguageModel.get_peft_model(_load(tiny_model_dir), layers_to_transform=layers)


def test_get_peft_model_twice_on_the_same_base_explains(tiny_model_dir):
    base = _load(tiny_model_dir)
    peft_model = FastLanguageModel.get_peft_model(base, use_gradient_checkpointing=False)
    for again in (base, peft_model.get_base_model()):
        with pytest.raises(ValueError) as err:
            FastLanguageModel.get_peft_model(again)
        text = str(err.value)
        assert "already holds 28 peft adapter layer(s)" in text and "model.layers.0.self_attn" in text
        assert "changes the model in place" in text and "unload()" in text
        assert "is not a module" not in text
    # what the message recommends works
    fresh = FastLanguageModel.get_peft_model(peft_model.unload(), r=4, use_gradient_checkpointing=False)
    assert isinstance(fresh, PeftModel) and fresh.peft_config["default"].r == 4


def _pickle_only_copy(src, dst):
    """The tiny model's folder with its weights as pytorch_model.bin (pickle) instead of model.safetensors."""
    for item in src.iterdir():
        if item.suffix != ".safetensors":
            (dst / item.name).write_bytes(item.read_bytes())
    state = {}
    for file in src.glob("*.safetensors"):
        state.update(load_file(file))
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_pickle_only_checkpoint_warns_and_still_loads(tiny_model_dir, tmp_path, caplog):
    folder = _pickle_only_copy(tiny_model_dir("llama"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, dtype="float32")
    notes = [r.getMessage() for r in caplog.records if "pickle" in r.getMessage()]
    assert len(notes) == 1, notes
    assert "pytorch_model.bin" in notes[0] and "arbitrary code" in notes[0] and "safetensors" in notes[0]
    assert str(folder) in notes[0]
    assert model.config.model_type == "llama"


def test_safetensors_checkpoint_has_no_pickle_warning(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        resolve_source(str(tiny_model_dir("llama")))
    assert not [r for r in caplog.records if "pickle" in r.getMessage()]


def test_finetune_switches_pick_the_family_projections(tiny_model_dir):
    from fasttune import FastModel

    model, _ = FastModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False, dtype="float32")
    peft_model = FastModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                          finetune_attention_modules=False, finetune_mlp_modules=True, r=4)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert adapted == {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(("switches", "pattern"), [
    (dict(finetune_language_layers=False), r"finetune_language_layers=False: this model has only language layers"),
    (dict(finetune_attention_modules=False, finetune_mlp_modules=False), r"nothing would be adapted"),
    (dict(finetune_mlp_modules="yes"), r"finetune_mlp_modules: 'yes' must be True or False"),
])
def test_finetune_switches_that_adapt_nothing_are_refused(tiny_model_dir, switches, pattern):
    from fasttune import FastModel

    model, _ = FastModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False, dtype="float32")
    with pytest.raises((ValueError, TypeError), match=pattern):
        FastModel.get_peft_model(model, **switches)
