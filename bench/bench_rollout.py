"""Rollout benchmark: fasttune's engine (``fasttune.rl.engine.generate_ids``) vs ``model.generate`` called the way
TRL 1.16's ``GRPOTrainer._generate_single_turn`` calls it, per /work/shared/BENCHMARKS.md.

Run (each side in its own process, alternating ``--rounds`` times; the best round of each side is reported):

    python bench/bench_rollout.py                                   # default model, Unsloth GRPO sampling settings
    python bench/bench_rollout.py --size small --vocab 32000
    python bench/bench_rollout.py --top-p 0.95 --top-k 50 --min-p 0.05    # every filter on
    python bench/bench_rollout.py --finish eos                      # completions end at varied lengths
    python bench/bench_rollout.py --side fasttune                   # one side only (what the driver spawns)
    python bench/bench_rollout.py --vocab 32000 --min-p 0           # no sampling filter (temperature 1 only)
    python bench/bench_rollout.py --real smollm2 --min-p 0 --prompts 4 --new-tokens 32   # a real model's shapes

Both sides: the same tiny random llama (``fasttune.tiny.build_tiny_model``; ``--size default``: hidden 256, 4 layers;
``small``: hidden 512, 8 layers; ``--vocab`` overrides the tiny tokenizer's 640 tokens), loaded the GRPO-notebook way
(``--model lora``: ``FastLanguageModel.from_pretrained`` + ``get_peft_model``, r=16, fast path on, train mode with
"unsloth" checkpointing; ``plain``: a transformers model; ``qlora``: the same as lora loaded in 4-bit), fp32,
``torch.set_num_threads(--threads)``, the same prompts (``--prompts`` random prompts of ``--prompt-len`` +- 12 tokens,
fixed by ``--seed``), ``--num-generations`` completions each, the same sampling settings. ``--real smollm2|gemma3``
replaces the tiny model with a real one (``fasttune.real_models`` via bench/sft_data.py: SmolLM2-135M-Instruct, 30
layers, vocab 49152; Gemma-3-270M, vocab 262144), with its own tokenizer; ``--size`` / ``--vocab`` then do not
apply.

* ``baseline``: TRL's transformers path -- each prompt repeated ``num_generations`` times (``RepeatSampler``),
  left-padded with ``trl.trainer.utils.pad``, ``model.generate(input_ids, attention_mask,
  generation_config=GenerationConfig(do_sample=True, temperature, top_p, top_k, min_p, repetition_penalty,
  max_new_tokens, pad/bos/eos ids, disable_compile=True))`` under ``torch.no_grad``; tokens counted up to and
  including the first eos (TRL's completion mask).
* ``fasttune``: ``generate_ids(model, prompts, SamplingParams(n=num_generations, ...))``.

``--finish fixed`` (default) gives every completion exactly ``--new-tokens`` tokens on both sides (eos is held back
with ``min_new_tokens`` / ``min_tokens``), so both generate the same number of tokens. ``--finish eos`` makes 1% of the
vocabulary end a completion, so lengths vary as in real rollouts (both sides sample the same distribution).
Figures: generated tokens per second (after one warm-up call, best of ``--repeats`` calls), peak RSS of the process.
Results go to bench/results/rollout-<UTC time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_sft import machine  # bench/ is sys.path[0] when run as a script

HERE = Path(__file__).resolve().parent
SIDES = ("baseline", "fasttune")
SIZES = {
    "default": {},  # fasttune.tiny's shape: hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 688
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=1376),
}


# ---- the model and the prompts (identical on both sides) ------------------------------------------------------------
def build_model(opts: argparse.Namespace, workdir: str):
    import torch
    from transformers import AutoModelForCausalLM

    from fasttune import FastLanguageModel
    from fasttune.tiny import build_tiny_model, build_tokenizer

    if opts.real:
        from sft_data import real_model_folder
        from transformers import AutoTokenizer

        path = real_model_folder(opts.real)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        overrides = dict(SIZES[opts.size])
        if opts.vocab:
            overrides["vocab_size"] = opts.vocab
        tokenizer = build_tokenizer("llama")
        path = build_tiny_model("llama", Path(workdir) / "model", tokenizer=tokenizer, seed=opts.seed, **overrides)
    if opts.model == "plain":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa"), tokenizer
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=4096, dtype="float32",
                                                 load_in_4bit=opts.model == "qlora")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=opts.seed)
    generator = torch.Generator().manual_seed(opts.seed)
    with torch.no_grad():  # a trained adapter, not the all-zero lora_B of a fresh one
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    model.train()  # GRPO generates in the middle of training
    return model, tokenizer


def make_prompts(opts: argparse.Namespace, vocab: int, specials: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(opts.seed)
    lengths = torch.randint(opts.prompt_len - 12, opts.prompt_len + 13, (opts.prompts,), generator=generator)
    return [torch.randint(specials, vocab, (int(n),), generator=generator).tolist() for n in lengths]


def eos_ids(opts: argparse.Namespace, tokenizer, vocab: int) -> list[int]:
    """The eos token, plus (``--finish eos``) 1% of the vocabulary so that random-model completions end early."""
    ids = [tokenizer.eos_token_id]
    if opts.finish == "eos":
        ids += list(range(vocab - 1, vocab - 1 - vocab // 100, -1))
    return ids


# ---- the two sides --------------------------------------------------------------------------------------------------
def baseline_call(model, prompts, opts, eos: list[int], tokenizer):
    """TRL 1.16 ``_generate_single_turn``'s transformers path; returns the completion token count."""
    import torch
    from transformers import GenerationConfig
    from trl.trainer.utils import pad

    rows = [torch.tensor(p) for p in prompts for _ in range(opts.num_generations)]  # RepeatSampler's order
    input_ids = pad(rows, padding_value=tokenizer.pad_token_id, padding_side="left")
    attention_mask = pad([torch.ones_like(t) for t in rows], padding_value=0, padding_side="left")
    config = GenerationConfig(
        max_new_tokens=opts.new_tokens, do_sample=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, temperature=opts.temperature, top_p=opts.top_p,
        top_k=opts.top_k if opts.top_k > 0 else 0, min_p=opts.min_p or None, repetition_penalty=1.0,
        cache_implementation=None, disable_compile=True,
        min_new_tokens=opts.new_tokens if opts.finish == "fixed" else None,
    )
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    completions = out[:, input_ids.shape[1]:]
    is_eos = torch.isin(completions, torch.tensor(eos))
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completions.shape[1])
    return int(ends.sum())


