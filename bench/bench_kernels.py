"""Benchmark of fasttune's fast ops against their plain-PyTorch references (a benchmark, not a test).

Run: ``python bench/bench_kernels.py [--dtype bf16] [--repeats 5] [--threads 2]``. Prints a table and writes
``bench/results/kernels-<dtype>-t<threads>.json``. For each op, forward + backward at realistic sizes (hidden
1024, seq 2048, vocab 32000 for the loss): the best wall time over the repeats (the machines are shared: the minimum
is the least disturbed; the JSON also has the median) of the reference, the fast ``torch`` path uncompiled
("eager") and compiled with torch.compile (the CPU default; the first, compiling call is not timed), and the bytes
autograd keeps for backward beyond the op's inputs (``saved_tensors_hooks``). For the loss it also measures, each in
a fresh process, the peak resident memory one forward + backward adds (reference vs uncompiled fast path).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fasttune.kernels import apply_rope, fused_linear_cross_entropy, geglu, rms_norm, swiglu, use_backend
from fasttune.kernels.compiling import use_compile
from fasttune.kernels.reference import (
    apply_rope_ref,
    geglu_ref,
    linear_cross_entropy_ref,
    rms_norm_ref,
    swiglu_ref,
)

SEQ, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 1024, 2816, 16, 4, 64, 32000
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cases(dtype: torch.dtype) -> dict[str, tuple[Callable, Callable, Callable[[], list[torch.Tensor]], list[bool]]]:
    """name -> (fast op, reference op, make inputs, which inputs need grad)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    pos = torch.arange(SEQ)[None].float()
    freqs = pos[..., None] / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    emb = torch.cat([freqs, freqs], -1)
    labels = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    labels[:, : SEQ // 4] = -100  # a prompt: a quarter of the positions carry no label
    return {
        "rms_norm (x*w)": (lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_ref(x, w, 1e-6),
                           lambda: [rnd(1, SEQ, HIDDEN), rnd(HIDDEN)], [True, False]),
        "rms_norm (x*(1+w))": (lambda x, w: rms_norm(x, w, 1e-6, True), lambda x, w: rms_norm_ref(x, w, 1e-6, True),
                               lambda: [rnd(1, SEQ, HIDDEN), rnd(HIDDEN)], [True, True]),
        "rope": (apply_rope, apply_rope_ref,
                 lambda: [rnd(1, SEQ, HEADS, HEAD_DIM).transpose(1, 2), rnd(1, KV_HEADS, SEQ, HEAD_DIM),
                          emb.cos().to(dtype), emb.sin().to(dtype)], [True, True, False, False]),
        "swiglu": (swiglu, swiglu_ref, lambda: [rnd(1, SEQ, INTERMEDIATE), rnd(1, SEQ, INTERMEDIATE)], [True, True]),
        "geglu (tanh)": (geglu, geglu_ref, lambda: [rnd(1, SEQ, INTERMEDIATE), rnd(1, SEQ, INTERMEDIATE)],
                         [True, True]),
        "linear CE (frozen lm_head)": (
            lambda h, w: fused_linear_cross_entropy(h, w, labels), lambda h, w: linear_cross_entropy_ref(h, w, labels),
            lambda: [rnd(1, SEQ, HIDDEN), rnd(VOCAB, HIDDEN, scale=HIDDEN**-0.5)], [True, False]),
        "linear CE (trained lm_head)": (
            lambda h, w: fused_linear_cross_entropy(h, w, labels), lambda h, w: linear_cross_entropy_ref(h, w, labels),
            lambda: [rnd(1, SEQ, HIDDEN), rnd(VOCAB, HIDDEN, scale=HIDDEN**-0.5)], [True, True]),
    }


def _saved_bytes(fn: Callable, inputs: list[torch.Tensor]) -> int:
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(n for p, n in seen.items() if p not in skip)


def _time(fn: Callable, inputs: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """(min, median) seconds of forward + backward over ``repeats`` runs after one warm-up (compiling) run."""
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        times.append(time.perf_counter() - start)
    return min(times[1:]), statistics.median(times[1:])


def _rss_mib() -> tuple[int, int]:
    """(peak, current) resident MiB of this process since the last reset (Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    peak, now = (int(re.search(rf"{key}:\s+(\d+)", status).group(1)) // 1024 for key in ("VmHWM", "VmRSS"))
    return peak, now


def _peak_child(name: str, impl: str, dtype: torch.dtype) -> None:
    """In a fresh process: the peak resident memory one forward + backward adds (uncompiled paths, no warm-up)."""
    fast, ref, make, mask = _cases(dtype)[name]
    inputs = [t.requires_grad_(m) for t, m in zip(make(), mask)]
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident size
    _, before = _rss_mib()
    with use_backend("reference" if impl == "ref" else "torch"), use_compile(False):
        out = (ref if impl == "ref" else fast)(*inputs)
        out.backward()
    peak, _ = _rss_mib()
    print(json.dumps({"op": name, "impl": impl, "added_peak_mib": peak - before}))


def _peak_table(dtype_name: str, threads: int) -> list[dict]:
    rows = []
    print(f"\n{'op (peak RSS added by fwd+bwd)':<34} {'ref MiB':>8} {'fast MiB':>9}")
    for name in ("linear CE (frozen lm_head)", "linear CE (trained lm_head)"):
        row: dict = {"op": name}
        for impl in ("ref", "fast"):
            proc = subprocess.run([sys.executable, __file__, "--dtype", dtype_name, "--threads", str(threads),
                                   "--peak-child", f"{name}|{impl}"], capture_output=True, text=True, check=True)
            row[f"{impl}_added_peak_mib"] = json.loads(proc.stdout.strip().splitlines()[-1])["added_peak_mib"]
        rows.append(row)
        print(f"{name:<34} {row['ref_added_peak_mib']:>8} {row['fast_added_peak_mib']:>9}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="run only ops whose name contains this text")
    parser.add_argument("--peak-child", default="", help=argparse.SUPPRESS)  # "op|ref" or "op|fast": one measurement
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.peak_child:
        _peak_child(*args.peak_child.split("|"), dtype)
        return
    print(f"CPU: {_cpu_name()}, torch threads: {torch.get_num_threads()}, dtype: {args.dtype}, "
          f"torch {torch.__version__}")
    header = (f"{'op':<28} {'ref ms':>8} {'eager ms':>9} {'compiled ms':>12} {'speedup':>8} {'fast saved MiB':>15} "
              f"{'ref saved MiB':>14}")
    print(header + "\n" + "-" * len(header))
    rows = []
    for name, (fast, ref, make, mask) in _cases(dtype).items():
        if args.only not in name:
            continue
        inputs = [t.requires_grad_(m) for t, m in zip(make(), mask)]
        row = {"op": name}
        for label, fn, backend, compiled in (("ref", ref, "reference", False), ("eager", fast, "torch", False),
                                             ("compiled", fast, "torch", True)):
            with use_backend(backend), use_compile(compiled):
                best, median = _time(fn, inputs, args.repeats)
                row[f"{label}_ms"], row[f"{label}_median_ms"] = best * 1e3, median * 1e3
                row[f"{label}_saved_bytes"] = _saved_bytes(fn, inputs)
        row["speedup"] = row["ref_ms"] / min(row["eager_ms"], row["compiled_ms"])
        rows.append(row)
        print(f"{name:<28} {row['ref_ms']:>8.1f} {row['eager_ms']:>9.1f} {row['compiled_ms']:>12.1f} "
              f"{row['speedup']:>7.2f}x {row['compiled_saved_bytes'] / 2**20:>15.1f} "
              f"{row['ref_saved_bytes'] / 2**20:>14.1f}")
    peak_rows = _peak_table(args.dtype, args.threads) if "CE" in " ".join(r["op"] for r in rows) else []
    out = Path(__file__).parent / "results" / f"kernels-{args.dtype}-t{args.threads}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "dtype": args.dtype, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seq": SEQ, "hidden": HIDDEN,
            "intermediate": INTERMEDIATE, "vocab": VOCAB}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "peak_rss": peak_rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
