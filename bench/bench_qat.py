"""QAT for a GGUF type, measured in llama.cpp: how much of the q4 perplexity gap does QAT recover?

    OMP_NUM_THREADS=2 python bench/bench_qat.py --scheme q4_0 --out qat.json   # 40 steps of 4 x 128 tokens

On a real model (SmolLM2-135M-Instruct from ``fasttune.real_models``), two LoRA fine-tunes with the same data, seed,
rank and steps: a plain one, and one with ``get_peft_model(qat_scheme=SCHEME)``. Each is exported with
``save_pretrained_gguf`` to f16 and to SCHEME, and the held-out perplexity of each file is measured in llama.cpp
(``fasttune.export.llama_cpp.LlamaCppModel``, ``use_extra_bufts=False``). The figure:

    recovered = (ppl(plain, SCHEME) - ppl(QAT, SCHEME)) / (ppl(plain, SCHEME) - ppl(plain, f16))

Data: the English text of Python's own documentation (``pydoc_data.topics``, shipped with every CPython, so the run
is offline and the same everywhere): topics are split by name, every 6th topic held out for evaluation, the rest
packed into training sequences. Also printed: the time of one QAT fake-quantization pass over all layers (the numpy
exporter's quantizer, run once per optimizer step) next to a training step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fasttune import FastLanguageModel  # noqa: E402
from fasttune.export.llama_cpp import LlamaCppModel  # noqa: E402
from fasttune.quant.qat import fake_weight, layer_plans  # noqa: E402
from fasttune.real_models import real_model  # noqa: E402


def corpus(tokenizer, held_out_every: int = 6) -> tuple[list[int], list[int]]:
    """(train ids, held-out ids) from pydoc's topics, split by topic."""
    from pydoc_data.topics import topics

    train, held = [], []
    for i, name in enumerate(sorted(topics)):
        ids = tokenizer(topics[name], add_special_tokens=False)["input_ids"]
        (held if i % held_out_every == 0 else train).extend(ids + [tokenizer.eos_token_id])
    return train, held


def batches(ids: list[int], seq: int, batch: int, steps: int, seed: int):
    """``steps`` batches of ``batch`` random windows of ``seq`` tokens (the same for every run with this seed)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.tensor(ids)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()])


def train(folder: Path, scheme: str | None, args, train_ids: list[int]) -> tuple[object, object, list[float], dict]:
    torch.manual_seed(args.seed)
    model, tok = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, dtype=args.dtype,
                                                   max_seq_length=args.seq)
    model = FastLanguageModel.get_peft_model(model, r=args.rank, lora_alpha=args.rank, qat_scheme=scheme,
                                             random_state=args.seed, use_gradient_checkpointing=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses, timing = [], {"step_s": [], "fake_quant_s": None}
    if scheme is not None:  # one full pass of the exporter's quantizer over every layer (what a step adds)
        base = model.get_base_model()
        t0 = time.perf_counter()
        for name in layer_plans(model):
            layer = base.get_submodule(name)
            layer.__dict__.pop("_fasttune_qat_cache", None)
            fake_weight(layer)
        timing["fake_quant_s"] = time.perf_counter() - t0
    for step, ids in enumerate(batches(train_ids, args.seq, args.batch, args.steps, args.seed)):
        t0 = time.perf_counter()
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        timing["step_s"].append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if step % 5 == 0 or step == args.steps - 1:
            print(f"  [{scheme or 'plain'}] step {step:4d} loss {loss.item():.4f} ({timing['step_s'][-1]:.1f} s)",
                  flush=True)
    return model, tok, losses, timing


def perplexity(path: Path, ids: list[int], ctx: int, threads: int) -> float:
    """exp(mean NLL) of ``ids`` in windows of ``ctx`` tokens, each scored from its second token, in llama.cpp."""
    nll, count = 0.0, 0
    with LlamaCppModel(path, n_ctx=ctx, n_threads=threads) as llm:
        for start in range(0, len(ids) - 1, ctx):
            window = ids[start:start + ctx]
            if len(window) < 2:
                break
            logits = llm.logits(window).astype(np.float64)
            logz = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
            target = np.array(window[1:])
            nll += float((logz[:-1] - logits[np.arange(len(window) - 1), target]).sum())
            count += len(window) - 1
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="q4_0", help="GGUF type to train for and export (q4_0, q4_k_m, ...)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (bfloat16 or float32)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    folder = real_model(args.model, install=True)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {threads}, dtype {args.dtype}")
    results: dict = {"args": vars(args), "runs": {}}
    train_ids, held = corpus(AutoTokenizer.from_pretrained(str(folder)))
    held_ids = held[: args.eval_tokens]
    print(f"data: {len(train_ids)} training tokens, {len(held_ids)} held-out tokens (pydoc_data.topics)")
    with tempfile.TemporaryDirectory() as tmp:
        for label, scheme in (("plain", None), ("qat", args.scheme)):
            t0 = time.perf_counter()
            model, tok, losses, timing = train(folder, scheme, args, train_ids)
            train_s = time.perf_counter() - t0
            paths = model.save_pretrained_gguf(f"{tmp}/{label}", tok, quantization_method=["f16", args.scheme])
            ppl = {p.name: perplexity(p, held_ids, args.ctx, threads) for p in paths}
            results["runs"][label] = {"perplexity": ppl, "losses": losses, "train_s": train_s,
                                      "mean_step_s": float(np.mean(timing["step_s"][1:])),
                                      "fake_quant_pass_s": timing["fake_quant_s"]}
            print(f"{label}: {ppl}", flush=True)
            del model
    files = {}
    for label, run in results["runs"].items():
        for name, value in run["perplexity"].items():
            files[(label, "f16" if "F16" in name else "q")] = value
    gap = files[("plain", "q")] - files[("plain", "f16")]
    recovered = (files[("plain", "q")] - files[("qat", "q")]) / gap if gap else float("nan")
    results["gap"] = gap
    results["recovered"] = recovered
    results["held_out_tokens"] = len(held_ids)
    print("\n| fine-tune | f16 ppl | " + args.scheme + " ppl |\n|---|---|---|")
    for label in ("plain", "qat"):
        print(f"| {label} | {files[(label, 'f16')]:.4f} | {files[(label, 'q')]:.4f} |")
    print(f"\n{args.scheme} gap of the plain fine-tune: {gap:.4f} ppl; QAT recovers {100 * recovered:.1f}% of it")
    for label, run in results["runs"].items():
        print(f"{label}: mean step {run['mean_step_s']:.2f} s, final loss {np.mean(run['losses'][-10:]):.4f}"
              + (f", one fake-quantization pass {run['fake_quant_pass_s']:.2f} s" if run["fake_quant_pass_s"] else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
