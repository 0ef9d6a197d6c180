"""One process of the DDP equality test (run by torchrun, or alone for the single-process reference).

argv: model_dir out_json kind. sft trains a fasttune LoRA model (default "unsloth" checkpointing, fast path on) with
fasttune.trl.SFTTrainer for 4 SGD steps with momentum (Adam would magnify fp32 reduction-order noise in near-zero gradients)
at a global batch of 4 (split over the processes), checkpointing at step 2; rank 0 writes the loss per step and the
LoRA weights, and saves the merged model and GGUF files. resume reruns from that checkpoint. full: sft's run, fully
fine-tuned, no checkpoint. moe / moe-fsdp: sft's run on a mixture of experts (LoRA on every expert), no saves,
moe-fsdp under the Trainer's FSDP2 options (one unit per decoder layer). grpo runs 2 GRPO steps (fasttune.trl.GRPOTrainer) and writes the losses and KLs;
grpo-fsdp does the same under `accelerate launch` with examples/accelerate/fsdp2.yaml. DPO / ORPO: 2 preference
steps. vision: a tiny Qwen2-VL trained with the padding-free image-text collator.

fsdp / fsdp-resume / qlora: the same under accelerate's FSDP2, one unit per decoder layer (fsdp: started by
``accelerate launch`` with the repo's examples/accelerate/fsdp2.yaml; qlora: the Trainer's ``fsdp_config`` under
torchrun; ``cpu_fsdp`` lets accelerate run FSDP on CPU). fsdp saves its exports from every rank, as a ported notebook
does (under FSDP2 a save is collective; rank 0 writes). qlora loads the base in 4 bits and exports merged weights;
qlora-ddp is the same under plain DDP.
With one process the fsdp kinds run without FSDP: the reference.

Several kinds joined by "+" run one after the other in the same processes (one interpreter start, one process group:
a launch costs ~6 s of imports per process on 2 cores); out_json then holds ``{kind}``, replaced by each kind's name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
from fasttune.lora.unwrap import base_model  # noqa: E402
from fasttune.trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from tests.trl.trl_helpers import cpu_args, fast_model, text_dataset  # noqa: E402


def length_reward(completions, **kwargs):
    return [len(c) / 10 for c in completions]


def grpo(model_dir: str, out: str) -> None:
    from datasets import Dataset

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tokenizer = fast_model(model_dir, checkpointing="unsloth", max_seq_length=128)
    args = GRPOConfig(**cpu_args(Path(out).parent / f"grpo{world}", max_steps=2, per_device_train_batch_size=8 // world),
                      num_generations=4, max_completion_length=8, beta=0.04, loss_type="dapo")
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[length_reward], args=args,
                          train_dataset=Dataset.from_dict({"prompt": [f"Count {i}:" for i in range(16)]}))
    trainer.train()
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                                         "kl": [h["kl"] for h in trainer.state.log_history if "kl" in h],
                                         "sharded": sharded}))


def preference(model_dir: str, out: str, name: str) -> None:
    """2 SGD steps of DPO or ORPO (fasttune.trl's drop-ins) at a global batch of 4 pairs; writes losses and LoRA."""
    import fasttune.trl as ft
    from tests.rl.rl_helpers import preference_dataset

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tokenizer = fast_model(model_dir, checkpointing="unsloth")
    args = getattr(ft, f"{name}Config")(**cpu_args(Path(out).parent / f"{name}{world}", max_steps=2,
                                                  per_device_train_batch_size=4 // world, optim="sgd",
                                                  learning_rate=1.0, max_grad_norm=0.0))
    trainer = getattr(ft, f"{name}Trainer")(model=model, processing_class=tokenizer, args=args,
                                           train_dataset=preference_dataset())
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "lora": {n: p.detach().tolist() for n, p in model.named_parameters() if "lora_" in n}}))


def vision(model_dir: str, out: str) -> None:
    """4 SGD steps of a tiny Qwen2-VL (LoRA on both towers) with fasttune's padding-free image-text collator, as
    Unsloth's vision notebooks train, at a global batch of 4 conversations; writes losses and LoRA weights."""
    from fasttune import FastVisionModel
    from fasttune.vision import UnslothVisionDataCollator
    from tests.vision.vision_helpers import COLOURS, circle, conversation

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, processor = FastVisionModel.from_pretrained(model_dir, load_in_4bit=False, dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, random_state=7)
    FastVisionModel.for_training(model)
    names = list(COLOURS)
    rows = [conversation(circle(names[i % 3], 40 + 8 * (i % 4)), answer=" ".join([names[i % 3]] * (1 + i % 3)))
            for i in range(16)]  # uneven image sizes and answer lengths: uneven label counts per rank
    args = SFTConfig(**cpu_args(Path(out).parent / f"vision{world}", max_steps=4, per_device_train_batch_size=4 // world,
                                optim="sgd", optim_args="momentum=0.9", learning_rate=0.5),
                     remove_unused_columns=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
                     max_length=1024)
    trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=UnslothVisionDataCollator(model, processor),
                         train_dataset=rows, args=args)
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "lora": {n: p.detach().tolist() for n, p in model.named_parameters() if "lora_" in n}}))


