"""The data page's highlighted tokens are the trainer's labels: the preview (fasttune.studio.preview) against the
batch the real ``fasttune train`` trainer builds (cli.train.build_trainer, its collator) on the same rows."""

from __future__ import annotations

import json

import pytest

from fasttune.cli import data as data_step
from fasttune.cli.recipe import load_recipe
from fasttune.cli.train import build_trainer, chat_tokenizer, load_model
from fasttune.data.masking import IGNORE_INDEX
from fasttune.quickstart import build_base, quickstart_tokenizer
from fasttune.studio.preview import preview

pytestmark = pytest.mark.slow

ROWS = [{"messages": [{"role": "user", "content": "What is the capital of Quven?"},
                      {"role": "assistant", "content": "The capital of Quven is Norlomi."}]},
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "Two turns?"}, {"role": "assistant", "content": "Yes, two."},
                      {"role": "user", "content": "And the second?"}, {"role": "assistant", "content": "Also."}]},
        {"messages": [{"role": "user", "content": "a long question " * 12},
                      {"role": "assistant", "content": "cut off by max_seq_length"}]},
        {"messages": [{"role": "user", "content": "Spell <|eot_id|> please"},
                      {"role": "assistant", "content": "It is <|eot_id|>, as text."}]}]


def _trainer_labels(recipe, base, run_dir):
    model, tokenizer = load_model(recipe, str(base))
    rows, _, fmt = data_step.prepare(recipe.data, recipe.train.method)
    tokenizer = chat_tokenizer(tokenizer, recipe.data.chat_template, fmt)
    trainer = build_trainer(recipe, model, tokenizer, rows, None, fmt, run_dir)
    return [trainer.data_collator([trainer.train_dataset[i]])["labels"][0].tolist()
            for i in range(len(trainer.train_dataset))]


@pytest.mark.parametrize("responses_only", [True, False])
def test_highlighted_tokens_are_the_collators_labels(tmp_path, responses_only):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = build_base(tmp_path / "base")
    recipe = load_recipe(None, ["--model.name", str(base), "--model.max_seq_length", "48", "--model.dtype",
                                "float32", "--data.path", str(data), "--data.chat_template", "llama-3",
                                "--data.responses_only", str(responses_only).lower(), "--lora.r", "4"])
    if responses_only:  # row 2's answer lies beyond max_seq_length: train_on_responses_only refuses such a row
        with pytest.raises(ValueError, match="row 2"):
            _trainer_labels(recipe, base, tmp_path / "run")
        shown = preview(recipe, quickstart_tokenizer(), 0, 10)
        # the dataset checks (check_dataset): row 2 cut off, row 3 spells a control token inside a message
        assert sorted({p["row"] for p in shown["problems"]}) == [2, 3], shown["problems"]
        assert "fully truncated" in next(p["problem"] for p in shown["problems"] if p["row"] == 2)
        assert shown["rows"][2]["problem"] and shown["rows"][2]["trained_tokens"] == 0
        recipe = load_recipe(None, ["--model.name", str(base), "--model.max_seq_length", "128", "--model.dtype",
                                    "float32", "--data.path", str(data), "--data.chat_template", "llama-3",
                                    "--lora.r", "4"])
    expected = _trainer_labels(recipe, base, tmp_path / "run")
    shown = preview(recipe, quickstart_tokenizer(), 0, 10)
    got = [row["labels"] for row in shown["rows"]]
    assert got == expected
    trained = [[t for t, on in row["tokens"] if on] for row in shown["rows"]]
    if responses_only:
        assert "".join(trained[0]) == "The capital of Quven is Norlomi.<|eot_id|>"
        assert "".join(trained[1]) == "Yes, two.<|eot_id|>Also.<|eot_id|>"
        assert "".join(trained[3]) == "It is <|eot_id|>, as text.<|eot_id|>"  # spelt, not a control token
        assert all(any(x == IGNORE_INDEX for x in labels) for labels in got)
    else:
        # every token but each row's first (nothing precedes it to predict it from: the collator masks it)
        assert all(labels[0] == IGNORE_INDEX and IGNORE_INDEX not in labels[1:] for labels in got)


def test_text_rows_for_continued_pretraining(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Quven is a city.", "Norlomi lies by the sea."]))
    base = build_base(tmp_path / "base")
    recipe = load_recipe(None, ["--model.name", str(base), "--model.dtype", "float32", "--data.path", str(data),
                                "--train.method", "pretrain", "--lora.r", "4"])
    shown = preview(recipe, quickstart_tokenizer())
    assert shown["format"] == "text" and shown["trained"] == "every token (highlighted)"
    assert [row["labels"] for row in shown["rows"]] == _trainer_labels(recipe, base, tmp_path / "run")


def test_preference_and_grpo_rows_are_shown_as_parts(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Sky?", "chosen": " blue", "rejected": " red"}) + "\n")
    shown = preview(load_recipe(None, ["--data.path", str(data), "--train.method", "dpo"]), quickstart_tokenizer())
    assert shown["format"] == "preference"
    assert [(p["column"], p["trained"]) for p in shown["rows"][0]["parts"]] == [
        ("prompt", False), ("chosen", True), ("rejected", True)]
    sums = tmp_path / "sums.jsonl"
    sums.write_text(json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n")
    shown = preview(load_recipe(None, ["--data.path", str(sums), "--train.method", "grpo", "--rl.rewards", "exact"]),
                    quickstart_tokenizer())
    assert shown["format"] == "prompt_only" and not any(p["trained"] for p in shown["rows"][0]["parts"])
