"""The kernels on a GPU (``pytest -m cuda``; skipped with the reason without one, see tests/cuda_testing.py).

Triton kernels run compiled (never ``TRITON_INTERPRET``) against the fp32 reference in fp32 and bf16, forward and
backward, on the same cases the CPU interpreter runs (triton_cases.py); the dispatcher picks them by itself for CUDA
tensors. The ops without a Triton twin (selective log-probs, grouped experts incl. 4-bit packed experts through
bitsandbytes' CUDA quantizer) run their torch path on CUDA against the reference.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from cuda_testing import DRY_RUN, bf16_runs_in_triton, device
from kernel_testing import BF16, FP32, assert_all_close, assert_bf16_parity, cotangents, leaf
from test_moe import LAYOUTS, _case, _run
from triton_cases import BODIES

from fasttune.kernels import select_backend, triton_available, use_backend
from fasttune.kernels.moe import moe_experts, moe_experts_reference
from fasttune.kernels.reference import selective_log_probs_ref
from fasttune.kernels.selective_logprob import selective_log_probs
from fasttune.quant.experts import PackedExperts

pytestmark = pytest.mark.cuda
DEV = device()


@pytest.fixture(scope="module")
def compiled_triton():
    """Triton installed and compiling (no interpreter) on the GPU; the dry run on CPU needs the interpreter."""
    if not triton_available():
        pytest.fail("triton is not installed: the CUDA kernels cannot be tested (pip install triton)")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if DRY_RUN and not interpreted:
        pytest.skip("the CPU dry run of Triton cases needs TRITON_INTERPRET=1 set before pytest starts")
    if not DRY_RUN:
        assert not interpreted, "TRITON_INTERPRET is set: the kernels would be interpreted, not compiled"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(BODIES))
def test_triton_kernel_matches_reference(compiled_triton, case, dtype):
    if dtype == "bf16" and not bf16_runs_in_triton():
        pytest.skip("the Triton interpreter's bf16 arithmetic is wrong (dry run on CPU)")
    BODIES[case](DEV.type, dtype)


def test_auto_dispatch_picks_triton_on_cuda(compiled_triton):
    if DRY_RUN:
        pytest.skip("auto picks the torch path on CPU tensors (dry run)")
    assert select_backend(torch.ones(2, device=DEV)) == "triton"


def _logprob_inputs(n, hidden, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 2 / hidden**0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    b = (torch.randn(vocab, generator=gen) * 0.5).to(dtype)
    return h.to(DEV), w.to(DEV), targets.to(DEV), b.to(DEV)


def _logprob_run(fn, h, w, targets, b, **kw):
    hl, wl, bl = leaf(h), leaf(w), leaf(b)
    logps, entropy = fn(hl, wl, targets, bias=bl, with_entropy=True, **kw)
    logps.backward(cotangents([logps])[0])
    return [logps.detach(), entropy, hl.grad, wl.grad, bl.grad]


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_selective_log_probs_fp32(softcap):
    h, w, targets, b = _logprob_inputs(37, 24, 300, torch.float32)
    kw = dict(temperature=0.7, softcap=softcap)
    with use_backend("auto"):
        fast = _logprob_run(selective_log_probs, h, w, targets, b, chunk_size=10, **kw)
    ref = _logprob_run(selective_log_probs_ref, h, w, targets, b, **kw)
    assert fast[0].device.type == DEV.type and fast[0].dtype == torch.float32
    assert_all_close(fast, ref, FP32, ("logps", "entropy", "dhidden", "dweight", "dbias"))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_selective_log_probs_bf16(softcap):
    h, w, targets, b = _logprob_inputs(8, 16, 64, torch.bfloat16, seed=4)  # the CPU bf16 test's case

    def fast(hh, ww, bb):
        return selective_log_probs(hh, ww, targets, bias=bb, temperature=0.7, softcap=softcap, chunk_size=3)[0]

    def ref(hh, ww, bb):
        return selective_log_probs_ref(hh, ww, targets, bias=bb, temperature=0.7, softcap=softcap)[0]

    assert_bf16_parity(fast, ref, [h, w, b], [True, True, True], "auto", ("logps", "dhidden", "dweight", "dbias"))


def _on_device(case, packed: bool):
    """test_moe's case moved to the device; ``packed``: the experts quantized there (bitsandbytes' CUDA NF4)."""
    x, logits, top, gate_up, down, biases, adapters = case
    gate_up, down = gate_up.to(DEV), down.to(DEV)
    if packed:
        gate_up, down = PackedExperts.pack(gate_up), PackedExperts.pack(down)
        assert gate_up.codes.device.type == DEV.type
    return (x.to(DEV), logits.to(DEV), top.to(DEV), gate_up, down,
            tuple(None if b is None else b.to(DEV) for b in biases),
            {k: (a.to(DEV), b.to(DEV), s) for k, (a, b, s) in adapters.items()})


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_grouped_experts_fp32(family, packed):
    layout = LAYOUTS[family]
    case = _on_device(_case(layout, "both", packed=False), packed)
    got, want = _run(moe_experts, layout, case), _run(moe_experts_reference, layout, case)
    names = ["output", "grad x", "grad router logits", "grad A gate_up", "grad B gate_up", "grad A down", "grad B down"]
    for name, g, w in zip(names, got, want):
        assert g.device.type == DEV.type, f"{name} on {g.device}"
        scale = float(w.abs().max())
        torch.testing.assert_close(g, w, atol=2e-6 * scale, rtol=1e-5,
                                   msg=lambda m, name=name: f"{family} {name}: {m}")


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_grouped_experts_bf16(family):
    """bf16 on the GPU runs transformers' grouped_mm for real (CUDA's bf16 grouped product)."""
    layout = dataclasses.replace(LAYOUTS[family], limit=7.0)  # see test_moe's bf16 test for the clamp
    case = _on_device(_case(layout, "both", packed=False), packed=False)
    got = _run(moe_experts, layout, case, dtype=torch.bfloat16)
    want = _run(moe_experts_reference, layout, case)
    for g, w in zip(got, want):
        scale = float(w.abs().max())
        torch.testing.assert_close(g.float(), w, atol=BF16["atol"] * scale, rtol=BF16["rtol"])
