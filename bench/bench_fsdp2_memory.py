"""Memory per rank for full fine-tuning: PyTorch FSDP2 (``fully_shard``) vs DDP, 2 processes, gloo on CPU.

    python bench/bench_fsdp2_memory.py                 # the `small` llama (hidden 1024, 8 layers, vocab 32000)

Each mode runs in its own ``torchrun --standalone --nproc_per_node 2`` job: a fasttune model loaded with
``full_finetuning=True`` (fp32, "unsloth" checkpointing, fused blocks and loss), AdamW, 3 steps on 2 x 256-token rows
per rank. ``ddp`` wraps it in ``DistributedDataParallel``; ``fsdp2`` applies ``fully_shard`` to each decoder layer
and to the model, so weights, gradients and AdamW state are split between the ranks; ``fsdp2_units`` also makes the
input embeddings and the LM head units of their own (fasttune's fused loss then runs inside the head's unit; the
embeddings' unit is not gathered for backward, ``set_unshard_in_backward(False)``: its gradient needs only the token
ids). Figures: each rank's peak RSS (``resource.getrusage``), the
larger of the two ranks, and FSDP2's over DDP's; also the peak above what the process held after its imports,
before loading the model (the part that scales with the model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, vocab_size=32000)


def worker(mode: str, folder: str) -> None:
    import torch
    import torch.distributed as dist

    from fasttune import FastLanguageModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    before_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Python, torch, fasttune imported
    model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=512, dtype="float32", load_in_4bit=False,
                                                 full_finetuning=True, use_gradient_checkpointing="unsloth")
    model.train()
    if mode in ("fsdp2", "fsdp2_units"):
        from torch.distributed.fsdp import fully_shard

        if mode == "fsdp2_units":  # the embeddings and the head as units of their own: the root unit (norm only)
            fully_shard(model.model.embed_tokens)  # no longer gathers vocab x hidden twice for the whole step
            # the embedding's backward needs only the token ids, never its weight: do not gather it again for it
            model.model.embed_tokens.set_unshard_in_backward(False)
            fully_shard(model.lm_head)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(3):
        ids = torch.randint(10, 32000, (2, 256), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, (peak, before_load))
    if rank == 0:
        print(json.dumps({"mode": mode, "peak_rss_gib": [p for p, _ in peaks],
                          "above_imports_gib": [p - b for p, b in peaks], "loss": float(loss)}), flush=True)
    del model, optimizer  # DDP's reducer before its process group: freed after it, gloo's destructor can deadlock
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["ddp", "fsdp2", "fsdp2_units"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.folder)
        return
    from fasttune.tiny import build_tiny_model, build_tokenizer

    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTTUNE_COMPILE": "0", "PYTHONPATH": str(HERE.parent),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        folder = build_tiny_model("llama", Path(workdir) / "small", tokenizer=build_tokenizer("llama"), **SMALL)
        for mode in ("ddp", "fsdp2", "fsdp2_units"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(Path(__file__).resolve()), "--worker", mode, "--folder", str(folder)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            results[mode] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-1500:]}
            print(json.dumps(results[mode]), flush=True)
    if all("error" not in r for r in results.values()):
        ddp, ddp_up = max(results["ddp"]["peak_rss_gib"]), max(results["ddp"]["above_imports_gib"])
        for mode in ("fsdp2", "fsdp2_units"):
            fsdp, up = max(results[mode]["peak_rss_gib"]), max(results[mode]["above_imports_gib"])
            print(f"peak RSS per rank, full fine-tuning of `small`: DDP {ddp:.2f} GiB, {mode} {fsdp:.2f} GiB "
                  f"({fsdp / ddp:.2f}x); above the imports: DDP {ddp_up:.2f}, {mode} {up:.2f} GiB ({up / ddp_up:.2f}x)")


if __name__ == "__main__":
    main()
