"""DDP on CPU (gloo, 2 processes under torchrun) equals one process with the same global batch, with fasttune's
defaults: "unsloth" checkpointing, fused blocks, fused loss, padding-free batches."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.slow


def _run(command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTTUNE_COMPILE": "0"}  # uncompiled kernels: short runs
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    for name, weights in want.items():
        torch.testing.assert_close(torch.as_tensor(got[name]), torch.as_tensor(weights), rtol=1e-4, atol=1e-6,
                                   msg=name)


def _same_gguf(got_path, want_path) -> None:
    """The same GGUF file up to fp32 reduction noise: every key and value, every tensor's name, type and shape, and
    the values (dequantized) within one quantization step, almost all bit-identical."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    got, want = GGUFReader(str(got_path)), GGUFReader(str(want_path))
    assert {k: f.contents() for k, f in got.fields.items() if not k.startswith("GGUF.")} == \
        {k: f.contents() for k, f in want.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.tensor_type, list(t.shape)) for t in got.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in want.tensors]
    same = total = 0
    for g, w in zip(got.tensors, want.tensors):
        same += int((g.data == w.data).sum())
        total += g.data.size
        gv, wv = dequantize(g.data, g.tensor_type), dequantize(w.data, w.tensor_type)
        step = float(abs(wv).max()) / 127 + 1e-3
        assert float(abs(gv - wv).max()) <= step, g.name
    assert same / total > 0.99


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
FSDP2_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "fsdp2.yaml"


def _accelerate_launch() -> list[str]:
    """The repo's FSDP2 config, launched as a user would, on 2 CPU processes in fp32 (a free port: no clashes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port), str(WORKER)]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The single-process reference runs, once for the module: LoRA SFT (with its exports) and QLoRA SFT."""
    here = tmp_path_factory.mktemp("one-process")
    model_dir = str(tiny_model_dir("llama"))
    _run([sys.executable, str(WORKER), model_dir, str(here / "{kind}.json"), "sft+qlora"], here)
    return here


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _projections(model_dir: str) -> int:
    """How many LoRA-targeted base weights the tiny model has: 7 projections per decoder layer."""
    return 7 * _load(Path(model_dir) / "config.json")["num_hidden_layers"]


def _same_exports(got: Path, got_kind: str, want: Path) -> None:
    """Merged weights, GGUF files and the adapter saved after a 2-process run equal the 1-process run's."""
    from safetensors.torch import load_file

    _close(load_file(got / f"{got_kind}-merged2" / "model.safetensors"),
           load_file(want / "sft-merged1" / "model.safetensors"))
    for name in ("model.F16.gguf", "model.Q8_0.gguf"):
        _same_gguf(got / f"{got_kind}-gguf2" / name, want / "sft-gguf1" / name)
    _close(load_file(got / f"{got_kind}-adapter2" / "adapter_model.safetensors"),
           load_file(want / "sft-adapter1" / "adapter_model.safetensors"))


def test_two_process_ddp_equals_one_process(one_process, tiny_model_dir, tmp_path):
    """Losses, LoRA weights and the exports equal one process's; the checkpoint is written once and a run
    resumed from it under DDP continues the same loss curve."""
    model_dir = str(tiny_model_dir("llama"))
    _run([*TORCHRUN, model_dir, str(tmp_path / "{kind}.json"), "sft+resume"], tmp_path)  # resume: a fresh model
    one, two = _load(one_process / "sft.json"), _load(tmp_path / "sft.json")
    assert two["find_unused"] is False  # set by the drop-in: "unsloth" recomputes inside backward
    assert list(one["losses"]) == ["1", "2", "3", "4"] and one["losses"]["4"] < one["losses"]["1"]
    assert list(two["losses"].values()) == pytest.approx(list(one["losses"].values()), rel=1e-5)
    _close(two["lora"], one["lora"])
    _same_exports(tmp_path, "sft", one_process)  # every rank called the saves; rank 0 wrote
    assert (tmp_path / "sft-returned2.txt").read_text() == "None"  # rank 1 skipped
    checkpoints = sorted(p.name for p in (tmp_path / "sft2").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "sft2" / "checkpoint-2" / "adapter_model.safetensors").is_file()

    resumed = _load(tmp_path / "resume.json")
    assert [resumed["losses"][s] for s in ("3", "4")] == pytest.approx([two["losses"][s] for s in ("3", "4")],
                                                                       rel=1e-6)
    _close(resumed["lora"], two["lora"])


