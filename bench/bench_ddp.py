"""Scale-out benchmark: 2 processes x 1 thread (torchrun, gloo DDP) vs 1 process x 1 thread, same global batch.

    python bench/bench_ddp.py                      # tiny llama hidden 512 x 8 layers, global batch 8, 6 steps
    python bench/bench_ddp.py --hidden 256 --layers 4 --steps 4

Both runs: a fasttune LoRA model (r=16, "unsloth" checkpointing, fast path) in ``fasttune.trl.SFTTrainer`` with its
defaults (fused loss, padding-free batches), fp32, the same synthetic texts, global batch ``--batch`` (split over the
processes), ``--steps`` steps of which the first is warm-up. Figure: trained tokens per second over the timed steps
(tokens carrying a label, summed over ranks), and the ratio. Run it on an otherwise idle machine: with 2 cores, any
other job takes a whole process's core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(opts: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import TrainerCallback

    from fasttune import FastLanguageModel
    from fasttune.tiny import build_tiny_model, build_tokenizer
    from fasttune.trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    folder = Path(opts.workdir) / "model"
    if rank == 0 and not (folder / "config.json").exists():
        build_tiny_model("llama", folder, tokenizer=build_tokenizer("llama"), hidden_size=opts.hidden,
                         intermediate_size=opts.hidden * 11 // 4, num_hidden_layers=opts.layers,
                         num_attention_heads=opts.hidden // 64, num_key_value_heads=max(1, opts.hidden // 256),
                         head_dim=64)
    if world > 1:
        dist.init_process_group("gloo")
        dist.barrier()
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=1024, load_in_4bit=False,
                                                         dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=0)
    words = "the quick brown fox jumps over a lazy dog while seven green tables hold light".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(opts.words)) for i in range(256)]
    args = SFTConfig(output_dir=str(Path(opts.workdir) / f"out{world}"), max_steps=opts.steps,
                     per_device_train_batch_size=opts.batch // world, learning_rate=1e-4, use_cpu=True, bf16=False,
                     report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts}),
                         args=args)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Clock())
    trainer.train()
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]  # cumulative, all ranks
    if rank == 0:
        timed = tokens[-1] - tokens[0]
        print(json.dumps({"world": world, "tokens_per_s": timed / sum(times[1:]), "timed_tokens": timed,
                          "steps_s": times}), flush=True)


def run(world: int, opts: argparse.Namespace, workdir: str) -> dict:
    args = [str(Path(__file__).resolve()), "--worker", "--workdir", workdir, "--hidden", str(opts.hidden),
            "--layers", str(opts.layers), "--batch", str(opts.batch), "--steps", str(opts.steps),
            "--words", str(opts.words)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *args]
           if world > 1 else [sys.executable, *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTTUNE_COMPILE": os.environ.get("FASTTUNE_COMPILE", "0"),
           "PYTHONPATH": str(HERE.parent), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"world": world, "error": proc.stderr[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--words", type=int, default=120, help="words per text (all texts the same length)")
    opts = parser.parse_args()
    if opts.worker:
        worker(opts)
        return
    with tempfile.TemporaryDirectory() as workdir:
        results = [run(1, opts, workdir), run(2, opts, workdir)]
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "steps_s"}) if "error" not in r else r["error"])
    if all("error" not in r for r in results):
        print(f"2 processes x 1 thread vs 1 x 1: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x "
              f"trained tokens/s ({results[0]['tokens_per_s']:.0f} -> {results[1]['tokens_per_s']:.0f})")


if __name__ == "__main__":
    main()
