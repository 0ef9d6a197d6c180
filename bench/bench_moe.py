"""Benchmark of a mixture-of-experts layer and a whole MoE model, LoRA on every expert, fwd+bwd (not a test).

Run: ``python bench/bench_moe.py [--dtype bf16] [--tokens 2048] [--repeats 3] [--threads 2] [--only qwen3 gpt-oss]``.
Each case runs in a fresh process (so its peak RSS is its own) and is compared, in the same run, against:

* ``eager``: transformers' expert loop (``experts_implementation="eager"``) with peft's ``target_parameters`` LoRA,
  which materialises ``W + s B A`` for every expert on every forward: what a user gets from the plain stack;
* ``grouped_mm``: transformers' ``grouped_mm`` experts implementation (its default in 5.25), the same peft LoRA;
* ``fasttune``: the grouped split-LoRA kernel (``fasttune.kernels.moe`` through ``fasttune.patch``).

Shapes, scaled from the released models to fit a 2-core CPU (say so beside every figure):
``qwen3``: Qwen3-30B-A3B's routing (128 experts, top-8, ``norm_topk_prob``) at hidden 1024 / expert width 384
(released: 2048 / 768); ``gpt-oss``: gpt-oss-20b's routing (32 experts, top-4, biased clamped experts) at hidden 1440
/ width 1440 (released: 2880 / 2880). The layer case is one sparse block on ``--tokens`` tokens; the model case is
4 decoder layers with a 32k vocabulary and the loss, as loaded by ``FastLanguageModel`` (16-bit) vs transformers +
peft. Timing: the best of ``--repeats`` after one warm-up (the machine is shared: the minimum is the least
disturbed). Memory: the process's peak RSS during the measured steps minus its RSS before the first step.
Prints a table and writes ``bench/results/moe-<dtype>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fasttune.cli.memory import current_rss, peak_rss

SHAPES = {
    "qwen3": dict(model_type="qwen3_moe", hidden_size=1024, moe_intermediate_size=384, num_experts=128,
                  num_experts_per_tok=8, norm_topk_prob=True, intermediate_size=3072, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64),
    "gpt-oss": dict(model_type="gpt_oss", hidden_size=1440, intermediate_size=1440, num_local_experts=32,
                    num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                    sliding_window=128),
}
IMPLS = ("eager", "grouped_mm", "fasttune")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RANK = 16


def _config(shape: str, layers: int, vocab: int):
    from transformers import AutoConfig

    values = dict(SHAPES[shape])
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=131072,
                                tie_word_embeddings=False, **values)


def _lora_targets(shape: str) -> dict:
    from fasttune.models import get_family

    moe = get_family(SHAPES[shape]["model_type"]).moe
    return dict(target_parameters=[f"mlp.{p}" for p in moe.parameters])


def _child(shape: str, impl: str, case: str, dtype: torch.dtype, tokens: int, repeats: int) -> dict:
    """One measurement in this (fresh) process."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fasttune.patch import patch_model

    torch.manual_seed(0)
    layers = 1 if case == "layer" else 4
    config = _config(shape, layers, 32000)
    config._experts_implementation = "eager" if impl == "eager" else "grouped_mm"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if config.model_type == "gpt_oss":
        config._attn_implementation = "eager"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if case == "model" else []
    lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets or None, lora_dropout=0.0,
                      **_lora_targets(shape))
    model = get_peft_model(model, lora)
    if impl == "fasttune":
        patch_model(model)
    model.train()
    gen = torch.Generator().manual_seed(1)
    if case == "layer":
        block = model.base_model.model.model.layers[0].mlp
        x = (torch.randn(1, tokens, config.hidden_size, generator=gen) * 0.5).to(dtype).requires_grad_(True)

        def step():
            out = block(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()
    else:
        ids = torch.randint(0, 32000, (1, tokens), generator=gen)

        def step():
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    base = current_rss() / 2**20
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(shape=shape, impl=impl, case=case, seconds=min(times), tokens_per_s=tokens / min(times),
                peak_mib=peak_rss() / 2**20 - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--cases", nargs="*", choices=["layer", "model"], default=["layer", "model"])
    parser.add_argument("--child", nargs=3, metavar=("SHAPE", "IMPL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(*args.child, DTYPES[args.dtype], args.tokens, args.repeats)))
        return
    rows = []
    for shape in args.only:
        for case in args.cases:
            for impl in IMPLS:
                proc = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--tokens", str(args.tokens),
                                       "--repeats", str(args.repeats), "--threads", str(args.threads),
                                       "--child", shape, impl, case], capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"{shape} {impl} {case} failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"  {shape:8s} {case:6s} {impl:10s} {rows[-1]['tokens_per_s']:9.0f} tok/s "
                      f"{rows[-1]['peak_mib']:8.0f} MiB", flush=True)
    print(f"\n{'shape':8s} {'case':6s} {'fasttune tok/s':>15s} {'vs eager':>9s} {'vs grouped_mm':>14s} "
          f"{'memory vs eager':>16s} {'vs grouped_mm':>14s}")
    for shape in args.only:
        for case in args.cases:
            by = {r["impl"]: r for r in rows if r["shape"] == shape and r["case"] == case}
            fast = by["fasttune"]
            print(f"{shape:8s} {case:6s} {fast['tokens_per_s']:15.0f} "
                  f"{fast['tokens_per_s'] / by['eager']['tokens_per_s']:8.2f}x "
                  f"{fast['tokens_per_s'] / by['grouped_mm']['tokens_per_s']:13.2f}x "
                  f"{fast['peak_mib'] / by['eager']['peak_mib']:15.2f}x "
                  f"{fast['peak_mib'] / by['grouped_mm']['peak_mib']:13.2f}x")
    out = Path(__file__).parent / "results" / f"moe-{args.dtype}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(dict(dtype=args.dtype, tokens=args.tokens, threads=args.threads, rows=rows), indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
