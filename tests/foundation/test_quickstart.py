"""The quickstart runs end to end (few steps here; the full run is the README's first command)."""

from __future__ import annotations

import json

import pytest

from fasttune.cli import main as cli_main
from fasttune.quickstart.__main__ import load_facts, main


def test_bundled_facts_are_well_formed():
    facts = load_facts()
    assert len(facts) == 24
    assert len({f["instruction"] for f in facts}) == 24
    for f in facts:
        planet = f["instruction"].removeprefix("What is the capital of ").removesuffix("?")
        assert f["output"].startswith(f"The capital of {planet} is ")


def test_quickstart_end_to_end(tmp_path, capsys):
    assert main(["--tiny", "--steps", "6", "--eval-questions", "3", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "exact answers (of 3)" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "base_model")
    assert (tmp_path / "base_model" / "config.json").is_file()


def test_quickstart_rejects_bad_steps(tmp_path):
    with pytest.raises(SystemExit):
        main(["--steps", "0", "--output-dir", str(tmp_path)])


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli_main(["nonsense"])
