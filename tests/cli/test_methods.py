"""train.method: the built-in GRPO rewards, a named reward file, the format each method needs, and GRPO and DPO runs
through the real ``fasttune train`` (tiny model, two steps each)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import fasttune, write_recipe

from fasttune.cli.data import detect_format
from fasttune.cli.recipe import DataSection, RecipeError, load_recipe
from fasttune.rl.rewards import builtin_reward, load_reward_file

SUMS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(3) for b in range(3)]
COLOURS = [{"prompt": f"The colour of {t} is", "chosen": f" {g}", "rejected": f" {b}"}
           for t, g, b in [("grass", "green", "purple"), ("sky", "blue", "red"), ("snow", "white", "black"),
                           ("coal", "black", "pink")]]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_rewards_score_what_they_say():
    done = ["<answer>4</answer>", "It is 4.0", "<answer>5</answer> more", [{"role": "assistant", "content": "4"}]]
    assert builtin_reward("format", r"<answer>\d+</answer>")(done) == [1.0, 0.0, 0.0, 0.0]
    assert builtin_reward("exact")(done, answer=["4"] * 4) == [0.0, 0.0, 0.0, 1.0]
    assert builtin_reward("numeric", numeric_tolerance=0.5)(done, answer=["4"] * 4) == [1.0, 1.0, 0.0, 1.0]
    assert builtin_reward("numeric", numeric_tolerance=0.5)(["4.6"], answer=["4"]) == [0.0]
    assert builtin_reward("length", target_length=4)(["abcd", "ab", "abcdefghij"]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="no column 'solution'"):
        builtin_reward("exact", answer_field="solution")(["4"], answer=["4"])


def test_reward_file_functions_are_named(tmp_path):
    file = tmp_path / "mine.py"
    file.write_text("def short(completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    (func,) = load_reward_file(file, ["short"])
    assert func(["", "abc"]) == [1.0, 0.25]
    with pytest.raises(ValueError, match=r"'long' is not a function of .*allowed: one of \['short'\]"):
        load_reward_file(file, ["long"])


def test_each_method_detects_its_format(tmp_path):
    spec = DataSection(path="rows.jsonl")
    assert detect_format(["prompt", "answer"], spec, "grpo") == "prompt_only"
    assert detect_format(["prompt", "chosen", "rejected"], spec, "dpo") == "preference"
    assert detect_format(["prompt", "completion", "label"], spec, "kto") == "unpaired_preference"
    assert detect_format(["prompt", "completion", "label"], spec, "sft") == "prompt_completion"
    assert detect_format(["text"], spec, "pretrain") == "text"
    with pytest.raises(RecipeError, match=r"'dpo' cannot train on prompt_only rows .*prompt \+ chosen \+ rejected"):
        detect_format(["prompt", "answer"], spec, "dpo")


def test_grpo_problems_are_listed_at_once(tmp_path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(None, ["--train.method", "grpo", "--rl.num_generations", "3", "--data.format", "text",
                           "--rl.reward_functions", "f"])
    text = str(caught.value)
    assert "3 problem(s)" in text, text
    for part in ("data.format: 'text' is not allowed with train.method 'grpo'", "a divisor of 8",
                 "rl.reward_functions: ['f'] is not allowed with rl.reward_file empty"):
        assert part in text
    with pytest.raises(RecipeError, match="rl.rewards: \\[\\] is not allowed with train.method grpo"):
        load_recipe(None, ["--train.method", "grpo"])


TINY = {"model": {"name": "tiny-llama", "max_seq_length": 64, "dtype": "float32"}, "lora": {"r": 4},
        "train": {"max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 0,
                  "save_steps": 0}}


@pytest.mark.slow
def test_grpo_run_logs_each_reward_and_kl(tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def brevity(completions, **kw):\n    return [1.0 / (1 + len(str(c))) for c in completions]\n")
    recipe = write_recipe(tmp_path, {**TINY, "train": {**TINY["train"], "method": "grpo"},
                                     "data": {"path": str(_jsonl(tmp_path / "sums.jsonl", SUMS))},
                                     "rl": {"rewards": ["numeric", "format"], "reward_file": str(rewards),
                                            "reward_functions": ["brevity"], "max_completion_length": 6,
                                            "num_generations": 4, "beta": 0.1}})
    done = fasttune("train", str(recipe), "--run.output_dir", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("rewards/numeric_reward/mean", "rewards/format_reward/mean", "rewards/brevity/mean", "kl",
                "rss_bytes", "loss"):
        assert all(key in r for r in rows), key
    assert all(0 < r["rewards/brevity/mean"] <= 1 for r in rows)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_dpo_run_trains_on_preference_rows(tmp_path):
    recipe = write_recipe(tmp_path, {**TINY, "train": {**TINY["train"], "method": "dpo", "batch_size": 2},
                                     "data": {"path": str(_jsonl(tmp_path / "pairs.jsonl", COLOURS))}})
    done = fasttune("train", str(recipe), "--run.output_dir", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(preference)" in done.stdout and "training: dpo" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("rewards/margins" in r for r in rows), rows
