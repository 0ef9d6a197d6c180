"""SFT benchmark: fasttune vs the plain transformers + peft + TRL stack, per /work/shared/BENCHMARKS.md.

Run (quick: a few steps per configuration, each in its own process):

    python bench/bench_sft.py --steps 6 --models small long qwen2
    python bench/bench_sft.py --steps 6 --models smollm2 gemma3      # real models (fasttune.real_models, from PyPI)
    python bench/bench_sft.py --sweep 2048 4096 8192 --budget-gib 6     # longest sequence within a memory budget
    python bench/bench_sft.py --sweep 16384 --modes fasttune            # one mode, chosen lengths (run in parallel)
    python bench/bench_sft.py --device cuda --models small smollm2 --modes baseline notebook  # on a GPU, bf16

Quick runs used FASTTUNE_COMPILE=0 (no torch.compile warm-up) and --threads 1 on the shared 2-core machine.

Configurations (same model, data, seed, LoRA r=16 alpha=16 on all linear layers, dropout 0, AdamW, threads, dtype:
bf16 where the machine computes it natively -- CUDA, or a CPU with AVX512-BF16/AMX -- else fp32; ``--dtype`` overrides):
* ``baseline``: TRL ``SFTTrainer`` defaults -- per-batch padding, SDPA, gradient checkpointing, TRL's fused LM head.
* ``trl_padding_free``: the same with TRL's own ``padding_free=True`` (its faster setting that works on CPU).
* ``fasttune``: ``patch_model`` (fused LoRA blocks, fused norms, per-segment SDPA for packed rows) +
  ``PaddingFreeCollator`` + fused linear CE (``FastLossMixin``) + "unsloth" checkpointing, assembled by hand.
* ``notebook``: the ported-notebook flow -- ``FastLanguageModel.from_pretrained`` (the model's folder; a synthetic
  model is saved to one first, by another process) + ``FastLanguageModel.get_peft_model`` (the same LoRA settings,
  "unsloth" checkpointing) in ``fasttune.trl.SFTTrainer`` with its defaults (TRL's ``SFTConfig`` defaults,
  ``gradient_checkpointing=True`` included): whatever the loader and the drop-in pick is what is measured. Its
  adapters start from ``random_state=seed`` rather than peft's draw, so its losses differ slightly from step 2 on.
* ``trl_on_fasttune``: the same model in plain ``trl.SFTTrainer`` (an unported notebook): fused blocks only.

Figures: trained tokens/s (tokens carrying a label, first step excluded as warm-up), peak RSS of the process, loss at
the last step, utilisation = useful model FLOP/s over the machine's matmul FLOP/s at the model's own shapes and dtype
measured in the same process (bench/step_profile.py says what is counted); ``--profile``: where a step's time goes.
Results go to bench/results/sft-<UTC time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = peft's all-linear here
MODES = ("baseline", "trl_padding_free", "fasttune", "notebook", "trl_on_fasttune")
FASTTUNE_MODELS = ("fasttune", "notebook", "trl_on_fasttune")  # modes whose model carries fasttune's fast path


# ----------------------------------------------------------------------------------------------- worker (one config)
def matmul_flops(dtype_name: str = "bfloat16", n: int = 1024, reps: int = 8) -> float:
    """One square product's rate (bench_vision's machine line); utilisation uses the model's own shapes instead."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    """Wait for the GPU's queued work (step timings on CUDA); nothing on CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_memory(device: str) -> dict:
    """On CUDA the GPU's peak, ``torch.cuda.max_memory_allocated`` (the process's peak RSS is reported anyway)."""
    if device != "cuda":
        return {}
    import torch

    return {"peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30}


def build_trainer(opts: argparse.Namespace, workdir: str):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import fasttune.trl
    from fasttune.patch import enable_checkpointing, patch_model, set_gradient_checkpointing
    from fasttune.tiny import build_tokenizer
    from fasttune.train import PaddingFreeCollator
    from fasttune.train.fused_loss import FastLossMixin

    sys.path.insert(0, str(HERE))
    from sft_data import REAL_MODELS, chat_dataset, long_dataset, model_config, real_model_folder

    torch.manual_seed(opts.seed)
    config = model_config(opts.model)
    dtype = getattr(torch, opts.dtype)
    if opts.mode == "notebook":  # the ported notebook: FastLanguageModel loads the folder and adds the adapters
        from fasttune import FastLanguageModel

        folder = real_model_folder(opts.model) if opts.model in REAL_MODELS else opts.model_dir
        model, _ = FastLanguageModel.from_pretrained(str(folder), dtype=dtype, load_in_4bit=False,
                                                     max_seq_length=max(opts.seq_len or 0, 2048))
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=LORA_TARGETS, use_gradient_checkpointing="unsloth",
                                                 random_state=opts.seed)
    else:
        if opts.model in REAL_MODELS:  # the real weights (the dequantized GGUF the package ships)
            model = AutoModelForCausalLM.from_pretrained(real_model_folder(opts.model), dtype=dtype,
                                                         attn_implementation="sdpa")
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                                 bias="none", task_type="CAUSAL_LM"))
    n_rows = opts.steps * opts.batch
    rows = (long_dataset(n_rows, opts.seq_len, config.vocab_size, opts.seed) if opts.seq_len
            else chat_dataset(n_rows, config.vocab_size, opts.seed, opts.max_tokens))
    config_class = fasttune.trl.SFTConfig if opts.mode == "notebook" else SFTConfig
    hand_set = {} if opts.mode == "notebook" else dict(gradient_checkpointing=opts.mode not in FASTTUNE_MODELS,
                                                        padding_free=opts.mode == "trl_padding_free")
    args = config_class(
        output_dir=workdir, max_steps=opts.steps, per_device_train_batch_size=opts.batch, learning_rate=2e-4,
        bf16=dtype == torch.bfloat16, use_cpu=opts.device == "cpu", logging_steps=1, report_to=[], save_strategy="no", seed=opts.seed,
        max_length=None if opts.mode == "trl_padding_free" else max(opts.seq_len or 0, 2048), dataloader_num_workers=0, disable_tqdm=True,
        **hand_set,
    )
    kwargs = dict(model=model, args=args, train_dataset=Dataset.from_list(rows),
                  processing_class=build_tokenizer("llama"))
    if opts.mode == "fasttune":
        patch_model(model)
        enable_checkpointing(model, "unsloth")

        class FastSFTTrainer(FastLossMixin, SFTTrainer):
            pass

        trainer = FastSFTTrainer(data_collator=PaddingFreeCollator(), **kwargs)
    elif opts.mode == "notebook":
        trainer = fasttune.trl.SFTTrainer(**kwargs)
    elif opts.mode == "trl_on_fasttune":
        patch_model(model)  # what FastLanguageModel.get_peft_model leaves: fast path + remembered "unsloth" mode
        set_gradient_checkpointing(model, "unsloth")
        trainer = SFTTrainer(**kwargs)
    else:
        trainer = SFTTrainer(**kwargs)

    counts: list[int] = []
    segments: list[list[int]] = []
    collate_s: list[float] = []
    inner = trainer.data_collator

    def counting(examples):
        start = time.perf_counter()
        batch = inner(examples)
        collate_s.append(time.perf_counter() - start)
        labels = batch["labels"]
        # tokens that carry a label after the next-token shift (padding and sequence starts do not count)
        counts.append(int((labels[:, 1:] != -100).sum()))
        segments.append([len(e["input_ids"]) for e in examples])
        return batch

    trainer.data_collator = counting
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(opts.device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(opts.device)
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Timer())
    profiler = None
    if opts.profile:
        from step_profile import StepProfiler

        profiler = StepProfiler(first=1, last=min(2, opts.steps - 1), rank=16)
        trainer.add_callback(profiler)
    return trainer, model, dict(counts=counts, segments=segments, collate_s=collate_s, times=times, profiler=profiler)


