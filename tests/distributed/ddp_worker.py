"""One process of the DDP equality test (run by torchrun, or alone for the single-process reference).

argv: model_dir out_json [sft|resume|full|grpo] (full: sft's run, fully fine-tuned, no checkpoint). sft trains a fasttune LoRA model (default "unsloth" checkpointing, fast
path on) with fasttune.trl.SFTTrainer for 4 plain-SGD steps (Adam would magnify fp32 reduction-order noise in
near-zero gradients) at a global batch of 4 (split over the processes), checkpointing at step 2; rank 0 writes the
loss per step and the LoRA weights, and saves the merged model. resume reruns from that checkpoint. grpo runs 2 GRPO steps (fasttune.trl.GRPOTrainer) and writes the losses.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
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
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}))


def main(model_dir: str, out: str, kind: str = "sft") -> None:
    if kind == "grpo":
        return grpo(model_dir, out)
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if kind == "full":  # full fine-tuning: every weight trains
        from fasttune import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64, dtype="float32",
                                                             full_finetuning=True, load_in_4bit=False,
                                                             use_gradient_checkpointing="unsloth")
    else:
        model, tokenizer = fast_model(model_dir, checkpointing="unsloth")
    run = Path(out).parent / f"{kind}{world}"
    args = SFTConfig(**cpu_args(run, max_steps=4, per_device_train_batch_size=4 // world,
                                learning_rate=1e-2 if kind == "full" else 1.0, optim="sgd",
                                save_strategy="no" if kind == "full" else "steps", save_steps=2))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=text_dataset(), args=args)
    trainer.train(resume_from_checkpoint=str(Path(out).parent / f"sft{world}" / "checkpoint-2")
                  if kind == "resume" else None)
    if rank == 0:
        if kind == "sft":  # the export a user makes after training, from rank 0
            model.save_pretrained_merged(Path(out).parent / f"merged{world}", tokenizer)
            model.save_pretrained_gguf(Path(out).parent / f"gguf{world}", tokenizer, quantization_method=["f16", "q8_0"])
        lora = {n: p.detach().tolist() for n, p in model.named_parameters()
                if "lora_" in n or (kind == "full" and "layers.1." in n)}  # full: one layer's weights suffice
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        Path(out).write_text(json.dumps({"losses": losses, "lora": lora,
                                         "find_unused": trainer.args.ddp_find_unused_parameters}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