def test_accelerate_fsdp2_equals_one_process(one_process, tiny_model_dir, tmp_path):
    """TRL's SFTTrainer under `accelerate launch --config_file examples/accelerate/fsdp2.yaml` (on CPU through
    tests/distributed/cpu_fsdp.py): weights sharded over the ranks, the same losses and LoRA weights as one process,
    sharded checkpoints that resume to the same curve, and merged / GGUF / adapter saves, called on every rank,
    equal to one process's."""
    model_dir = str(tiny_model_dir("llama"))
    _run([*_accelerate_launch(), model_dir, str(tmp_path / "{kind}.json"), "fsdp+fsdp-resume"], tmp_path)
    one, two = _load(one_process / "sft.json"), _load(tmp_path / "fsdp.json")
    assert len(two["sharded"]) == _projections(model_dir)  # every projection's base weight is a DTensor shard
    assert list(two["losses"].values()) == pytest.approx(list(one["losses"].values()), rel=1e-5)
    _close(two["lora"], one["lora"])
    _same_exports(tmp_path, "fsdp", one_process)
    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp agreed with the sharded model's own logits
        assert (tmp_path / "fsdp-validated2.txt").read_text() == "True"
    assert (tmp_path / "fsdp-returned2.txt").read_text() == str(tmp_path / "fsdp-merged2")  # rank 0's result
    saved = sorted(p.name for p in (tmp_path / "fsdp2" / "checkpoint-2").iterdir())
    assert "pytorch_model_fsdp_0" in saved and "optimizer_0" in saved  # the config's SHARDED_STATE_DICT

    resumed = _load(tmp_path / "fsdp-resume.json")  # a fresh model in the same launch
    assert [resumed["losses"][s] for s in ("3", "4")] == pytest.approx([two["losses"][s] for s in ("3", "4")],
                                                                       rel=1e-6)
    _close(resumed["lora"], two["lora"])


@pytest.mark.parametrize("kind", ["qlora", "qlora-ddp"])
def test_qlora_under_fsdp2_and_ddp_equals_one_process(kind, one_process, tiny_model_dir, tmp_path):
    """QLoRA under accelerate's FSDP2 (the Trainer's fsdp_config) and under DDP. In a distributed process the 4-bit
    storage is the compute dtype, so FSDP2 shards the packed weights (with bitsandbytes' uint8 accelerate would leave
    them whole on every rank); losses, LoRA weights and the merged export equal one process's."""
    from safetensors.torch import load_file

    model_dir = str(tiny_model_dir("llama"))
    _run([*TORCHRUN, model_dir, str(tmp_path / "qlora.json"), kind], tmp_path)
    one, two = _load(one_process / "qlora.json"), _load(tmp_path / "qlora.json")
    assert one["sharded"] == [] and len(two["sharded"]) == (_projections(model_dir) if kind == "qlora" else 0)
    assert list(two["losses"].values()) == pytest.approx(list(one["losses"].values()), rel=1e-5)
    _close(two["lora"], one["lora"])
    _close(load_file(tmp_path / "qlora-merged2" / "model.safetensors"),
           load_file(one_process / "qlora-merged1" / "model.safetensors"))


def test_mixture_of_experts_under_ddp_and_fsdp2_equals_one_process(tiny_model_dir, tmp_path):
    """A tiny Qwen3-MoE with LoRA on every expert (the grouped experts in forward and backward): two processes under
    DDP, then under FSDP2 (experts' 3-D weights sharded with the layer), give one process's losses and adapters."""
    model_dir = str(tiny_model_dir("qwen3_moe"))
    _run([sys.executable, str(WORKER), model_dir, str(tmp_path / "one-{kind}.json"), "moe"], tmp_path)
    _run([*TORCHRUN, model_dir, str(tmp_path / "two-{kind}.json"), "moe+moe-fsdp"], tmp_path)
    one = _load(tmp_path / "one-moe.json")
    assert any("experts" in name for name in one["lora"]) and one["losses"]["4"] < one["losses"]["1"]
    for kind in ("moe", "moe-fsdp"):
        two = _load(tmp_path / f"two-{kind}.json")
        assert list(two["losses"].values()) == pytest.approx(list(one["losses"].values()), rel=1e-5), kind
        _close(two["lora"], one["lora"])
    assert any("experts" in name for name in _load(tmp_path / "two-moe-fsdp.json")["sharded"])


def test_two_process_ddp_full_finetuning_equals_one_process(tiny_model_dir, tmp_path):
    model_dir = str(tiny_model_dir("llama"))
    _run([sys.executable, str(WORKER), model_dir, str(tmp_path / "one.json"), "full"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
          model_dir, str(tmp_path / "two.json"), "full"], tmp_path)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["losses"]["4"] < one["losses"]["1"]
    assert list(two["losses"].values()) == pytest.approx(list(one["losses"].values()), rel=1e-5)
    assert any(".mlp.down_proj.weight" in name for name in one["lora"])  # base weights trained and compared
    _close(two["lora"], one["lora"])