def fasttune_call(model, prompts, opts, eos: list[int], tokenizer):
    from fasttune.rl.engine import generate_ids
    from fasttune.rl.sampling import SamplingParams

    params = SamplingParams(n=opts.num_generations, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                            min_p=opts.min_p, max_tokens=opts.new_tokens,
                            min_tokens=opts.new_tokens if opts.finish == "fixed" else 0)
    outs = generate_ids(model, prompts, params, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)
    return sum(len(c.token_ids) for per_prompt in outs for c in per_prompt)


def run_worker(opts: argparse.Namespace) -> dict:
    import torch

    from fasttune.lora.unwrap import base_model

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer = build_model(opts, workdir)
        vocab = base_model(model).config.vocab_size
        prompts = make_prompts(opts, vocab, specials=64)
        eos = eos_ids(opts, tokenizer, vocab)
        call = baseline_call if opts.side == "baseline" else fasttune_call
        call(model, prompts, opts, eos, tokenizer)  # warm-up
        times, tokens = [], []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            tokens.append(call(model, prompts, opts, eos, tokenizer))
            times.append(time.perf_counter() - start)
    best = min(range(len(times)), key=lambda i: times[i] / tokens[i])
    return {
        "side": opts.side, "tokens_per_s": tokens[best] / times[best], "seconds": times, "tokens": tokens,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "vocab": vocab,
    }


# ---- the driver -----------------------------------------------------------------------------------------------------
WORKER_OPTIONS = ("real", "size", "vocab", "model", "prompts", "num_generations", "prompt_len", "new_tokens", "temperature",
                  "top_p", "top_k", "min_p", "finish", "threads", "repeats", "seed")


def spawn(side: str, opts: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--side", side]
    for name in WORKER_OPTIONS:
        cmd += ["--" + name.replace("_", "-"), str(getattr(opts, name))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent),
           "OMP_NUM_THREADS": str(opts.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"side": side, "error": proc.stderr[-2000:]}
    return json.loads(lines[-1])


def best_per_side(results: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for r in results:
        if "error" not in r and (r["side"] not in best or r["tokens_per_s"] > best[r["side"]]["tokens_per_s"]):
            best[r["side"]] = r
    return best


def table(results: list[dict]) -> str:
    head = f"{'side':9} {'tok/s':>9} {'x base':>7} {'s/call':>7} {'tokens':>7} {'RSS GiB':>8}"
    out = [head, "-" * len(head)]
    best = best_per_side(results)
    base = best.get("baseline")
    for side in SIDES:
        errors = [r for r in results if r["side"] == side and "error" in r]
        if side not in best:
            message = errors[0]["error"].strip().splitlines()[-1][:80] if errors else "not run"
            out.append(f"{side:9} ERROR: {message}")
            continue
        r = best[side]
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        out.append(f"{side:9} {r['tokens_per_s']:9.1f} {ratio:7.2f} {min(r['seconds']):7.3f} {r['tokens'][0]:7d} "
                   f"{r['peak_rss_gib']:8.2f}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, default=None, help="run one side in this process and print JSON")
    parser.add_argument("--real", choices=["", "smollm2", "gemma3"], default="",
                        help="a real model instead of the tiny random llama")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the tiny tokenizer's)")
    parser.add_argument("--model", choices=["lora", "plain", "qlora"], default="lora")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64, help="mean prompt length (+-12 tokens)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1, help="-1 or 0: off")
    parser.add_argument("--min-p", type=float, default=0.1, help="0: off (Unsloth's GRPO notebooks use 0.1)")
    parser.add_argument("--finish", choices=["fixed", "eos"], default="fixed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="driver: baseline/fasttune processes, alternating")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    if opts.prompt_len <= 12:
        parser.error(f"--prompt-len: {opts.prompt_len} must be above 12 (prompts vary by +-12 tokens)")
    return opts


def main() -> None:
    opts = parse_args()
    if opts.worker or opts.side:
        opts.side = opts.side or "fasttune"
        print(json.dumps(run_worker(opts)), flush=True)
        return
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, {opts.threads} threads, fp32, torch {info['torch']}, "
          f"{info['date_utc']} UTC (shared machine: absolute numbers drift, the ratio is what counts)", flush=True)
    shape = f"real {opts.real}" if opts.real else f"size {opts.size} vocab {opts.vocab or 'tokenizer'}"
    print(f"# model {opts.model} {shape}; {opts.prompts} prompts x "
          f"{opts.num_generations} generations, prompt ~{opts.prompt_len}, {opts.new_tokens} new tokens "
          f"({opts.finish}); temperature {opts.temperature} top_p {opts.top_p} top_k {opts.top_k} min_p {opts.min_p}",
          flush=True)
    results = []
    for _ in range(opts.rounds):
        for side in SIDES:
            r = spawn(side, opts)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "error"} if "error" not in r else r), flush=True)
    print(table(results))
    out = HERE / "results" / f"rollout-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": info, "options": vars(opts), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
