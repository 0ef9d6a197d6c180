"""Benchmark of fasttune's export of the benchmark ``small`` model (a benchmark, not a test).

Run: ``python bench/bench_export.py [--methods q4_k_m,q8_0] [--threads 2] [--compare-llama-cpp] [--validate]``

The ``small`` model (llama, hidden 1024, 8 layers, 16 heads, 4 KV heads, intermediate 2816, vocab 32000; random,
bf16) gets a LoRA (r=16 on all linear projections, non-zero B) and is exported with ``save_pretrained_gguf``, each
method in its own process so that peak memory is that export's. Reported per method: wall time of the export call,
peak resident memory of the process (and its resident memory before the export started), file size.

``--validate`` (needs llama-cpp-python) then loads each file in llama.cpp and compares its logits on a prompt with
the HF model holding the file's dequantized weights (mean KL, top-1 agreement, tokenization).
``--compare-llama-cpp`` (needs llama-cpp-python) also writes an f16 GGUF, quantizes it with llama.cpp's own
``llama_model_quantize`` to q4_k_m, and compares with fasttune's q4_k_m file: the tensor types must be identical, and
per tensor the error of fasttune's weights (vs the f16 weights) is divided by llama.cpp's. Prints a table and writes
``bench/results/export.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             intermediate_size=2816, vocab_size=32000)
RESULTS = Path(__file__).parent / "results"


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_small(folder: Path) -> Path:
    import torch

    from fasttune.tiny import build_tiny_model

    if not (folder / "config.json").exists():
        build_tiny_model("llama", folder, dtype=torch.bfloat16, **SMALL)
    return folder


def _lora(model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return model


def child(model_dir: Path, out: Path, method: str, threads: int, validate: bool) -> dict:
    """One export in this process; returns the measurements (and, with ``validate``, llama.cpp's agreement)."""
    import torch
    from transformers import AutoTokenizer

    from fasttune.export import save_pretrained_gguf

    torch.set_num_threads(threads)
    model = _lora(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rss_before = _rss_mb()
    start = time.perf_counter()
    paths = save_pretrained_gguf(model, out, tokenizer, quantization_method=method, write_modelfile=False)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"method": method, "wall_s": round(wall, 2), "rss_before_mb": round(rss_before),
           "peak_rss_mb": round(peak), "file_mb": round(paths[0].stat().st_size / 2**20, 1), "file": str(paths[0])}
    if validate:  # after the measurements: the reference model costs memory and time of its own
        from fasttune.export.gguf.reader import reference_model
        from fasttune.export.llama_cpp import validate_gguf

        report = validate_gguf(paths[0], reference_model(paths[0], model.config), tokenizer, n_threads=threads,
                               raise_on_failure=False)
        row.update(llama_cpp_tokens_match=report.tokens_match, llama_cpp_kl=float(f"{report.kl:.3g}"),
                   llama_cpp_top1=report.top1, llama_cpp_max_abs=float(f"{report.max_abs_diff:.3g}"))
    return row


def compare_with_llama_cpp(f16_path: Path, ours_path: Path, threads: int) -> dict:
    """llama.cpp quantizes the f16 file to q4_k_m; compare tensor types and per-tensor error with ours."""
    import llama_cpp
    import numpy as np
    from gguf import GGUFReader
    from gguf import quants as gq

    theirs_path = ours_path.with_name("llama_cpp.Q4_K_M.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(theirs_path).encode(), ctypes.byref(params))
    wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")

    def load(path: Path) -> dict:
        return {t.name: (t.tensor_type.name, gq.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1))
                for t in GGUFReader(path).tensors}

    src, ours, theirs = load(f16_path), load(ours_path), load(theirs_path)
    type_mismatch = [n for n in ours if ours[n][0] != theirs[n][0]]
    ratios = {}
    for name, (qtype, data) in ours.items():
        if qtype in ("F32", "F16"):
            continue
        ref = src[name][1]
        err_ours = float(np.sqrt(np.mean((data - ref) ** 2)))
        err_theirs = float(np.sqrt(np.mean((theirs[name][1] - ref) ** 2)))
        ratios[name] = err_ours / err_theirs if err_theirs > 0 else float("inf")
    worst = max(ratios, key=ratios.get)
    return {"llama_cpp_quantize_s": round(wall, 2), "type_mismatches": type_mismatch,
            "max_error_ratio": round(ratios[worst], 4), "worst_tensor": worst,
            "mean_error_ratio": round(float(np.mean(list(ratios.values()))), 4),
            "llama_cpp_file_mb": round(theirs_path.stat().st_size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="q4_k_m,q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "fasttune-bench-small")
    parser.add_argument("--compare-llama-cpp", action="store_true")
    parser.add_argument("--validate", action="store_true", help="validate each file in llama.cpp (after timing)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model_dir, args.out, args.child, args.threads, args.validate)))
        return
    build_small(args.model_dir)
    methods = args.methods.split(",")
    if args.compare_llama_cpp and "f16" not in methods:
        methods.append("f16")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--model-dir", str(args.model_dir),
                   "--out", str(Path(scratch) / method), "--threads", str(args.threads)]
            cmd += ["--validate"] if args.validate else []
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        comparison = None
        if args.compare_llama_cpp:
            by = {r["method"]: Path(r["file"]) for r in rows}
            comparison = compare_with_llama_cpp(by["f16"], by["q4_k_m"], args.threads)
    print(f"CPU: {_cpu_name()}  threads: {args.threads}  model: small {SMALL}")
    print(f"{'method':<8} {'wall s':>8} {'RSS before MB':>14} {'peak RSS MB':>12} {'file MB':>9}")
    for r in rows:
        line = f"{r['method']:<8} {r['wall_s']:>8} {r['rss_before_mb']:>14} {r['peak_rss_mb']:>12} {r['file_mb']:>9}"
        if "llama_cpp_kl" in r:
            line += (f"  llama.cpp: tokens {'match' if r['llama_cpp_tokens_match'] else 'DIFFER'}, "
                     f"KL {r['llama_cpp_kl']}, top-1 {r['llama_cpp_top1']:.2f}")
        print(line)
    if comparison:
        print(f"vs llama.cpp q4_k_m: type mismatches {comparison['type_mismatches'] or 'none'}, error ratio "
              f"max {comparison['max_error_ratio']} ({comparison['worst_tensor']}), "
              f"mean {comparison['mean_error_ratio']}")
    RESULTS.mkdir(exist_ok=True)
    payload = {"cpu": _cpu_name(), "threads": args.threads, "model": SMALL, "rows": rows, "vs_llama_cpp": comparison}
    (RESULTS / "export.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