def test_find_unused_parameters_with_unsloth_checkpointing_is_refused(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from fasttune.trl import SFTConfig, SFTTrainer
    from tests.trl.trl_helpers import cpu_args, fast_model, text_dataset

    model, tokenizer = fast_model(tiny_model_dir("llama"), checkpointing="unsloth")
    args = SFTConfig(**cpu_args(tmp_path, ddp_find_unused_parameters=True))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True cannot run with "
                                         "use_gradient_checkpointing='unsloth'"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(), args=args)


def test_grpo_trains_under_two_process_ddp(tiny_model_dir, tmp_path):
    """fasttune.trl.GRPOTrainer under DDP: rollouts from the engine on the unwrapped model, the loss's log-probs
    through the DDP wrapper (gradient sync), the dapo normaliser reduced over the ranks."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKER), str(tiny_model_dir("llama")), str(tmp_path / "grpo.json"), "grpo"], tmp_path)
    losses = json.loads((tmp_path / "grpo.json").read_text())["losses"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_preference_trainers_under_ddp_equal_one_process(tiny_model_dir, tmp_path):
    """fasttune.trl's DPO and ORPO: 2 processes x 2 pairs give the same losses and LoRA weights as 1 x 4. ORPO's NLL
    is a token mean over the whole step: fasttune sums the step's chosen tokens over the ranks (TRL's own class takes
    a mean per rank, which weighs a token of a short rank more). Both trainers run in each launch."""
    model_dir = str(tiny_model_dir("llama"))
    _run([sys.executable, str(WORKER), model_dir, str(tmp_path / "one-{kind}.json"), "DPO+ORPO"], tmp_path)
    _run([*TORCHRUN, model_dir, str(tmp_path / "two-{kind}.json"), "DPO+ORPO"], tmp_path)
    for name in ("DPO", "ORPO"):
        one, two = _load(tmp_path / f"one-{name}.json"), _load(tmp_path / f"two-{name}.json")
        assert len(one["losses"]) == 2 and one["losses"][1] != one["losses"][0], name
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-5), name
        _close(two["lora"], one["lora"])


def test_vision_sft_under_ddp_equals_one_process(tmp_path_factory, tmp_path):
    """A tiny Qwen2-VL, LoRA on both towers, trained as Unsloth's vision notebooks do (UnslothVisionDataCollator:
    padding-free packing with 3-D rope positions; images of 4 sizes, answers of 1-3 words): 2 processes x 2
    conversations give the same losses and LoRA weights as 1 x 4."""
    from fasttune.tiny.vision import build_tiny_vlm

    model_dir = str(build_tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("vlm")))
    _run([sys.executable, str(WORKER), model_dir, str(tmp_path / "one.json"), "vision"], tmp_path)
    _run([*TORCHRUN, model_dir, str(tmp_path / "two.json"), "vision"], tmp_path)
    one, two = _load(tmp_path / "one.json"), _load(tmp_path / "two.json")
    assert len(one["losses"]) == 4 and one["losses"][-1] < one["losses"][0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert any(".visual." in name for name in one["lora"])  # the vision tower's adapters are compared too
    _close(two["lora"], one["lora"])


def test_grpo_trains_under_accelerate_fsdp2(tiny_model_dir, tmp_path):
    """fasttune.trl.GRPOTrainer under `accelerate launch --config_file examples/accelerate/fsdp2.yaml`: the rollouts
    run on the sharded model, the policy moves away from the reference (KL > 0 at step 2). Not compared with one
    process: each rank samples its own completions, so no other process count draws the same ones."""
    _run([*_accelerate_launch(), str(tiny_model_dir("llama")), str(tmp_path / "grpo.json"), "grpo-fsdp"], tmp_path)
    result = _load(tmp_path / "grpo.json")
    assert result["sharded"] > 0
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["kl"][0] == 0 and result["kl"][1] > 0


FSDP2_WORKER = Path(__file__).with_name("fsdp2_worker.py")


@pytest.mark.parametrize(("checkpointing", "units", "tuning"), [
    # layer units + LoRA + "unsloth" is what test_accelerate_fsdp2_equals_one_process runs; head/embedding units are
    # covered by full fine-tuning, where the head also trains through the fused loss (suite time: ~30 s per case)
    ("off", "layers", "lora"), ("unsloth", "units", "full"),
])
def test_two_process_fsdp2_equals_one_process(checkpointing, units, tuning, tiny_model_dir, tmp_path):
    """PyTorch FSDP2 (fully_shard, gloo) over a fasttune model: the same losses and trained weights as one
    process, with "unsloth" checkpointing and without, LoRA and full fine-tuning (the head sharded as a unit of its
    own, trained through the fused loss); a sharded checkpoint (model + SGD momentum, written by each rank) resumes
    to the same last step and weights."""
    model_dir = str(tiny_model_dir("llama"))
    args = [checkpointing, "train", units, tuning]
    _run([sys.executable, str(FSDP2_WORKER), model_dir, str(tmp_path / "one.json"), *args], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(FSDP2_WORKER), model_dir, str(tmp_path / "two.json"), *args], tmp_path)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["fused_loss"] and two["fused_loss"]  # no logits: fasttune's fused loss ran, also in the head's unit
    assert one["losses"][-1] < one["losses"][0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["lora"].keys() == two["lora"].keys() and one["lora"]
    if tuning == "full":
        assert "lm_head.weight" in one["lora"]
    for name, weights in one["lora"].items():
        torch.testing.assert_close(torch.tensor(two["lora"][name]), torch.tensor(weights), rtol=1e-4, atol=1e-6,
                                   msg=name)
    shards = sorted(p.name for p in (tmp_path / "dcp2").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = two["resumed"]  # a fresh model in the same launch, from the sharded checkpoint
    assert resumed["losses"] == pytest.approx(two["losses"][2:], rel=1e-6)
    for name, weights in two["lora"].items():
        torch.testing.assert_close(torch.tensor(resumed["lora"][name]), torch.tensor(weights), msg=name)


def test_fsdp2_save_on_rank_zero_only_fails_clearly(tiny_model_dir, tmp_path):
    """Under FSDP2 a save is collective. Guarded by `if rank == 0` it cannot finish: rank 0 gets an error that says
    to call it on every rank (after the arrival timeout, 3 s here) instead of waiting forever, and writes nothing.
    Called on every rank with rank 0's write failing, every rank raises rank 0's error."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(FSDP2_WORKER),
          str(tiny_model_dir("llama")), str(tmp_path / "out.json"), "unsloth", "save-rank0"], tmp_path)
    error = _load(tmp_path / "out.json")["save_error"]
    assert "call save_pretrained_merged on every rank" in error and "Ranks 1 failed" in error
    assert not (tmp_path / "merged").exists()
    # called on every rank with rank 0's write failing (a full disk): every rank raises, none returns as if saved
    zero, one = ((tmp_path / f"collective-error-{r}.txt").read_text() for r in (0, 1))
    assert zero.startswith("OSError: ") and "no space left on the disk holding" in zero, zero
    assert one.startswith("RuntimeError: save_pretrained_merged failed on rank 0: OSError: ") and \
        "no space left" in one, one
    assert not (tmp_path / "merged-all").exists()