def run_worker(opts: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(opts.threads)
    sys.path.insert(0, str(HERE))
    from step_profile import model_flops, sustained_matmul_rate

    with tempfile.TemporaryDirectory() as workdir:
        trainer, model, seen = build_trainer(opts, workdir)
        start = time.perf_counter()
        trainer.train()
        train_wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    counts, times, segments = seen["counts"], seen["times"], seen["segments"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # the train dataloader may collate one batch ahead; pair each timed step with its own batch
    steps = min(len(times), len(counts))
    timed = range(1, steps) if steps > 1 else range(steps)
    tokens, seconds = sum(counts[i] for i in timed), sum(times[i] for i in timed)
    tps = tokens / seconds if seconds else 0.0
    # utilisation: the useful FLOPs of the timed steps over the machine's matmul rate at the model's own shapes,
    # measured here, after training, in this process, at the mean real-token count of a step
    work = sum(model_flops(model, sum(segments[i]), counts[i], segments[i]) for i in timed)
    mean_tokens = max(1, round(sum(sum(segments[i]) for i in timed) / max(1, len(timed))))
    rate = sustained_matmul_rate(model, mean_tokens, getattr(torch, opts.dtype), repeats=7)  # best of 7 passes
    result = {
        "model": opts.model, "mode": opts.mode, "steps": opts.steps, "batch": opts.batch, "seq_len": opts.seq_len,
        "tokens_per_s": tps, "step_s": times, "trained_tokens": counts[:steps],
        "peak_rss_gib": peak, "loss_last": losses[-1] if losses else None, "losses": losses, "dtype": opts.dtype,
        "model_gflops_per_s": work / seconds / 1e9 if seconds else 0.0, "matmul_gflops_at_shapes": rate / 1e9,
        "utilisation": work / seconds / rate if seconds else 0.0,
        "collate_s_per_step": sum(seen["collate_s"]) / max(1, len(seen["collate_s"])),
        "train_wall_s": train_wall, "compile": os.environ.get("FASTTUNE_COMPILE", "auto"),
    }
    if seen["profiler"] is not None:
        prof = dict(seen["profiler"].seconds)
        n_prof = max(1, min(2, opts.steps - 1))
        prof["data collation (outside the step)"] = result["collate_s_per_step"] * n_prof
        result["profile"] = prof
        result["top_ops"] = seen["profiler"].top_ops
    return result


# ------------------------------------------------------------------------------------------- orchestrator and table
def spawn(model: str, mode: str, opts: argparse.Namespace, seq_len: int | None = None, steps: int | None = None,
          batch: int | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--mode", mode,
           "--steps", str(steps or opts.steps), "--batch", str(batch or opts.batch), "--threads", str(opts.threads),
           "--seed", str(opts.seed), "--max-tokens", str(opts.max_tokens), "--dtype", opts.dtype]
    if opts.profile:
        cmd += ["--profile"]
    if seq_len:
        cmd += ["--seq-len", str(seq_len)]
    cmd += ["--device", opts.device]
    if mode == "notebook" and model not in REAL_MODEL_NAMES:
        cmd += ["--model-dir", saved_model(model, opts)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"model": model, "mode": mode, "seq_len": seq_len, "error": proc.stderr[-2000:]}
    return json.loads(lines[-1])


REAL_MODEL_NAMES = ("smollm2", "gemma3")  # bench/sft_data.py's REAL_MODELS (not imported here: it imports torch)
_SAVED: dict[str, str] = {}


def saved_model(model: str, opts: argparse.Namespace) -> str:
    """A synthetic model saved as a folder (the notebook flow loads a folder), with the very weights the other modes
    build from the config and seed; written once per run, by a process of its own (its memory is not the worker's)."""
    if model not in _SAVED:
        folder = tempfile.mkdtemp(prefix=f"bench-{model}-")
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--save-model", folder, "--model", model,
                        "--seed", str(opts.seed), "--dtype", opts.dtype], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        _SAVED[model] = folder
    return _SAVED[model]


def save_model(opts: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fasttune.tiny import build_tokenizer

    sys.path.insert(0, str(HERE))
    from sft_data import model_config

    torch.manual_seed(opts.seed)  # as build_trainer builds it
    model = AutoModelForCausalLM.from_config(model_config(opts.model), dtype=getattr(torch, opts.dtype))
    model.save_pretrained(opts.save_model)
    build_tokenizer("llama").save_pretrained(opts.save_model)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def save_results(kind: str, info: dict, opts: argparse.Namespace, results: list[dict]) -> Path:
    """Write ``bench/results/<kind>-<UTC time>.json`` (machine, options, results) and say where."""
    out = HERE / "results" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": info, "options": vars(opts), "results": results}, indent=1))
    print(f"wrote {out}")
    return out


def table(results: list[dict]) -> str:
    head = (f"{'model':8} {'mode':17} {'tok/s':>8} {'x base':>7} {'RSS GiB':>8} {'x base':>7} {'loss':>8} "
            f"{'util':>6} {'GFLOP/s':>8} {'mm@shapes':>9}")
    out = [head, "-" * len(head)]
    base = {r["model"]: r for r in results if r.get("mode") == "baseline" and "error" not in r}
    for r in results:
        if "error" in r:
            out.append(f"{r['model']:8} {r['mode']:17} ERROR: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        b = base.get(r["model"])
        speed = r["tokens_per_s"] / b["tokens_per_s"] if b and b["tokens_per_s"] else float("nan")
        mem = r["peak_rss_gib"] / b["peak_rss_gib"] if b else float("nan")
        out.append(f"{r['model']:8} {r['mode']:17} {r['tokens_per_s']:8.1f} {speed:7.2f} {r['peak_rss_gib']:8.2f} "
                   f"{mem:7.2f} {r['loss_last'] or float('nan'):8.4f} {100 * r['utilisation']:5.1f}% "
                   f"{r['model_gflops_per_s']:8.1f} {r['matmul_gflops_at_shapes']:9.1f}")
    out.append("util = useful model FLOP/s (no recompute; LoRA step: 4 x frozen params + 6 x LoRA params per token, "
               "causal attention per example, the head at labelled positions) / the machine's matmul FLOP/s at the "
               "model's own shapes and dtype, measured in the same process")
    profiles = {f"{r['model']} {r['mode']}": r["profile"] for r in results if "profile" in r}
    if profiles:
        from step_profile import profile_table

        out.append("\nWhere a step's time goes (torch.profiler, self CPU time per category, steps after the warm-up):")
        out.append(profile_table(profiles))
    return "\n".join(out)


def sweep(opts: argparse.Namespace) -> list[dict]:
    """One step per length on the ``long`` model; the longest length whose peak RSS fits the budget, per mode."""
    results = []
    for mode in [m for m in opts.modes if m != "trl_padding_free"]:
        for length in opts.sweep:
            r = spawn("long", mode, opts, seq_len=length, steps=1, batch=1)
            r["fits"] = "error" not in r and r["peak_rss_gib"] <= opts.budget_gib
            results.append(r)
            print(f"sweep {mode:9} {length:6}: " + (f"{r['peak_rss_gib']:.2f} GiB" if "error" not in r else "error"),
                  flush=True)
            if not r["fits"]:
                break
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="small")
    parser.add_argument("--models", nargs="+", default=["small", "long", "qwen2"])
    parser.add_argument("--mode", choices=MODES, default="fasttune")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration (first = warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="fixed length (the long model uses 4096)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="longest conversation (quick runs: less)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", type=int, nargs="*", default=None, help="sequence lengths for the budget sweep")
    parser.add_argument("--budget-gib", type=float, default=6.0)
    parser.add_argument("--profile", action="store_true",
                        help="profile the steps after the warm-up (torch.profiler) and print where the time goes")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="compute dtype (default: bfloat16 where the machine computes it natively, else float32)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the runs train; on cuda each run also reports the GPU's peak (peak_cuda_gib)")
    opts = parser.parse_args()
    if opts.dtype is None:
        from fasttune.device import default_dtype

        opts.dtype = "bfloat16" if str(default_dtype()) == "torch.bfloat16" else "float32"
    if opts.save_model:
        save_model(opts)
        return
    if opts.worker:
        print(json.dumps({**run_worker(opts), **peak_memory(opts.device)}), flush=True)
        return
    info = machine()
    gpu = f"{info['gpu']} (CUDA {info['cuda']}), " if opts.device == "cuda" else ""
    print(f"# {gpu}{info['cpu']}, {info['cores']} cores, {opts.threads} threads, {opts.dtype}, torch {info['torch']}, "
          f"{info['date_utc']} "
          "UTC (shared, loaded machine: absolute numbers drift, ratios are what count)", flush=True)
    results: list[dict] = []
    if opts.sweep:
        results = sweep(opts)
    else:
        for model in opts.models:
            for mode in opts.modes:
                long = model == "long"
                r = spawn(model, mode, opts, seq_len=4096 if long else opts.seq_len, batch=1 if long else None)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items()
                                  if k not in ("step_s", "losses", "trained_tokens", "profile", "top_ops")}),
                      flush=True)
        print(table(results))
    save_results("sft", info, opts, results)


if __name__ == "__main__":
    main()
