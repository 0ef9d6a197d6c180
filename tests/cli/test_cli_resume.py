"""--resume continues the same loss curve; Ctrl-C saves a checkpoint and prints the command that resumes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import ENV, TINY_RECIPE, fasttune, read_metrics, write_recipe

pytestmark = pytest.mark.slow


def test_resume_continues_from_the_last_checkpoint(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-8", "adapter"))
    (copy / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace(str(run), str(copy)))
    done = fasttune("train", str(copy / "recipe.yaml"), "--resume", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from checkpoint-4" in done.stdout
    full = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    resumed_rows = [r for r in read_metrics(copy) if "loss" in r]
    assert [r["step"] for r in resumed_rows] == list(range(1, 9))  # steps 1-4 kept, 5-8 trained again
    printed = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert printed[0].startswith("step 5/8"), printed[:2]  # the step count continues
    for row in resumed_rows[4:]:
        assert abs(row["loss"] - full[row["step"]]) < 1e-5, (row["step"], row["loss"], full[row["step"]])
    assert (copy / "checkpoints" / "checkpoint-8").is_dir()


def test_resume_from_a_truncated_checkpoint_names_the_file_and_the_intact_one(trained_run, tmp_path):
    """A truncated file in the last checkpoint gave a raw SafetensorError naming no file (before 2026-12-07)."""
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("adapter"))
    (copy / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace(str(run), str(copy)))
    weights = copy / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    done = fasttune("train", str(copy / "recipe.yaml"), "--resume", "--quiet", cwd=tmp_path)
    assert done.returncode == 2
    assert f"--resume: {str(weights)!r} cannot be read (SafetensorError" in done.stderr, done.stderr[-2000:]
    assert "the newest intact one is checkpoint-4: move checkpoint-8 out of" in done.stderr


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command_and_a_second_run_is_locked_out(tmp_path):
    recipe = {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "max_steps": 400, "save_steps": 0},
              "data": {**TINY_RECIPE["data"], "eval_fraction": 0.0}}
    path = write_recipe(tmp_path, recipe)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fasttune.cli", "train", str(path), "--run.output_dir", str(run),
                             "--quiet"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.1)
    # a second run into the same folder is refused while this one writes there (both exited 0 before 2026-12-07)
    second = fasttune("train", str(path), "--run.output_dir", str(run), "--quiet", cwd=tmp_path)
    assert second.returncode == 2 and f"is in use by another fasttune train (pid {proc.pid})" in second.stderr
    assert proc.poll() is None, "the first run should still be training"
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    checkpoints = list((run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].name.split("-")[1])
    assert 1 <= step < 400
    assert f"interrupted at step {step}" in out
    assert f"fasttune train {run / 'recipe.yaml'} --resume" in out
    assert "interrupted" in (run / "report.md").read_text()