def test_each_rank_loads_onto_its_own_gpu(monkeypatch):
    """Under torchrun/accelerate (LOCAL_RANK set) the default device_map is the process's own GPU, not "sequential"
    (which would put every rank's copy on GPU 0 first); without CUDA it is the CPU."""
    from fasttune import device

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device.default_device_map() == {"": "cuda:3"}
    monkeypatch.delenv("LOCAL_RANK")
    assert device.default_device_map() == "sequential"
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device.default_device_map() == {"": "cpu"}


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "multinode"])
def test_accelerate_configs_parse(name):
    """The ready configs of examples/accelerate load with the installed accelerate (they are not run here: no GPUs)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parents[2] / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == ("FSDP" if name == "fsdp2" else "MULTI_GPU")
    assert config.num_processes == (16 if name == "multinode" else 8)
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2 and not config.fsdp_config["fsdp_activation_checkpointing"]


def test_fsdp_activation_checkpointing_with_fasttune_checkpointing_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """`accelerate launch` with fsdp_activation_checkpointing: true on a model with fasttune's checkpointing would
    recompute every layer twice: the trainer refuses at start and names both switches."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from fasttune.trl import SFTConfig, SFTTrainer
    from tests.trl.trl_helpers import cpu_args, fast_model, text_dataset

    model, tokenizer = fast_model(tiny_model_dir("llama"), checkpointing="unsloth")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports for such a config
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(ValueError, match=r"fsdp_activation_checkpointing.*use_gradient_checkpointing='unsloth'"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(), args=SFTConfig(**cpu_args(tmp_path)))
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    model, tokenizer = fast_model(tiny_model_dir("llama"), checkpointing=False)  # FSDP's alone is allowed
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(), args=SFTConfig(**cpu_args(tmp_path)))
