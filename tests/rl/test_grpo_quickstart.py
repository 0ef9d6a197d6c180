"""The GRPO quickstart runs end to end (few steps here; README gives the full run's figures) and its rewards score
what they claim."""

from __future__ import annotations

import pytest

from fasttune.quickstart.grpo import correctness_reward, format_reward, main, sums

pytestmark = pytest.mark.slow


def _completions(*texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_rewards():
    done = _completions("<answer>4</answer>", " <answer>5</answer>\n", "<answer>4</answer> extra", "4")
    assert format_reward(done) == [0.2, 0.2, 0.0, 0.0]
    assert correctness_reward(done, answer=["4", "4", "4", "4"]) == [1.0, 0.0, 0.0, 0.0]
    assert sums()[5] == {"question": "What is 1 + 2?", "answer": "3"}


def test_grpo_quickstart_end_to_end(tmp_path, capsys):
    assert main(["--sft-steps", "4", "--grpo-steps", "2", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean reward per step (max 1.2): first 1 steps" in out and "greedy answers of all 9 sums" in out
    assert (tmp_path / "grpo_lora" / "adapter_model.safetensors").is_file()


def test_grpo_quickstart_rejects_bad_steps(tmp_path):
    with pytest.raises(SystemExit):
        main(["--grpo-steps", "0", "--output-dir", str(tmp_path)])