FSDP_KINDS = ("fsdp", "fsdp-resume", "qlora", "grpo-fsdp", "moe-fsdp")


def main(model_dir: str, out: str, kinds: str = "sft") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and any(kind in FSDP_KINDS for kind in kinds.split("+")):
        from tests.distributed.cpu_fsdp import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    for kind in kinds.split("+"):
        run(model_dir, out.replace("{kind}", kind), kind)


def run(model_dir: str, out: str, kind: str) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    fsdp = kind in FSDP_KINDS and world > 1
    if kind.startswith("grpo"):
        return grpo(model_dir, out)
    if kind in ("DPO", "ORPO"):
        return preference(model_dir, out, kind)
    if kind == "vision":
        return vision(model_dir, out)
    torch.set_num_threads(1)
    if kind == "full":  # full fine-tuning: every weight trains
        from fasttune import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64, dtype="float32",
                                                             full_finetuning=True, load_in_4bit=False,
                                                             use_gradient_checkpointing="unsloth")
    else:
        model, tokenizer = fast_model(model_dir, checkpointing="unsloth", load_in_4bit=kind.startswith("qlora"))
    here = Path(out).parent
    # fsdp / fsdp-resume run under `accelerate launch --config_file examples/accelerate/fsdp2.yaml` (its environment
    # configures FSDP2); qlora under torchrun, configured by the Trainer's own fsdp options
    layer = type(base_model(model).model.layers[0]).__name__
    fsdp_args = dict(fsdp="full_shard auto_wrap", fsdp_config={
        "fsdp_version": 2, "transformer_layer_cls_to_wrap": [layer], "reshard_after_forward": True,
    }) if fsdp and kind in ("qlora", "moe-fsdp") else {}
    saves = kind in ("sft", "resume", "fsdp", "fsdp-resume")
    args = SFTConfig(**cpu_args(here / f"{kind}{world}", max_steps=4, per_device_train_batch_size=4 // world,
                                learning_rate=1e-2 if kind == "full" else 1.0, optim="sgd",
                                optim_args="momentum=0.9",  # optimizer state: resume must restore it
                                save_strategy="steps" if saves else "no", save_steps=2), **fsdp_args)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(), args=args)
    resume = {"resume": "sft", "fsdp-resume": "fsdp"}.get(kind)
    trainer.train(resume_from_checkpoint=str(here / f"{resume}{world}" / "checkpoint-2") if resume else None)
    from torch.distributed.tensor import DTensor

    # the DTensor shards gathered (a collective: every rank), then rank 0 writes
    lora = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().tolist()
            for n, p in model.named_parameters() if "lora_" in n or (kind == "full" and "layers.1." in n)}
    sharded = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor) and "base_layer" in n)
    exported = None
    if kind.startswith("qlora"):
        exported = model.save_pretrained_merged(here / f"qlora-merged{world}", tokenizer)
    elif kind in ("sft", "fsdp"):  # every rank calls, as a ported notebook does: rank 0 writes
        exported = model.save_pretrained_merged(here / f"{kind}-merged{world}", tokenizer)
        # fsdp: validated in llama.cpp where it is installed (the check's forward runs on rank 0 inside the gather)
        validate = kind == "fsdp" and importlib.util.find_spec("llama_cpp") is not None
        model.save_pretrained_gguf(here / f"{kind}-gguf{world}", tokenizer, quantization_method=["f16", "q8_0"],
                                   validate=validate)
        (here / f"{kind}-validated{world}.txt").write_text(str(validate))
        model.save_pretrained(here / f"{kind}-adapter{world}")
    if rank == world - 1 and kind in ("sft", "fsdp", "qlora"):  # the last rank: under FSDP2 it gets rank 0's result
        (here / f"{kind}-returned{world}.txt").write_text(str(exported))
    if rank == 0:
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        Path(out).write_text(json.dumps({"losses": losses, "lora": lora, "sharded": sharded,
                                         "find_unused": trainer.args.ddp_find_unused_parameters}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
