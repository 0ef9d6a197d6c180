"""Triton kernel parity cases: on CPU by Triton's interpreter in a child process (see conftest.py), and compiled on a
GPU by test_kernels_cuda.py.

Each case runs a public op with the ``triton`` backend on fp32, fp16 or bf16 inputs and compares output and gradients
with the fp32 reference on the same values. Under the interpreter (CPU) the cases run in fp32 and fp16 (its bf16
arithmetic is wrong; bf16 goes through the torch path tests there); compiled on CUDA they run in fp32 and bf16.
Shapes are small: the interpreter runs each program in Python.

Run directly: ``TRITON_INTERPRET=1 PYTHONPATH=tests/kernels python tests/kernels/triton_cases.py`` prints one JSON
line ``{case: "ok" | failure text}``.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import torch

# ``BODIES``: {name without dtype: case(device, dtype name)}; ``CASES``: the interpreter's {name/dtype: case()}.
BODIES: dict[str, Callable[[str, str], None]] = {}
CASES: dict[str, Callable[[], None]] = {}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INTERPRETER_DTYPES = ("fp32", "fp16")


def _case(template: str):
    """Registers ``body(device, dtype_name)`` as ``BODIES[template without "/{dt}"]`` and its interpreter cases (CPU,
    fp32 and fp16) as ``CASES[template with the dtype's name]``."""
    def register(body: Callable[[str, str], None]) -> Callable[[str, str], None]:
        BODIES[template.replace("/{dt}", "")] = body
        for dt in INTERPRETER_DTYPES:
            CASES[template.format(dt=dt)] = functools.partial(body, "cpu", dt)
        return body

    return register


def _check(fn, ref, inputs, grad_mask, names, dtype_name: str, device: str,
           out_dtype: torch.dtype | None = None) -> None:
    """Triton run on ``dtype_name`` inputs on ``device`` vs the fp32 reference; outputs must have ``out_dtype``
    (default: the input's). bf16: within BF16 of the fp32 truth and no less accurate than the bf16 reference."""
    from kernel_testing import FP16, FP32, assert_all_close, assert_bf16_parity, forward_backward

    dtype = DTYPES[dtype_name]
    inputs = [(t.to(dtype) if t.is_floating_point() else t).to(device) for t in inputs]
    out, grads = forward_backward(fn, inputs, grad_mask, "triton")
    for o in out:
        assert o.device.type == torch.device(device).type, f"output on {o.device}, expected {device}"
        assert o.dtype == (out_dtype or dtype), f"output dtype {o.dtype}, expected {out_dtype or dtype}"
    if dtype == torch.bfloat16:
        assert_bf16_parity(fn, ref, inputs, grad_mask, "triton", names)
        return
    ref_out, ref_grads = forward_backward(ref, [t.float() if t.is_floating_point() else t for t in inputs],
                                          grad_mask, "reference")
    assert_all_close(out + grads, ref_out + ref_grads, FP32 if dtype == torch.float32 else FP16, names)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


for _offset in (False, True):

    @_case(f"rms_norm/{{dt}}/offset={_offset}")
    def _rms(device, dt, offset=_offset):
        from fasttune.kernels import rms_norm
        from fasttune.kernels.reference import rms_norm_ref

        g = _gen(0)
        x, w = torch.randn(3, 5, 123, generator=g) * 2, torch.randn(123, generator=g) * 0.5 + 1
        _check(lambda x, w: rms_norm(x, w, 1e-6, offset), lambda x, w: rms_norm_ref(x, w, 1e-6, offset),
               [x, w], [True, True], ("y", "dx", "dw"), dt, device)
        _check(lambda x, w: rms_norm(x, w, 1e-6, offset), lambda x, w: rms_norm_ref(x, w, 1e-6, offset),
               [x[:1], w], [True, False], ("y", "dx", "dw (frozen)"), dt, device)


@_case("rope/{dt}")
def _rope(device, dt):
    from fasttune.kernels import apply_rope
    from fasttune.kernels.reference import apply_rope_ref

    g = _gen(1)
    b, s, d = 2, 9, 18
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], list(range(9))])
    freqs = pos[..., None].float() / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([freqs, freqs], -1)
    q = torch.randn(b, s, 3, d, generator=g).transpose(1, 2)  # a strided view, as transformers hands it
    k = torch.randn(b, 1, s, d, generator=g)
    for cos, sin in ((emb.cos(), emb.sin()), (emb.cos()[:1], emb.sin()[:1])):  # per-row, then broadcast
        _check(lambda q, k, c, sn: apply_rope(q, k, c, sn), apply_rope_ref, [q, k, cos, sin],
               [True, True, False, False], ("q", "k", "dq", "dk", "dcos", "dsin"), dt, device)


for _act in ("silu", "tanh", "none"):

    @_case(f"glu/{_act}/{{dt}}")
    def _glu(device, dt, act=_act):
        from fasttune.kernels import geglu, swiglu
        from fasttune.kernels.reference import geglu_ref, swiglu_ref

        g = _gen(2)
        gate, up = torch.randn(5, 7, 123, generator=g) * 3, torch.randn(5, 7, 123, generator=g)
        if act == "silu":
            fn, ref = swiglu, swiglu_ref
        else:
            fn, ref = (lambda a, b: geglu(a, b, act)), (lambda a, b: geglu_ref(a, b, act))
        _check(fn, ref, [gate, up], [True, True], ("h", "dgate", "dup"), dt, device)


for _softcap in (None, 4.0):

    @_case(f"cross_entropy/{{dt}}/softcap={_softcap}")
    def _ce(device, dt, softcap=_softcap):
        from fasttune.kernels import fused_linear_cross_entropy
        from fasttune.kernels.reference import linear_cross_entropy_ref

        g = _gen(3)
        n, h, v = 40, 24, 301
        hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
        bias = torch.randn(v, generator=g) * 0.1
        labels = torch.randint(0, v, (n,), generator=g)
        labels[::4] = -100
        labels = labels.to(device)
        kw = {"softcap": softcap, "num_items_in_batch": 50}
        _check(lambda a, w, b: fused_linear_cross_entropy(a, w, labels, chunk_size=16, bias=b, **kw),
               lambda a, w, b: linear_cross_entropy_ref(a, w, labels, bias=b, **kw), [hidden, weight, bias],
               [True, True, True], ("loss", "dhidden", "dweight", "dbias"), dt, device,
               out_dtype=torch.float32)


def run(names: list[str]) -> dict[str, str]:
    """Runs the named cases: ``{name: "ok" | traceback}``."""
    results = {}
    for name in names:
        try:
            CASES[name]()
            results[name] = "ok"
        except AssertionError:  # a parity failure: report it to the parent test, which fails with this text
            results[name] = traceback.format_exc(limit=3)
    return results


if __name__ == "__main__":
    # Import fasttune.kernels without fasttune/__init__.py (which pulls in transformers, peft, trl): faster start.
    package = types.ModuleType("fasttune")
    package.__path__ = [str(Path(__file__).resolve().parents[2] / "fasttune")]
    sys.modules["fasttune"] = package
    print(json.dumps(run(sorted(CASES))))
