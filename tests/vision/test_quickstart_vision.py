"""The vision quickstart runs end to end on a reduced setting (the full run's figures are in its docstring's run):
pictures and answers are what they claim, the loss falls, the adapter is saved, held-out pictures are new ones."""

from __future__ import annotations

import pytest

from fasttune.quickstart.vision import COLOURS, QUESTIONS, SHAPES, make_rows, parse_args, report, run

pytestmark = pytest.mark.slow


def test_rows_are_seeded_and_held_out_pictures_differ():
    train, again = make_rows(6, seed=0, tasks=("colour", "shape")), make_rows(6, seed=0, tasks=("colour", "shape"))
    held_out = make_rows(6, seed=1, tasks=("colour", "shape"))
    assert [r["answer"] for r in train] == [r["answer"] for r in again]
    assert [r["image"].tobytes() for r in train] == [r["image"].tobytes() for r in again]
    assert not {r["image"].tobytes() for r in train} & {r["image"].tobytes() for r in held_out}
    assert {r["task"] for r in train} == {"colour", "shape"}
    for row in train:
        assert row["answer"] in (COLOURS if row["task"] == "colour" else SHAPES)
        user, assistant = row["messages"]
        assert user["content"][1]["text"] == QUESTIONS[row["task"]]
        assert assistant["content"][0]["text"] == row["answer"]
        # the drawn shape is in the picture: some pixels carry the answer's colour (checked on colour rows)
        if row["task"] == "colour":
            assert COLOURS[row["answer"]] in {rgb for _, rgb in row["image"].getcolors(maxcolors=4096)}


def test_vision_quickstart_end_to_end(tmp_path, capsys):
    args = parse_args(["--steps", "12", "--train-images", "48", "--eval-images", "8", "--task", "colour",
                       "--image-size", "56", "--output-dir", str(tmp_path)])
    result = run(args)
    report(result)
    out = capsys.readouterr().out
    losses = result["losses"]
    assert len(losses) == 4, losses  # logged every 3 steps
    assert losses[-1] < 0.5 * losses[0], f"the training loss did not fall: {losses}"
    # seeded end to end (pictures, base weights, LoRA init, data order), so this holds run after run
    assert result["after"]["colour"] >= result["before"]["colour"], (result["before"], result["after"])
    assert "| What colour is the shape? | 25% |" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_vision_quickstart_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--image-size", "8"])
