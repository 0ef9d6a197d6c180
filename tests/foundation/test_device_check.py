"""scripts/device_check.sh without a GPU: its shell syntax (bash -n, shellcheck where installed), the table it prints
from fake inputs, and its refusal to go on when torch sees no CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device_check.sh"


def _table_module():
    spec = importlib.util.spec_from_file_location("device_table", ROOT / "scripts" / "device_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2"
skipped="3" tests="41" time="93.4"><testcase classname="a" name="b" time="1"/></testsuite></testsuites>"""


def _sft(tmp_path, broken: bool = False) -> Path:
    def run(model, mode, tps, gib, loss):
        return {"model": model, "mode": mode, "tokens_per_s": tps, "peak_rss_gib": 3.0, "peak_cuda_gib": gib,
                "loss_last": loss}

    results = [run("small", "baseline", 1000.0, 8.0, 10.5), run("small", "notebook", 2500.0, 2.0, 10.4),
               run("smollm2", "baseline", 400.0, 4.0, 3.1)]
    results.append({"model": "smollm2", "mode": "notebook", "error": "Traceback...\nRuntimeError: CUDA out of memory"}
                   if broken else run("smollm2", "notebook", 800.0, 3.0, 3.0))
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"machine": {}, "options": {}, "results": results}))
    return path


def _grpo(tmp_path) -> Path:
    results = {"baseline": {"side": "baseline", "step_s": 3.0, "rollout_s": 2.0, "peak_rss_gib": 2.0,
                            "peak_cuda_gib": 6.0},
               "fasttune": {"side": "fasttune", "step_s": 1.0, "rollout_s": 0.5, "peak_rss_gib": 2.0,
                            "peak_cuda_gib": 3.0}}
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps({"options": {}, "results": results}))
    return path


def test_table_from_fake_inputs(tmp_path):
    (tmp_path / "cuda.xml").write_text(JUNIT)
    env = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "memory": "79 GiB", "torch": "2.13.0+cu130",
           "cuda": "13.0", "triton": "3.9.0", "date": "2026-12-07 21:00"}
    (tmp_path / "env.json").write_text(json.dumps(env))
    out = tmp_path / "table.md"
    table = _table_module()
    table.main(["--env", str(tmp_path / "env.json"), "--junit", str(tmp_path / "cuda.xml"), "--sft",
                str(_sft(tmp_path)), "--grpo", str(_grpo(tmp_path)), "--step", "tests=1", "--step", "sft=0",
                "--step", "grpo=124", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[:2] == ["| check | result |", "| --- | --- |"]
    rows = dict(line.strip("| ").split(" | ", 1) for line in lines[2:])
    assert rows["GPU"] == "NVIDIA H100 80GB HBM3 (driver 580.159.04, 79 GiB)"
    assert rows["torch / CUDA"] == "2.13.0+cu130 / CUDA 13.0, triton 3.9.0"
    assert rows["pytest -m cuda"] == "35 passed, 2 failed, 1 errors, 3 skipped in 93 s"
    assert rows["SFT small: notebook vs baseline"] == (
        "2.50x tokens/s (2500 vs 1000); GPU peak 0.25x (2.00 vs 8.00 GiB); last loss 10.4000 vs 10.5000")
    assert rows["SFT smollm2: notebook vs baseline"].startswith("2.00x tokens/s (800 vs 400); GPU peak 0.75x")
    assert rows["GRPO: fasttune vs TRL"] == ("3.00x faster per step (1.00 vs 3.00 s; rollout 0.50 vs 2.00 s); "
                                             "GPU peak 0.50x (3.00 vs 6.00 GiB)")
    assert rows["step pytest -m cuda"] == "exit status 1" and rows["step bench_grpo"] == "stopped at its time limit"
    assert "step bench_sft" not in rows  # a step that succeeded has no row of its own


def test_table_says_what_did_not_run(tmp_path):
    table = _table_module()
    text = table.render(None, None, json.loads(_sft(tmp_path, broken=True).read_text()), None, {"install": 1})
    rows = dict(line.strip("| ").split(" | ", 1) for line in text.splitlines()[2:])
    assert rows["GPU"].startswith("unknown") and rows["pytest -m cuda"] == "did not run (no JUnit report)"
    assert rows["SFT smollm2: notebook vs baseline"] == "ERROR notebook: RuntimeError: CUDA out of memory"
    assert rows["GRPO"] == "did not run (no results file)" and rows["step install"] == "exit status 1"
    with pytest.raises(SystemExit):
        table.main(["--step", "tests"])  # not NAME=STATUS: argparse names the option and exits


def test_script_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="the script is for Linux GPU machines")
def test_without_cuda_the_script_stops_with_the_reason_and_still_prints_the_table(tmp_path):
    if _cuda_here():
        pytest.skip("this machine has a GPU: the script would run the whole check")
    env = dict(os.environ, FASTTUNE_DEVICE_INSTALL="0", PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 1
    assert "ERROR: torch sees no CUDA GPU" in proc.stdout
    table = (tmp_path / "device_check.md").read_text()
    assert "| pytest -m cuda | did not run (no JUnit report) |" in table and "| step cuda | exit status 1 |" in table


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()
