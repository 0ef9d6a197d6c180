"""The ported Unsloth notebook (test_notebook.py) on a GPU, as the published notebook runs there: ``dtype = None``
(bf16 where supported), 4-bit through bitsandbytes' CUDA kernels, ``bf16 = is_bfloat16_supported()``, the 8-bit
AdamW of bitsandbytes, no ``use_cpu``. ``pytest -m cuda``; skipped with the reason without a GPU."""

from __future__ import annotations

import pytest
import torch
from cuda_testing import DRY_RUN, device
from test_notebook import CONVERSATIONS, _ported_cells, _run

pytestmark = pytest.mark.cuda

# What the published notebook says on a GPU, in place of the CPU test's switches (the dry run keeps CPU's)
GPU_SWITCHES = {
    "dtype = torch.float32": "dtype = None",
    "fp16 = False, bf16 = False, use_cpu = True,":
        "fp16 = not is_bfloat16_supported(), bf16 = is_bfloat16_supported(),",
    'optim = "adamw_torch"': 'optim = "adamw_8bit"',
}


def _gpu_cells(tmp_path) -> list[str]:
    cells = _ported_cells(tmp_path)
    if DRY_RUN:
        return cells
    for old, new in GPU_SWITCHES.items():
        assert sum(old in cell for cell in cells) == 1, f"the notebook no longer says {old!r}"
        cells = [cell.replace(old, new) for cell in cells]
    return cells


def test_ported_notebook_trains_on_the_gpu(tiny_model_dir, tmp_path):
    steps = 6
    ns = _run(_gpu_cells(tmp_path), {
        "MODEL_DIR": str(tiny_model_dir("llama")), "CONVERSATIONS": CONVERSATIONS, "MAX_STEPS": steps,
        "OUTPUT_DIR": str(tmp_path / "outputs"), "SAVE_DIR": str(tmp_path / "lora_model"), "ARGS": "SFTConfig",
    })
    model, trainer = ns["model"], ns["trainer"]
    assert model.device.type == device().type and model.is_loaded_in_4bit
    assert trainer.fasttune_fast_loss
    if not DRY_RUN:
        assert trainer.args.bf16 == torch.cuda.is_bf16_supported() and not trainer.args.use_cpu
        assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
                    ).__module__.startswith("bitsandbytes")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < 0.85 * losses[0], f"the loss did not fall: {losses}"
    assert ns["outputs"].shape[1] > ns["inputs"]["input_ids"].shape[1]  # generated new tokens
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").exists()
