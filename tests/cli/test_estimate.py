"""fasttune estimate against real ``fasttune train`` runs: the process's peak resident memory while it loads and
trains (runtime included, glibc's default allocator: the figure a user compares with the machine's memory), within
15%, on four recipes (fresh processes, the compute dtype this machine picks):

- the quickstart recipe (``fasttune train --recipe quickstart``, the tiny Llama, 4-bit, batch 8 x 128; 5 steps);
- a real model: SmolLM2-135M-Instruct, 4-bit LoRA, batch 2 x 512 tokens of long text rows (2 steps);
- a long sequence: a small Llama-architecture model (hidden 512, 4 layers), 4-bit LoRA, one row of 8192 tokens
  (2 steps);
- and full fine-tuning (no LoRA: gradients and AdamW moments of every weight) of that model in fp32, 2 x 128
  tokens (2 steps).

The four run at once, one thread each: a process's peak memory does not depend on sharing the machine.

The run's report shows the prediction beside the measurement; the standalone ``fasttune estimate`` (which measures the
runtime in its own process) is checked against the quickstart run. README "Command line" has the measured table.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from cli_helpers import fasttune_process

pytestmark = pytest.mark.slow

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64)
MAX_ERROR = 0.15
ROW = re.compile(r"\| process peak RSS, loading \+ training \| ([\d.]+) (MiB|GiB) \| ([\d.]+) (MiB|GiB) \|")


def _bytes(value: str, unit: str) -> float:
    return float(value) * (2**20 if unit == "MiB" else 2**30)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from fasttune.quickstart import load_facts, quickstart_tokenizer
    from fasttune.tiny import build_tiny_model

    work = tmp_path_factory.mktemp("estimate")
    build_tiny_model("llama", work / "model", tokenizer=quickstart_tokenizer(), **SHAPE)
    words = " ".join(f"{row['instruction']} {row['output']}" for row in load_facts()).split()
    rng = random.Random(0)
    with (work / "long.jsonl").open("w") as out:  # rows longer than max_seq_length: every row is cut to full length
        for _ in range(8):
            out.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(7000))}) + "\n")
    return work


def _recipes(work):
    common = ["--train.gradient_accumulation_steps", "1", "--train.save_steps", "0", "--export.adapter", "false",
              "--run.runs_root", str(work / "runs")]
    long_rows = ["--data.path", str(work / "long.jsonl"), "--model.quantization", "4bit"]
    return {
        "quickstart": ["--recipe", "quickstart", "--train.max_steps", "5", *common],
        "smollm2": ["--model.name", "smollm2-135m-instruct", *long_rows, "--model.max_seq_length", "512",
                    "--train.batch_size", "2", "--train.max_steps", "2", *common],
        "long-sequence": ["--model.name", str(work / "model"), *long_rows, "--model.max_seq_length", "8192",
                          "--train.batch_size", "1", "--train.max_steps", "2", *common],
        "full-finetuning": ["--model.name", str(work / "model"), "--data.path", str(work / "long.jsonl"),
                            "--model.quantization", "full", "--model.dtype", "float32", "--model.max_seq_length", "128",
                            "--train.batch_size", "2", "--train.max_steps", "2", *common],
    }


@pytest.fixture(scope="module")
def runs(work):
    """The three runs, started together (one thread each; peak memory does not depend on the machine being shared):
    name -> (predicted bytes, measured bytes) from each run's report; "standalone": fasttune estimate's output."""
    started = {name: fasttune_process("train", *args, "--run.name", name, "--quiet", cwd=work)
               for name, args in _recipes(work).items()}
    alone = fasttune_process("estimate", *_recipes(work)["quickstart"], cwd=work)  # in a process of its own
    out = {}
    for name, process in started.items():
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
        report = next((work / "runs").glob(f"{name}-*/report.md")).read_text()
        found = ROW.search(report)
        assert found, report
        out[name] = (_bytes(*found.groups()[:2]), _bytes(*found.groups()[2:]))
    stdout, stderr = alone.communicate(timeout=300)
    assert alone.returncode == 0, stderr[-3000:]
    out["standalone"] = stdout
    return out


@pytest.mark.parametrize("name", ["quickstart", "smollm2", "long-sequence", "full-finetuning"])
def test_predicted_peak_within_15_percent_of_the_run(runs, name):
    predicted, measured = runs[name]
    error = (predicted - measured) / measured
    print(f"{name}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, error {error:+.1%}")
    assert abs(error) <= MAX_ERROR, f"{name}: predicted {predicted / 2**20:.1f} MiB vs measured {measured / 2**20:.1f}"


def test_the_standalone_command_predicts_the_quickstart_run(runs):
    """``fasttune estimate`` measures the runtime in its own process; the rest from the config, as the run did."""
    shown = runs["standalone"]
    alone = int(re.search(r"estimate_bytes=(\d+)", shown).group(1))
    measured = runs["quickstart"][1]
    assert "tokens/s" not in shown.replace("tokens/s are not predicted", "")
    print(f"standalone: predicted {alone / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(alone - measured) / measured <= MAX_ERROR, shown
