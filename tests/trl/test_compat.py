"""fasttune.trl: TRL's names re-exported, the Unsloth-era arguments translated (one note each), unknown ones refused."""

from __future__ import annotations

import dataclasses
import re

import pytest
import trl
import trl.experimental.orpo
from transformers import TrainingArguments
from trl_helpers import cpu_args, fast_model, text_dataset

import fasttune.trl as ft
from fasttune.train.compat import CONFIG_RENAMES, TRAINER_TO_CONFIG, translate_trainer_kwargs, trl_base
from fasttune.train.dropins import DROPINS


def test_every_public_trl_name_is_reexported():
    assert set(trl.__all__) <= set(ft.__all__)
    ours = {"SFTTrainer", "SFTConfig", *DROPINS, *(config for _, config, _ in DROPINS.values())}
    for name in trl.__all__:
        if name not in ours:
            assert getattr(ft, name) is getattr(trl, name), name
    for name in ours:
        cls = getattr(ft, name)
        base = trl_base(cls)
        assert base.__name__ == name and base in (getattr(trl, name, None), getattr(trl.experimental.orpo, name, None))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchTrainer'"):
        ft.NoSuchTrainer  # noqa: B018


def test_names_trl_moved_resolve_where_they_went_and_removed_ones_say_what_replaces_them(fasttune_logs):
    import importlib

    for name, module in ft._MOVED.items():
        assert not hasattr(trl, name), f"trl {trl.__version__} has {name} at its top level again: drop it from _MOVED"
        vars(ft).pop(name, None)  # resolved by an earlier test: resolve (and note) again
        assert getattr(ft, name) is getattr(importlib.import_module(module), name)
    assert any("CPOTrainer is trl.experimental.cpo.CPOTrainer" in m for m in fasttune_logs())
    for name, instead in ft._REMOVED.items():
        assert not hasattr(trl, name), f"trl {trl.__version__} has {name}: drop it from _REMOVED"
        with pytest.raises(AttributeError, match=re.escape(f"{name!r} (nor has trl {trl.__version__}); use {instead}")):
            getattr(ft, name)


@pytest.mark.parametrize("kind", sorted(TRAINER_TO_CONFIG))
def test_every_mapping_points_at_a_field_of_the_installed_config(kind):
    trainer = next(name for name, (_, _, k) in DROPINS.items() if k == kind) if kind != "sft" else "SFTTrainer"
    config = getattr(ft, "SFTConfig" if kind == "sft" else DROPINS[trainer][1])
    fields = {f.name for f in dataclasses.fields(config)}
    for table in (TRAINER_TO_CONFIG[kind], CONFIG_RENAMES[kind]):
        for old, new in table.items():
            assert new is None or new in fields, f"{kind}: {old} -> {new}, not a field of {config.__name__}"
            assert old not in fields or old == new, f"{kind}: {old} is still TRL's own name"


def test_config_renames_note_once_and_refuse_both_spellings(tmp_path, fasttune_logs):
    configs = [ft.SFTConfig(**cpu_args(tmp_path), max_seq_length=77) for _ in range(2)]
    assert [c.max_length for c in configs] == [77, 77]
    notes = [m for m in fasttune_logs() if "max_seq_length" in m]
    assert notes == ["fasttune: SFTConfig(max_seq_length=...) is deprecated; use max_length=... instead"]
    with pytest.raises(TypeError, match=r"max_seq_length=77 and max_length=50"):
        ft.SFTConfig(**cpu_args(tmp_path), max_seq_length=77, max_length=50)
    dpo = ft.DPOConfig(**cpu_args(tmp_path), max_prompt_length=64)
    assert isinstance(dpo, trl.DPOConfig) and not hasattr(dpo, "max_prompt_length")
    assert any("max_prompt_length" in m and "no equivalent" in m for m in fasttune_logs())


def test_trainer_arguments_move_into_a_copy_of_the_config(tiny_model_dir, tmp_path, fasttune_logs):
    model, tokenizer = fast_model(tiny_model_dir("llama"))
    user_args = TrainingArguments(**cpu_args(tmp_path))
    trainer = ft.SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=text_dataset(), args=user_args,
                            dataset_text_field="text", max_seq_length=40, packing=False, dataset_num_proc=1,
                            dataset_kwargs={"add_special_tokens": True}, dataset_batch_size=8)
    args = trainer.args
    assert isinstance(args, trl.SFTConfig) and trainer.processing_class is tokenizer
    assert (args.max_length, args.packing, args.dataset_num_proc, args.dataset_text_field) == (40, False, 1, "text")
    assert args.dataset_kwargs == {"add_special_tokens": True} and args.learning_rate == user_args.learning_rate
    assert not args.gradient_checkpointing  # TrainingArguments' default, not SFTConfig's
    notes = fasttune_logs()
    for name, new in (("tokenizer", "processing_class"), ("max_seq_length", "max_length"), ("packing", "packing")):
        assert sum(f"SFTTrainer({name}=...)" in m and f"{new}=" in m for m in notes) == 1, (name, notes)
    assert any("dataset_batch_size" in m and "no equivalent" in m for m in notes)
    assert any("TrainingArguments(...)) is converted to SFTConfig" in m for m in notes)
    config = ft.SFTConfig(**cpu_args(tmp_path))
    ft.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(), args=config,
                  max_seq_length=33)
    assert config.max_length == 1024 and config.gradient_checkpointing  # the user's object is left alone


def test_unknown_and_doubled_arguments_are_errors_that_name_them(tmp_path):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'max_seq_lenght'.*max_seq_length"):
        ft.SFTTrainer(model=None, max_seq_lenght=10)
    with pytest.raises(TypeError, match=r"both tokenizer= and processing_class="):
        ft.SFTTrainer(model=None, tokenizer=1, processing_class=2)
    with pytest.raises(TypeError, match=r"args=dict is not a SFTConfig or transformers.TrainingArguments"):
        ft.SFTTrainer(model=None, args={"lr": 1})
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'dataset_text_field'"):
        translate_trainer_kwargs("dpo", "DPOTrainer", ["model", "args"], {"dataset_text_field": "text"})
    kwargs, moved = translate_trainer_kwargs("dpo", "DPOTrainer", ["model", "args", "processing_class"],
                                             {"model": 1, "tokenizer": 2, "beta": 0.1, "max_prompt_length": 512})
    assert kwargs == {"model": 1, "processing_class": 2} and moved == {"beta": 0.1}
