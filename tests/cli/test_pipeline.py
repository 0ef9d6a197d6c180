"""train -> export -> chat through the real command, and what the run folder holds."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from cli_helpers import TINY_RECIPE, fasttune, read_metrics

pytestmark = pytest.mark.slow


def test_run_folder_holds_recipe_metrics_report_and_adapter(trained_run):
    run, done = trained_run
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["max_steps"] == 8 and resolved["lora"]["r"] == 8
    assert resolved["run"]["output_dir"] == str(run)
    rows = read_metrics(run)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > losses[-1] + 0.5, losses  # it learns
    assert all(r["learning_rate"] >= 0 and r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert any("eval_loss" in r for r in rows)  # the evaluation split was scored
    report = (run / "report.md").read_text()
    assert f"{losses[0]:.4f} -> {losses[-1]:.4f}" in report and "| steps | 8 of 8 |" in report
    assert re.search(r"\| process peak RSS, loading \+ training \| [\d.]+ (MiB|GiB) \| [\d.]+ (MiB|GiB) \| [+-][\d.]+% \|",
                     report), report
    assert "| adapter |" in report
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert "done:" in done.stdout


def test_loss_plot_is_a_real_image_with_a_falling_curve(trained_run):
    from matplotlib.image import imread

    image = imread(str(trained_run[0] / "loss.png"))
    assert image.shape[:2] == (600, 800)
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not blank
    # the training-loss line (tab:blue, #1f77b4) spans the loss panel vertically: it falls from top to bottom
    blue = np.all(np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.08, axis=-1)
    rows = np.nonzero(blue.any(axis=1))[0]
    cols_top = np.nonzero(blue[rows[0]])[0]
    cols_bottom = np.nonzero(blue[rows[-1]])[0]
    assert rows[-1] - rows[0] > 200, "the loss line barely moves vertically"
    assert cols_top.mean() < cols_bottom.mean(), "the loss line should start high (left) and end low (right)"


def test_export_then_merged_reloads_with_transformers(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "export"
    done = fasttune("export", str(run), "--adapter", "--merged", "--gguf", "q8_0", "--ollama", "--out", str(out),
                    "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    gguf = out / "gguf" / "model.Q8_0.gguf"
    assert gguf.is_file() and gguf.read_bytes()[:4] == b"GGUF"
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert "FROM ./model.Q8_0.gguf" in modelfile and "<|eot_id|>" in modelfile
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    ids = tokenizer("What is the capital of Quven?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] >= len(tokenizer) and torch.isfinite(logits).all()
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "llama"


def test_chat_answers_one_turn_from_stdin(trained_run, tmp_path):
    done = fasttune("chat", str(trained_run[0]), "--max-new-tokens", "8", "--min-new-tokens", "2",
                    cwd=tmp_path, input="What is the capital of Quven?\n/exit\n")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "assistant> " in out
    answer = out.split("assistant> ", 1)[1].split("[", 1)[0]
    assert answer.strip(), f"no reply was printed: {out!r}"
    tokens = int(out.split("[", 1)[1].split(" tokens", 1)[0])
    assert 2 <= tokens <= 8


def test_bad_data_path_and_a_run_name_leaving_the_runs_root_are_refused(tmp_path):
    """Both problems at once, and nothing written: a run.name with a path separator would put the run folder outside
    runs_root (``../../escaped`` did, before 2026-12-07)."""
    recipe = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "path": str(tmp_path / "missing.jsonl")},
              "run": {"name": "../../escaped", "runs_root": str(tmp_path / "a" / "b" / "runs")}}
    from cli_helpers import write_recipe

    done = fasttune("train", str(write_recipe(tmp_path, recipe)), cwd=tmp_path)
    assert done.returncode == 2
    assert "data.path" in done.stderr and "missing.jsonl" in done.stderr and "does not exist" in done.stderr
    assert "run.name: '../../escaped' is not allowed; allowed: a plain folder name" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    # bitsandbytes' kernel-probe line (printed at import on AVX512-BF16 CPUs only) is not shown: fasttune.notes
    assert "gemm_4bit_forward" not in done.stderr
