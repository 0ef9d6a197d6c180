"""Resuming from a Trainer checkpoint continues training bit for bit: 4-bit, 8-bit, 16-bit LoRA and full fine-tuning.

Each case trains ``STEPS`` steps uninterrupted (saving checkpoints on the way), then a new model and a new TRL
``SFTTrainer`` resume from the step-``SAVE_EVERY`` checkpoint; every later loss and every final trainable tensor must
be equal (``==`` / ``torch.equal``). The regression this guards: TRL casts a quantized model's adapters to bf16 when
the trainer is built, peft upcasts them to fp32 when a checkpoint is loaded, so resumed QLoRA runs drifted from step 5
(see ``fasttune.lora.precision``). Compute is fp32 where the precision allows it (bf16 matmul is very slow on CPU);
the bf16-compute test checks that the adapters, their optimizer state and the checkpoint stay fp32 there too.
"""

from __future__ import annotations

import shutil
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from resume_helpers import SAVE_EVERY, Case, RunResult, assert_same_training, build, make_trainer, train
from safetensors.torch import load_file

from fasttune.kernels.compiling import use_compile
from fasttune.lora.precision import adapter_dtype_guard, release_adapter_dtype

FP32 = {"dtype": "float32"}
# Two layers keep every kind of layer and the layer-input checkpointing in play; 64 wide keeps bf16 matmul bearable.
SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "head_dim": 16}
CASES = [
    Case("4bit", {"load_in_4bit": True, **FP32}),
    Case("8bit", {"load_in_4bit": False, "load_in_8bit": True, **FP32}),
    Case("16bit-dropout", {"load_in_4bit": False, **FP32}, {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}),
    Case("full", {"load_in_4bit": False, "full_finetuning": True, **FP32}, None),
]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """``uninterrupted(case) -> (model folder, RunResult)``: the run without a break, trained once per case."""
    runs: dict[str, tuple[Path, RunResult]] = {}

    def get(case: Case) -> tuple[Path, RunResult]:
        if case.name not in runs:
            model_dir = tiny_model_dir("llama", **SMALL)
            runs[case.name] = model_dir, train(model_dir, case, tmp_path_factory.mktemp(case.name))
        return runs[case.name]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_resume_is_bit_identical(uninterrupted, tmp_path, case):
    model_dir, full = uninterrupted(case)
    resumed = train(model_dir, case, tmp_path, resume_from=full.checkpoint(SAVE_EVERY))
    assert_same_training(full, resumed, SAVE_EVERY)
    if case.lora is not None:
        assert {w.dtype for w in full.weights.values()} == {torch.float32}


def test_dropout_resume_depends_on_the_saved_rng_state(uninterrupted, tmp_path):
    """Control for the dropout case: without the checkpoint's RNG state the masks, and so the losses, differ.

    This shows the exact-resume comparison can see a resume that loses state (the 16-bit and full cases already
    resumed exactly before the adapter-dtype fix; what they guard is that it stays so).
    """
    model_dir, full = uninterrupted(CASES[2])
    checkpoint = tmp_path / f"checkpoint-{SAVE_EVERY}"
    shutil.copytree(full.checkpoint(SAVE_EVERY), checkpoint)
    (checkpoint / "rng_state.pth").unlink()
    resumed = train(model_dir, CASES[2], tmp_path / "out", resume_from=checkpoint, max_steps=SAVE_EVERY + 1)
    step = SAVE_EVERY + 1
    assert resumed.losses[step] != full.losses[step], "dropout masks did not depend on the restored RNG state"


def test_bf16_qlora_keeps_fp32_adapters_through_sft_trainer(tiny_model_dir, tmp_path):
    """bf16 compute, 4-bit base: one SFTTrainer step leaves adapters, Adam moments and the checkpoint in fp32."""
    small = tiny_model_dir("llama", **SMALL)
    case = Case("4bit-bf16", {"load_in_4bit": True, "dtype": "bfloat16"})
    trainer = make_trainer(small, case, tmp_path, max_steps=1, save_steps=1, per_device_train_batch_size=2,
                           max_length=16)
    assert trainer.model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16  # really bf16 compute
    with use_compile(False):
        trainer.train()
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and {n: p.dtype for n, p in trainable.items() if p.dtype != torch.float32} == {}
    moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert len(moments) == len(trainable) and {m.dtype for m in moments} == {torch.float32}
    saved = load_file(tmp_path / "checkpoint-1" / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}


def test_checkpoint_load_into_cast_adapters_is_exact(tiny_model_dir):
    """Values a bf16 parameter cannot hold load exactly after someone casts the adapters (as TRL does for 4-bit)."""
    model, _ = build(tiny_model_dir("llama", **SMALL), Case("4bit", {"load_in_4bit": True, **FP32}))
    state = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in state.items())


def test_release_adapter_dtype_leaves_a_cast_in_place(tiny_model_dir):
    """The guard can be removed: afterwards nothing undoes a cast (and a second release reports there was none)."""
    model, tokenizer = build(tiny_model_dir("llama", **SMALL), Case("16bit", {"load_in_4bit": False, **FP32}))
    assert adapter_dtype_guard(model) is not None
    assert release_adapter_dtype(model) and not release_adapter_dtype(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.to(torch.bfloat16)
    with torch.no_grad(), use_compile(False):
        model(**tokenizer(["a short text"], return_tensors="pt"))
    assert {p.dtype for p in trainable} == {torch.bfloat16}


def test_deepcopied_model_keeps_its_own_adapters_fp32(tiny_model_dir, tmp_path):
    """A copy (TRL's reference models are deep copies) restores its own parameters, and leaves the original's alone."""
    model, tokenizer = build(tiny_model_dir("llama", **SMALL), Case("16bit", {"load_in_4bit": False, **FP32}))
    copy = deepcopy(model)
    for m in (model, copy):
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    with torch.no_grad(), use_compile(False):
        copy(**tokenizer(["a short text"], return_tensors="pt"))
    assert {p.dtype for p in copy.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
