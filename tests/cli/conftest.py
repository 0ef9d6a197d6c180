"""Fixtures of the CLI tests (the helpers are in cli_helpers.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cli_helpers import TINY_RECIPE, fasttune, write_recipe


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(run folder, finished process) of ``fasttune train`` on TINY_RECIPE, trained once per session."""
    work = tmp_path_factory.mktemp("cli-train")
    recipe = write_recipe(work, TINY_RECIPE)
    done = fasttune("train", str(recipe), "--run.output_dir", str(work / "run"), "--quiet", cwd=work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work / "run", done
