"""The recipe schema: all problems at once, overrides, the example, the bundled recipe, docs/cli.md in step."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fasttune.cli import main
from fasttune.cli.recipe import (
    RecipeError,
    all_fields,
    bundled_recipe,
    example_recipe,
    field_table,
    load_recipe,
    parse_overrides,
    recipe_from_dict,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_validate_reports_every_problem_at_once(tmp_path, capsys):
    bad = {"model": {"quantization": "3bit", "max_seq_length": -5}, "lora": {"r": "big", "dropout": 1.5},
           "train": {"learning_rate": "fast", "optimizer": "adam"}, "export": {"gguf": ["q9_9"]}, "extra": {}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "8 problem(s)" in err
    for expected in ("model.quantization: '3bit' is not allowed; allowed: one of 4bit, 8bit, 16bit, full",
                     "model.max_seq_length: -5 is not allowed; allowed: an integer >= 1",
                     "lora.r: 'big' is not allowed; allowed: an integer >= 1",
                     "lora.dropout: 1.5 is not allowed; allowed: a number >= 0 and < 1",
                     "train.learning_rate: 'fast'", "train.optimizer: unknown field", "export.gguf: ['q9_9']",
                     "extra: unknown section"):
        assert expected in err, expected


def test_cross_field_problems_are_reported_with_the_others():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"model": {"quantization": "full", "name": "tiny-gpt"},
                          "export": {"ollama": True, "adapter": True}, "lora": {"r": 0}})
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert any(p.startswith("export.ollama") for p in problems)
    assert any(p.startswith("export.adapter") for p in problems)
    assert any(p.startswith("model.name: 'tiny-gpt'") for p in problems)
    assert recipe_from_dict({"model": {"quantization": "full"}}).export.adapter == "auto"  # auto: no adapter to save


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/elsewhere", "a\\b", "sub/dir", ""])
def test_run_name_must_stay_inside_runs_root(name):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"run": {"name": name}})
    assert info.value.problems == [f"run.name: {name!r} is not allowed; allowed: a plain folder name, without '/' or "
                                   "'\\' (the run folder is <runs_root>/<name>-<timestamp>, inside runs_root); set "
                                   "run.output_dir for a folder elsewhere"]
    assert recipe_from_dict({"run": {"name": "my-run..v2"}}).run.name == "my-run..v2"


def test_open_bounds_refuse_the_bound_itself_and_closed_ones_take_it():
    """Every bounded field at its bounds (a bound written "> 0" once accepted 0), and the open bounds users hit."""
    checked = 0
    for path, f in all_fields():
        meta, (section, key) = f.metadata, path.split(".")
        for bound, is_open in ((meta.get("low"), meta.get("low_open")), (meta.get("high"), meta.get("high_open"))):
            if bound is None:
                continue
            value = int(bound) if meta["kind"] == "int" else float(bound)
            if is_open:
                with pytest.raises(RecipeError, match=rf"{path}: {value!r} is not allowed"):
                    recipe_from_dict({section: {key: value}})
            else:
                problems = []
                try:
                    recipe_from_dict({section: {key: value}})
                except RecipeError as error:
                    problems = [p for p in error.problems if p.startswith(path)]
                assert not problems, problems
            checked += 1
    assert checked >= 10
    for section, key in (("lora", "alpha"), ("train", "learning_rate"), ("train", "epochs")):
        with pytest.raises(RecipeError, match=rf"{section}.{key}: 0(\.0)? is not allowed; allowed: a number > 0"):
            recipe_from_dict({section: {key: 0}})


def test_a_malformed_jsonl_line_is_named_by_validate_and_train(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
    data.write_text(f"{good}\n\n{good}\n{good[:-5]}\n{good}\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": str(data)}}))
    for command in ("validate", "train"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"data.path: {str(data)!r} line 4 is not valid JSON (" in err, err
        assert "allowed: one JSON object per line" in err
    data.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(RecipeError, match=r"line 2 is a JSON list, not an object"):
        load_recipe(path, [])


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora:\n  r: 8\n  alpha: 16\n  r: 64\ntrain:\n  max_steps: 5\ntrain:\n  max_steps: 6\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [])
    assert info.value.problems == [
        "r: written twice (lines 2 and 4); allowed: each key once (YAML would keep the last value without a word)",
        "train: written twice (lines 5 and 7); allowed: each key once (YAML would keep the last value without a word)"]
    with pytest.raises(RecipeError, match=r"lora.r: 100000000000000000000 is not allowed; allowed: an integer >= 1 "
                                          r"and <= 8192"):
        recipe_from_dict({"lora": {"r": 10**20}})


def test_overrides_are_typed_and_applied(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora:\n  r: 8\ntrain:\n  max_steps: 100\n")
    recipe = load_recipe(path, ["--lora.r", "32", "--train.max_steps=5", "--export.gguf", "q4_k_m,q8_0",
                                "--train.gradient_checkpointing", "false", "--data.eval_fraction", "0.1"])
    assert recipe.lora.r == 32 and recipe.train.max_steps == 5
    assert recipe.export.gguf == ["q4_k_m", "q8_0"]
    assert recipe.train.gradient_checkpointing is False and recipe.data.eval_fraction == 0.1
    assert parse_overrides(["--model.name", "org/model"]) == {"model": {"name": "org/model"}}
    with pytest.raises(RecipeError, match="--lora.rank: unknown field"):
        parse_overrides(["--lora.rank", "4"])
    with pytest.raises(RecipeError, match="lora.r: 'x'"):
        load_recipe(path, ["--lora.r", "x"])


def test_relative_paths_in_a_recipe_are_relative_to_its_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  path: data/rows.jsonl\n")
    assert load_recipe(path).data.path == str(tmp_path / "data" / "rows.jsonl")


def test_example_recipe_is_complete_and_valid(tmp_path, capsys):
    assert main(["recipe", "--example"]) == 0
    text = capsys.readouterr().out
    assert text == example_recipe() + "\n"
    parsed = yaml.safe_load(text)
    assert recipe_from_dict(parsed) == recipe_from_dict({})  # every field at its default
    for path, f in all_fields():
        section, name = path.split(".")
        assert name in parsed[section] and f.metadata["help"] in text


def test_bundled_quickstart_recipe_matches_the_quickstart():
    recipe = load_recipe(bundled_recipe("quickstart"))
    assert recipe.model.name == "tiny-llama" and recipe.model.quantization == "4bit"
    assert Path(recipe.data.path).name == "facts.jsonl" and Path(recipe.data.path).is_file()
    assert recipe.data.responses_only is True and recipe.data.chat_template == "llama-3"
    assert (recipe.lora.r, recipe.lora.alpha, recipe.train.max_steps) == (16, 32, 150)
    with pytest.raises(RecipeError, match="not a bundled recipe"):
        bundled_recipe("nope")


def test_docs_field_table_is_generated_from_the_schema():
    text = DOCS.read_text()
    start, end = "<!-- fields:start -->\n", "\n<!-- fields:end -->"
    assert start in text and end in text, "docs/cli.md lost its field-table markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == field_table(), "docs/cli.md is out of date: paste `fasttune recipe --fields` between the markers"
    assert len(table.splitlines()) == len(all_fields()) + 2


def test_every_field_has_help_and_a_valid_default():
    for path, f in all_fields():
        assert f.metadata["help"], path
    recipe_from_dict({})  # the defaults pass their own checks


def test_model_name_takes_a_real_model_a_gguf_file_or_a_folder_holding_one(tmp_path):
    assert recipe_from_dict({"model": {"name": "smollm2-135m-instruct"}}).model.name == "smollm2-135m-instruct"
    gguf = tmp_path / "m" / "model.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert recipe_from_dict({"model": {"name": str(gguf)}}).model.name == str(gguf)
    assert recipe_from_dict({"model": {"name": str(gguf.parent)}}).model.name == str(gguf.parent)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"model": {"name": str(tmp_path / "empty")}})
    assert "a .gguf file or a folder holding one" in info.value.problems[0]
    assert "smollm2-135m-instruct" in info.value.problems[0]
