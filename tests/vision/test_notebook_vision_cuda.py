"""Unsloth's Qwen2-VL vision notebook (test_notebook_vision.py) on a GPU, as the published notebook runs there: inputs
``.to("cuda")``, ``bf16 = is_bf16_supported()``, 8-bit AdamW, 4-bit through bitsandbytes' CUDA kernels
(``pytest -m cuda``; skipped with the reason without a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from cuda_testing import DRY_RUN, device
from datasets import Dataset
from test_notebook_vision import CELLS, FORMULAS, _formula_image

from fasttune.port import port_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
from tests.trl.test_notebook import _notebook, _run  # noqa: E402

pytestmark = pytest.mark.cuda

# The published notebook's GPU lines in place of the CPU test's (the CPU dry run keeps the CPU's)
GPU_SWITCHES = {
    '.to("cpu")': '.to("cuda")',
    "fp16 = False, bf16 = False, use_cpu = True,": "fp16 = not is_bf16_supported(), bf16 = is_bf16_supported(),",
    'optim = "adamw_torch"': 'optim = "adamw_8bit"',
}


def test_ported_vision_notebook_trains_on_the_gpu(tiny_vlm_dir, tmp_path):
    path = tmp_path / "Qwen2_VL_(7B)-Vision.ipynb"
    path.write_text(json.dumps(_notebook(CELLS)), encoding="utf-8")
    output, _, _ = port_file(path)
    cells = ["".join(c["source"]) for c in json.loads(output.read_text(encoding="utf-8"))["cells"]]
    if not DRY_RUN:
        for old, new in GPU_SWITCHES.items():
            assert sum(old in cell for cell in cells) == 1, f"the notebook no longer says {old!r}"
            cells = [cell.replace(old, new) for cell in cells]
    dataset = Dataset.from_dict({"image": [_formula_image(f) for f in FORMULAS], "text": FORMULAS})
    ns = _run(cells, {"MODEL_DIR": str(tiny_vlm_dir("qwen2_vl")), "DATASET": dataset, "MAX_STEPS": 6,
                      "OUTPUT_DIR": str(tmp_path / "outputs"), "SAVE_DIR": str(tmp_path / "lora_model")})
    model, trainer = ns["model"], ns["trainer"]
    assert model.device.type == device().type and model.is_loaded_in_4bit and trainer.fasttune_fast_loss
    if not DRY_RUN:
        assert trainer.args.bf16 == torch.cuda.is_bf16_supported() and not trainer.args.use_cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").exists()
