"""One process of the FSDP2 equality test (run by torchrun, or alone for the single-process reference).

argv: model_dir out_json checkpointing [train|resume|save-rank0] [layers|units] [lora|full]. A fasttune LoRA model (fused blocks and loss) sharded with PyTorch's own
FSDP2 (``fully_shard`` on each decoder layer, then on the whole model; gloo on CPU, where accelerate ignores FSDP
configs) trains 3 plain-SGD steps on a global batch of 4 texts of uneven lengths, split over the processes. Each
rank's loss is its label-token sum over the *global* label count times the world size, so FSDP2's gradient average
is the one-process mean. Rank 0 writes the global loss per step and the gathered LoRA weights. After step 2 the
run saves a sharded checkpoint (model and optimizer, torch.distributed.checkpoint: each rank writes its shards);
after ``train`` under several processes a fresh model, in the same processes, loads it and trains step 3 only
(written as ``resumed``; ``resume`` does only that). ``units``: the input embeddings and the LM head are
units of their own (the fused loss then runs inside the head's unit). ``save-rank0``: after training, every rank
calls ``save_pretrained_merged`` with rank 0's write failing (each rank's error is written to
collective-error-<rank>.txt), then only rank 0 calls it (a collective under FSDP2); the error it gets is written. ``full``: full fine-tuning instead of LoRA;
the head, the embeddings and the last layer's weights are written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
from tests.trl.trl_helpers import TEXTS, fast_model  # noqa: E402


def main(model_dir: str, out: str, checkpointing: str, mode: str = "train", units: str = "layers",
         tuning: str = "lora") -> None:
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    result = run(model_dir, out, checkpointing, mode, units, tuning)
    if mode == "train" and world > 1:  # resumed in this launch: one interpreter start less (~6 s per process)
        result["resumed"] = run(model_dir, out, checkpointing, "resume", units, tuning)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run(model_dir: str, out: str, checkpointing: str, mode: str, units: str, tuning: str) -> dict:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    checkpointing = checkpointing if checkpointing != "off" else False
    if tuning == "full":
        from fasttune import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64, dtype="float32",
                                                             full_finetuning=True, load_in_4bit=False,
                                                             use_gradient_checkpointing=checkpointing)
        base = model
    else:
        model, tokenizer = fast_model(model_dir, checkpointing=checkpointing)
        base = model.get_base_model()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        if units == "units":  # embeddings and head as units of their own (docs/scale-out.md: less memory)
            fully_shard(base.model.embed_tokens)
            fully_shard(base.lm_head)
        for layer in base.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2 if tuning == "full" else 1.0,
                                momentum=0.9)
    checkpoint = Path(out).parent / f"dcp{world}"
    first = 0
    if mode == "resume":
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        load(state, checkpoint_id=str(checkpoint))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        first = 2
    batch = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    total = int((labels[:, 1:] != -100).sum())  # every label a next-token prediction scores, all ranks together
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    losses = []
    for step in range(first, 3):
        out_ = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                     labels=labels[rows], num_items_in_batch=total / world)
        out_.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = out_.loss.detach() / world
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss))
        if step == 1 and mode == "train" and world > 1:
            from torch.distributed.checkpoint import save
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(model, optimizer)
            save({"model": model_state, "optim": optim_state}, checkpoint_id=str(checkpoint))
    last = f"layers.{len(base.model.layers) - 1}."
    written = ("lm_head", "embed_tokens", last) if tuning == "full" else ("lora_",)
    lora = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
            for n, p in model.named_parameters() if any(w in n for w in written)}
    result = {"losses": losses, "lora": lora, "fused_loss": out_.logits is None}
    if mode == "save-rank0" and world > 1:
        # first, every rank calls a collective save whose write fails on rank 0: every rank must raise (a rank that
        # returned quietly would look saved)
        import fasttune.export.hf as hf

        write = hf.save_file
        if rank == 0:
            def full_disk(*args, **kwargs):
                raise OSError(28, "No space left on device (injected)")

            hf.save_file = full_disk
        try:
            model.save_pretrained_merged(Path(out).parent / "merged-all", tokenizer)
            failed = "no error"
        except Exception as err:
            failed = f"{type(err).__name__}: {err}"
        hf.save_file = write
        Path(out).with_name(f"collective-error-{rank}.txt").write_text(failed)

    if mode == "save-rank0" and world > 1:  # the mistake: a collective save guarded to rank 0 only
        import datetime
        import time

        import fasttune.distributed

        fasttune.distributed.ARRIVAL_TIMEOUT = datetime.timedelta(seconds=3)
        if rank == 0:
            try:
                model.save_pretrained_merged(Path(out).parent / "merged", tokenizer)
            except RuntimeError as err:
                result["save_error"] = str(err)
        else:
            time.sleep(6)  # elsewhere, not in the save (longer than the 3 s arrival timeout)
    return result


if __name__ == "__main__":
    main(*sys.argv[1:7])
