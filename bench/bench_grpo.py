"""GRPO step benchmark: fasttune (``FastLanguageModel`` + ``fasttune.trl.GRPOTrainer``) vs TRL's ``GRPOTrainer`` on
plain transformers + peft, per /work/shared/BENCHMARKS.md. Each side runs in its own process.

    python bench/bench_grpo.py                         # default: tiny llama hidden 512 x 8 layers, vocab 32000
    python bench/bench_grpo.py --steps 4 --completion 128 --threads 1

Both sides: the same random llama (``fasttune.tiny``, ``--hidden`` x ``--layers``, ``--vocab``), LoRA r=16 alpha=16 on
all linear projections, fp32 (bf16 with ``--device cuda``), the same prompts (``--prompts`` distinct prompts of
~``--prompt-len`` tokens), GRPOConfig (``per_device_train_batch_size`` = prompts x ``--num-generations``,
``max_completion_length=--completion``, beta 0.04, loss_type grpo, temperature 1, seed 0, AdamW, lr 1e-5), a length
reward, ``--steps`` steps after one warm-up step.
The random model rarely samples eos, so nearly every completion has ``--completion`` tokens on both sides.

* ``baseline``: ``AutoModelForCausalLM`` + ``peft.get_peft_model`` in ``trl.GRPOTrainer`` (gradient checkpointing on,
  TRL's default; its fused LM head; ``model.generate`` rollouts).
* ``fasttune``: ``FastLanguageModel.from_pretrained(load_in_4bit=False)`` + ``get_peft_model`` (fast path, "unsloth"
  checkpointing) in ``fasttune.trl.GRPOTrainer`` (fasttune rollout engine, completion-only log-probs, window loss).

Figures: seconds per optimizer step (median of the timed steps), of which rollout (TRL's own ``profiling`` timers are
not used; a wrapper around ``_generate_single_turn`` times it), peak RSS of the process.
Results go to bench/results/grpo-<UTC time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIDES = ("baseline", "fasttune")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def length_reward(completions, **kwargs):
    return [len(c) / 100 for c in completions]


def build(opts: argparse.Namespace, workdir: str):
    import torch
    from datasets import Dataset

    from fasttune.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer("llama")
    folder = build_tiny_model("llama", Path(workdir) / "model", tokenizer=tokenizer, vocab_size=opts.vocab,
                              hidden_size=opts.hidden, intermediate_size=opts.hidden * 11 // 4,
                              num_hidden_layers=opts.layers, num_attention_heads=opts.hidden // 64,
                              num_key_value_heads=max(1, opts.hidden // 256), head_dim=64)
    generator = torch.Generator().manual_seed(opts.seed)
    words = ["alpha", "river", "stone", "cloud", "seven", "green", "table", "light"]
    prompts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (opts.prompt_len,),
                                                             generator=generator)) for _ in range(opts.prompts)]
    dataset = Dataset.from_dict({"prompt": prompts * 64})
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32  # bf16 on a GPU, per BENCHMARKS.md
    if opts.side == "baseline":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config_cls, trainer_cls = GRPOConfig, GRPOTrainer
    else:
        from fasttune import FastLanguageModel
        from fasttune.trl import GRPOConfig, GRPOTrainer

        model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=2048, load_in_4bit=False,
                                                             dtype=dtype, device_map={"": opts.device})
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=opts.seed)
        config_cls, trainer_cls = GRPOConfig, GRPOTrainer
    args = config_cls(output_dir=str(Path(workdir) / "out"), max_steps=opts.steps + 1,
                      per_device_train_batch_size=opts.prompts * opts.num_generations,
                      num_generations=opts.num_generations, max_completion_length=opts.completion, beta=0.04,
                      loss_type="grpo", temperature=1.0, learning_rate=1e-5, use_cpu=opts.device == "cpu",
                      bf16=dtype == torch.bfloat16,
                      report_to=[], save_strategy="no", logging_steps=1, seed=opts.seed, disable_tqdm=True,
                      gradient_checkpointing=True)
    return trainer_cls(model=model, processing_class=tokenizer, reward_funcs=[length_reward], args=args,
                       train_dataset=dataset)


def run_worker(opts: argparse.Namespace) -> dict:
    import torch
    from bench_sft import peak_memory, sync  # bench/ is sys.path[0] when run as a script
    from transformers import TrainerCallback

    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = build(opts, workdir)
        steps: list[float] = []
        rollouts: list[float] = []
        rollout_now = [0.0]
        real = trainer._generate_single_turn

        def timed_generate(*args, **kwargs):
            sync(opts.device)
            start = time.perf_counter()
            out = real(*args, **kwargs)
            sync(opts.device)
            rollout_now[0] += time.perf_counter() - start
            return out

        trainer._generate_single_turn = timed_generate

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                sync(opts.device)
                self.start = time.perf_counter()
                rollout_now[0] = 0.0

            def on_step_end(self, *a, **k):
                sync(opts.device)
                steps.append(time.perf_counter() - self.start)
                rollouts.append(rollout_now[0])

        trainer.add_callback(Clock())
        trainer.train()
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"side": opts.side, "step_s": statistics.median(steps[1:]), "rollout_s": statistics.median(rollouts[1:]),
            "steps_s": steps, "mean_completion": statistics.mean(lengths[1:]),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **peak_memory(opts.device)}


WORKER_OPTIONS = ("hidden", "layers", "vocab", "prompts", "num_generations", "prompt_len", "completion", "steps",
                  "threads", "seed", "device")


def spawn(side: str, opts: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side]
    for name in WORKER_OPTIONS:
        cmd += ["--" + name.replace("_", "-"), str(getattr(opts, name))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent),
           "OMP_NUM_THREADS": str(opts.threads), "FASTTUNE_COMPILE": os.environ.get("FASTTUNE_COMPILE", "0")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"side": side, "error": proc.stderr[-3000:]}
    return json.loads(lines[-1])


def table(results: dict[str, dict]) -> str:
    """Memory: the GPU's peak where the runs were on CUDA, else the process's peak RSS."""
    key = "peak_cuda_gib" if any("peak_cuda_gib" in r for r in results.values()) else "peak_rss_gib"
    head = (f"{'side':9} {'s/step':>7} {'x base':>7} {'rollout s':>9} {'completion':>10} "
            f"{'GPU GiB' if key == 'peak_cuda_gib' else 'RSS GiB':>8} {'x base':>7}")
    out = [head, "-" * len(head)]
    base = results.get("baseline")
    for side in SIDES:
        r = results[side]
        if "error" in r:
            out.append(f"{side:9} ERROR: {r['error'].strip().splitlines()[-1][:90]}")
            continue
        t = r["step_s"] / base["step_s"] if base and "error" not in base else float("nan")
        m = r[key] / base[key] if base and "error" not in base else float("nan")
        out.append(f"{side:9} {r['step_s']:7.2f} {t:7.2f} {r['rollout_s']:9.2f} {r['mean_completion']:10.1f} "
                   f"{r[key]:8.2f} {m:7.2f}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=SIDES, default=None, help="run one side in this process and print JSON")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48, help="words per prompt")
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where both sides run: cpu in fp32; cuda in bf16 (GPU peak: torch.cuda.max_memory_allocated)")
    opts = parser.parse_args()
    if opts.side:
        print(json.dumps(run_worker(opts)), flush=True)
        return
    from bench_sft import machine  # bench/ is sys.path[0] when run as a script

    info = machine()
    gpu = f"{info['gpu']} (CUDA {info['cuda']}), " if opts.device == "cuda" else ""
    print(f"# {gpu}{info['cpu']}, {info['cores']} cores, {opts.threads} threads, "
          f"{'bf16' if opts.device == 'cuda' else 'fp32'}, torch {info['torch']}, "
          f"{info['date_utc']} UTC; llama hidden {opts.hidden} x {opts.layers} layers, "
          f"vocab {opts.vocab}; {opts.prompts} prompts x {opts.num_generations} generations, completion "
          f"{opts.completion}, {opts.steps} timed steps", flush=True)
    results = {side: spawn(side, opts) for side in SIDES}
    print(table(results))
    out = HERE / "results" / f"grpo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"options": vars(opts), "results": results}, indent=1))


if __name__ == "__main__":
    main()
