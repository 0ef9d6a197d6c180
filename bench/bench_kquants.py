"""Benchmark fasttune's numpy K-quants against llama.cpp's own quantizer.

Run:  python bench/bench_kquants.py [--rows 4096 --cols 4096] [--types Q4_K,Q6_K] [--threads 1]

For each K type a (rows, cols) random-normal float32 matrix (scaled like LLM weights) is quantized by
`fasttune.export.gguf.kquants.quantize_k`; the table shows wall time, input MB/s and the reconstruction RMSE (via gguf's
dequantizer). Where llama-cpp-python is importable, the same matrix is written to a one-tensor f32 GGUF and
quantized with `llama_model_quantize` (the file type is chosen so that the tensor gets the K type measured); its time,
RMSE, our/llama.cpp error ratio and the share of identical bytes are added. JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf import quants as gguf_quants

from fasttune.export.gguf.kquants import K_QUANT_TYPES, quantize_k
from fasttune.export.gguf.mixes import FTYPES

# file type whose mix gives blk.0.attn_q.weight exactly this K type
_FTYPE_FOR = {"Q2_K": "q2_k", "Q3_K": "q3_k_s", "Q4_K": "q4_k_s", "Q5_K": "q5_k_s", "Q6_K": "q6_k"}
_TENSOR = "blk.0.attn_q.weight"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError as err:
        return f"unknown ({err})"
    return platform.processor() or "unknown"


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def _write_one_tensor_gguf(path: Path, x: np.ndarray) -> None:
    """A one-layer llama header holding only ``blk.0.attn_q.weight`` (f32), enough for llama_model_quantize."""
    rows, cols = x.shape
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(cols)
    writer.add_block_count(1)
    writer.add_feed_forward_length(cols)
    writer.add_head_count(cols // 128)
    writer.add_head_count_kv(cols // 128)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(128)
    writer.add_file_type(FTYPES["f32"][1])
    writer.add_tensor(_TENSOR, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _silence_llama_cpp() -> object:
    """Route llama.cpp's log lines to nowhere; returns the callback, which must be kept alive."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # noqa: ANN001 - ctypes callback
        return None

    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    return _drop


def _llama_cpp_quantize(src: Path, dst: Path, ftype: str, threads: int) -> tuple[float, GGMLQuantizationType, np.ndarray]:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype][1]
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    elapsed = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}")
    tensor = next(t for t in GGUFReader(str(dst)).tensors if t.name == _TENSOR)
    return elapsed, GGMLQuantizationType(tensor.tensor_type), np.array(tensor.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--types", default=",".join(t.name for t in K_QUANT_TYPES), help="comma-separated K types")
    parser.add_argument("--threads", type=int, default=1, help="threads for both quantizers (numpy: chunks in parallel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_kquants.json")
    args = parser.parse_args()

    x = (np.random.default_rng(args.seed).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    _keep = _silence_llama_cpp() if have_llama else None  # noqa: F841 - keeps the ctypes callback alive
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32.gguf"
        if have_llama:
            _write_one_tensor_gguf(src, x)
        for name in args.types.split(","):
            qtype = GGMLQuantizationType[name.strip().upper()]
            start = time.perf_counter()
            ours = quantize_k(x, qtype, n_threads=args.threads)
            elapsed = time.perf_counter() - start
            row = {"type": qtype.name, "seconds": elapsed, "mb_per_s": mb / elapsed,
                   "rmse": _rmse(gguf_quants.dequantize(ours, qtype), x)}
            if have_llama:
                ftype = _FTYPE_FOR[qtype.name]
                t_ll, ll_type, ll_data = _llama_cpp_quantize(src, Path(tmp) / f"{ftype}.gguf", ftype, args.threads)
                if ll_type != qtype:
                    raise RuntimeError(f"llama.cpp gave {ll_type.name} for {ftype}, expected {qtype.name}")
                row.update(llama_cpp_seconds=t_ll, llama_cpp_rmse=_rmse(gguf_quants.dequantize(ll_data, qtype), x),
                           same_bytes=float(np.mean(ours == ll_data)))
                row["rmse_ratio"] = row["rmse"] / row["llama_cpp_rmse"]
            results.append(row)
            print(_format_row(row), flush=True)

    meta = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "numpy": np.__version__, "shape": [args.rows, args.cols],
            "llama_cpp": have_llama, "threads": args.threads,
            "note": "llama.cpp seconds include loading the f32 GGUF and writing the quantized one"}
    print(f"\n{meta['cpu']} ({meta['cpu_count']} cpus), numpy {meta['numpy']}, matrix {args.rows}x{args.cols} f32")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


def _format_row(row: dict) -> str:
    text = f"{row['type']:5s}  {row['seconds']:7.2f} s  {row['mb_per_s']:7.1f} MB/s  rmse {row['rmse']:.4e}"
    if "llama_cpp_rmse" in row:
        text += (f" | llama.cpp {row['llama_cpp_seconds']:6.2f} s  rmse {row['llama_cpp_rmse']:.4e}"
                 f"  ratio {row['rmse_ratio']:.4f}  same bytes {row['same_bytes']:.2%}")
    return text


if __name__ == "__main__":
    main()
