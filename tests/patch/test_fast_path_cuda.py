"""The whole fast path on a GPU (``pytest -m cuda``; skipped with the reason without one): training with it against
peft's forwards (test_convergence's comparison: Triton norms and loss, fused LoRA blocks, padding-free batches), and
checkpointing ("unsloth" offloads layer inputs to pinned CPU memory on CUDA) against no checkpointing, dropout masks
replayed from the CUDA generator."""

from __future__ import annotations

import pytest
import torch
from cuda_testing import device
from test_checkpointing import check_checkpointing, check_dropout_replay
from test_convergence import BF16, BF16_SHAPE, FP32, compare

pytestmark = pytest.mark.cuda
DEV = device()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fp32_convergence_on_gpu(family, tiny_model_dir):
    compare(family, tiny_model_dir(family), FP32, device=DEV)


def test_bf16_convergence_with_unsloth_checkpointing_on_gpu(tiny_model_dir):
    compare("qwen2", tiny_model_dir("qwen2", **BF16_SHAPE), BF16, dtype=torch.bfloat16, checkpoint="unsloth",
            device=DEV)


def test_4bit_convergence_on_gpu(tiny_model_dir):
    compare("llama", tiny_model_dir("llama", **BF16_SHAPE), BF16, dtype=torch.bfloat16, four_bit=True, device=DEV)


@pytest.mark.parametrize("mode", ["unsloth", True])
def test_checkpointing_on_gpu(mode, tiny_model_dir):
    check_checkpointing(mode, tiny_model_dir("gemma3"), DEV)


@pytest.mark.parametrize("mode", ["unsloth", True])
def test_checkpointing_replays_dropout_on_gpu(mode, tiny_model_dir):
    check_dropout_replay(mode, tiny_model_dir("llama"), DEV)
