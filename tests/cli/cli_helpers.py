"""Helpers of the CLI tests: drive the real ``fasttune`` command in subprocesses (offline, fp32, one thread).

Imported by name (``from cli_helpers import ...``), never ``from conftest``: pytest keeps one module called
``conftest`` per test folder without ``__init__.py``, and which one that name means depends on collection order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FASTTUNE_COMPILE": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# The quickstart recipe, shortened: 8 steps, a checkpoint every 4, a 20% evaluation split, fp32 (never bf16 here).
TINY_RECIPE = {
    "model": {"name": "tiny-llama", "max_seq_length": 96, "quantization": "4bit", "dtype": "float32"},
    "lora": {"r": 8, "alpha": 16},
    "data": {"path": "quickstart-facts", "chat_template": "llama-3", "responses_only": True, "eval_fraction": 0.2},
    "train": {"max_steps": 8, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
              "warmup_steps": 1, "logging_steps": 1, "save_steps": 4, "save_total_limit": 3},
    "export": {"adapter": True},
    "run": {"name": "tiny"},
}


def fasttune(*args: str, cwd: Path, input: str | None = None, timeout: float = 240,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fasttune.cli", *args], cwd=cwd, env={**ENV, **(env or {})},
                          input=input, capture_output=True, text=True, timeout=timeout)


def fasttune_process(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``fasttune`` started in the background (the same environment as :func:`fasttune`); text pipes."""
    return subprocess.Popen([sys.executable, "-m", "fasttune.cli", *args], cwd=cwd, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path
