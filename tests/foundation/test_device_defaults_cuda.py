"""What a user gets on a GPU without asking (``pytest -m cuda``; skipped with the reason without one): bf16 where the
GPU has it, trainer switches that start there, and ``from_pretrained`` placing the model on the GPU by itself."""

from __future__ import annotations

import pytest
import torch
from cuda_testing import DRY_RUN

from fasttune import FastLanguageModel
from fasttune.device import default_device_map, default_dtype, device_args

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _gpu_only():
    if DRY_RUN:
        pytest.skip("these are the defaults of a machine with a GPU; the CPU dry run has none")


def test_device_facts_on_a_gpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    bf16 = torch.cuda.is_bf16_supported()
    assert default_dtype() == (torch.bfloat16 if bf16 else torch.float16)
    assert device_args() == {"bf16": bf16, "fp16": not bf16, "use_cpu": False}
    assert default_device_map() == "sequential"


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_from_pretrained_puts_the_model_on_the_gpu(tiny_model_dir, monkeypatch, load_in_4bit):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), max_seq_length=64,
                                                         load_in_4bit=load_in_4bit)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert model.dtype == default_dtype() and model.is_loaded_in_4bit == load_in_4bit
    FastLanguageModel.for_inference(model)
    ids = tokenizer("Hello there", return_tensors="pt").to(model.device)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1] == tokenizer.eos_token_id
