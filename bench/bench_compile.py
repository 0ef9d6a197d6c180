"""Does ``torch.compile`` pay on CPU? The notebook flow with fasttune's compiled inner maths on and off.

    python bench/bench_compile.py --models small smollm2 --steps 12 --threads 2

Each configuration trains in its own process (bench_sft.py's worker, ``notebook`` mode, bf16 where native):

* ``off``: ``FASTTUNE_COMPILE=0`` (every fused op runs its plain torch body);
* ``on, cold cache``: ``FASTTUNE_COMPILE=1`` with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` a new folder):
  what a user's first run on a fresh machine pays;
* ``on, warm cache``: ``FASTTUNE_COMPILE=1`` again with that folder, now filled: every later run.

Figures: the first step (compilation happens there), the steady step (mean of the others), the wall time of the whole
training (compile time included) and the number of steps after which compiling has paid for itself:
``(first_on - first_off) / (steady_off - steady_on)`` (never, when the steady step is not faster). Vision: pass
``--vision`` to run bench_vision.py's own worker the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_sft import REAL_MODEL_NAMES, machine, save_results, saved_model  # noqa: E402  (bench/ on sys.path)


def run(model: str, steps: int, threads: int, compile_flag: str, cache: str, opts) -> dict:
    cmd = [sys.executable, str(HERE / "bench_sft.py"), "--worker", "--model", model, "--mode", "notebook",
           "--steps", str(steps), "--batch", str(opts.batch), "--threads", str(threads), "--seed", "0",
           "--max-tokens", str(opts.max_tokens), "--dtype", opts.dtype]
    if model not in REAL_MODEL_NAMES:  # the notebook flow loads a folder
        cmd += ["--model-dir", saved_model(model, opts)]
    env = {**os.environ, "FASTTUNE_COMPILE": compile_flag, "TORCHINDUCTOR_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr[-1500:]}
    return json.loads(lines[-1])


def summary(r: dict) -> dict:
    steps = r["step_s"]
    return {"first_s": steps[0], "steady_s": sum(steps[1:]) / max(1, len(steps) - 1), "train_wall_s": r["train_wall_s"],
            "tokens_per_s": r["tokens_per_s"], "loss_last": r["loss_last"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small", "smollm2"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    if opts.dtype is None:
        from fasttune.device import default_dtype

        opts.dtype = "bfloat16" if str(default_dtype()) == "torch.bfloat16" else "float32"
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, {opts.threads} threads, {opts.dtype}, {info['date_utc']} UTC")
    rows, results = [], []
    for model in opts.models:
        with tempfile.TemporaryDirectory() as cache:
            out = {}
            for label, flag in (("off", "0"), ("on, cold cache", "1"), ("on, warm cache", "1")):
                r = run(model, opts.steps, opts.threads, flag, cache, opts)
                results.append({"model": model, "config": label, **r})
                if "error" in r:
                    print(f"{model} {label}: ERROR {r['error'].strip().splitlines()[-1][:200]}", flush=True)
                    continue
                out[label] = summary(r)
                print(json.dumps({"model": model, "config": label, **out[label]}), flush=True)
        off = out.get("off")
        for label, s in out.items():
            pays = "-"
            if off is not None and label != "off":
                gain = off["steady_s"] - s["steady_s"]
                pays = f"{(s['first_s'] - off['first_s']) / gain:.1f}" if gain > 0 else "never"
            rows.append(f"| {model} | {label} | {s['first_s']:.1f} | {s['steady_s']:.2f} | "
                        f"{off['steady_s'] / s['steady_s'] if off else float('nan'):.2f}x | {s['train_wall_s']:.1f} | "
                        f"{pays} | {s['loss_last']:.4f} |")
    print(f"\n{opts.steps} steps, batch {opts.batch}, conversations up to {opts.max_tokens} tokens, notebook flow")
    print("| model | compile | first step s | steady step s | steady speed vs off | training wall s | pays after "
          "steps | loss |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    save_results("compile", info, opts, results)


if __name__ == "__main__":
    main()
