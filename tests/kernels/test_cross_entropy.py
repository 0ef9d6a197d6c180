"""Fused linear cross-entropy: parity with the naive lm_head + cross-entropy, memory and work it avoids."""

from __future__ import annotations

import collections

import pytest
import torch
from kernel_testing import BF16, FP32, assert_all_close, assert_bf16_parity, forward_backward, leaf, saved_bytes
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers.loss.loss_utils import ForCausalLMLoss
from triton_cases import CASES

from fasttune.kernels import fused_linear_cross_entropy, use_backend
from fasttune.kernels.reference import linear_cross_entropy_ref

NAMES = ("loss", "dhidden", "dweight", "dbias")


def _inputs(lead, hidden, vocab, dtype=torch.float32, ignored=0.3, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype)
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < ignored] = -100
    b = (torch.randn(vocab, generator=gen) * 0.1).to(dtype) if bias else None
    return h, w, labels, b


def _ops(labels, chunk_size=16, **kw):
    def fast(h, w, b=None):
        return fused_linear_cross_entropy(h, w, labels, chunk_size=chunk_size, bias=b, **kw)

    def ref(h, w, b=None):
        return linear_cross_entropy_ref(h, w, labels, bias=b, **kw)

    return fast, ref


def _compare(h, w, labels, b, weight_grad=True, tol=FP32, chunk_size=16, **kw):
    fast, ref = _ops(labels, chunk_size, **kw)
    inputs, mask = ([h, w] + ([b] if b is not None else [])), [True, weight_grad, True]
    out, grads = forward_backward(fast, inputs, mask, "torch")
    ref_out, ref_grads = forward_backward(ref, inputs, mask, "reference")
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    assert_all_close(out + grads, ref_out + ref_grads, tol, NAMES)


@pytest.mark.parametrize("softcap", [None, 30.0, 2.0])
@pytest.mark.parametrize("num_items", [None, 300, "tensor"])
def test_torch_path_fp32(softcap, num_items):
    h, w, labels, _ = _inputs((2, 37), 64, 1000)
    items = torch.tensor(300) if num_items == "tensor" else num_items
    _compare(h, w, labels, None, softcap=softcap, num_items_in_batch=items)


def test_odd_shapes_bias_and_vocab_not_a_multiple_of_the_chunk():
    h, w, labels, b = _inputs((5, 123), 123, 1237, bias=True)
    _compare(h, w, labels, b, chunk_size=100, softcap=15.0)


def test_frozen_weight_gets_no_gradient_and_no_dw_matmul():
    h, w, labels, _ = _inputs((3, 20), 48, 500)
    _compare(h, w, labels, None, weight_grad=False)
    matmuls = {}
    for trained in (False, True):
        with use_backend("torch"), _OpCounter() as counter:
            fused_linear_cross_entropy(leaf(h), leaf(w, trained), labels, chunk_size=1024).backward()
        matmuls[trained] = sum(counter.calls[name] for name in ("mm", "addmm", "addmm_"))
    assert (matmuls[False], matmuls[True]) == (2, 3)  # logits and dh; dW only when trained


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_torch_path_bf16(softcap):
    # within BF16 (2e-2) of the fp32 reference on the same values, and no less accurate than the bf16 reference
    h, w, labels, _ = _inputs((4, 64), 96, 2000, torch.bfloat16)
    fast, ref = _ops(labels, 64, softcap=softcap)
    assert_bf16_parity(fast, ref, [h, w], [True, True], "torch", NAMES[:3])


def test_reference_matches_transformers_causal_lm_loss():
    """Our convention (labels already shifted by the caller) is transformers' ForCausalLMLoss after its shift."""
    h, w, labels, _ = _inputs((2, 15), 32, 200)
    logits = h @ w.T
    for items in (None, torch.tensor(7)):
        theirs = ForCausalLMLoss(logits, labels, 200, num_items_in_batch=items)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        ours = linear_cross_entropy_ref(h, w, shifted, num_items_in_batch=items)
        torch.testing.assert_close(ours, theirs, **FP32)
        with use_backend("torch"):
            torch.testing.assert_close(fused_linear_cross_entropy(h, w, shifted, num_items_in_batch=items), theirs,
                                       **FP32)


def test_autocast_runs_the_matmuls_in_the_autocast_dtype():
    """Under CPU bf16 autocast (fp32 parameters), as the naive loss does with F.linear autocast to bf16."""
    h, w, labels, b = _inputs((3, 40), 64, 700, bias=True)
    fast, ref = _ops(labels, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = forward_backward(fast, [h, w, b], [True, True, True], "torch")
        ref_out, ref_grads = forward_backward(ref, [h, w, b], [True, True, True], "reference")
    assert all(g.dtype == torch.float32 for g in grads)
    assert_all_close(out + grads, ref_out + ref_grads, BF16, NAMES)
    assert not torch.allclose(out[0], forward_backward(fast, [h, w, b], [True] * 3, "torch")[0][0], atol=1e-6, rtol=0)


def test_all_labels_ignored_gives_zero_loss_and_zero_grads():
    h, w, labels, _ = _inputs((2, 8), 16, 50, ignored=1.0)
    assert (labels == -100).all()
    hl, wl = leaf(h), leaf(w)
    with use_backend("torch"):
        loss = fused_linear_cross_entropy(hl, wl, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hl.grad) == 0 and torch.count_nonzero(wl.grad) == 0


class _OpCounter(TorchDispatchMode):
    """Counts aten calls by op name (FlopCounterMode does not count in-place addmm_)."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trained"])
def test_memory_does_not_scale_with_tokens_times_vocab(weight_grad):
    n, hidden, vocab, chunk = 1024, 64, 4000, 128
    h, w, labels, _ = _inputs((n,), hidden, vocab, ignored=0.0)
    hl, wl = leaf(h), leaf(w, weight_grad)
    fast, ref = _ops(labels, chunk)
    with use_backend("torch"):
        fused_saved = saved_bytes(lambda: fast(hl, wl), exclude=[hl, wl])
        with _LargestTensor() as mode:
            fast(hl, wl).backward()
    naive_saved = saved_bytes(lambda: ref(hl, wl), exclude=[hl, wl])
    # kept: d(hidden) of the labelled rows, d(weight) when trained, the labelled rows' int64 indices, the divisor
    grads_kept = n * hidden * 4 + (vocab * hidden * 4 if weight_grad else 0) + n * 8
    assert fused_saved <= grads_kept + 64, f"fused saved {fused_saved} bytes, expected about {grads_kept}"
    assert naive_saved >= n * vocab * 4, f"naive saved {naive_saved} bytes, expected the logits at least"
    assert mode.largest <= max(chunk * vocab, vocab * hidden), f"a tensor of {mode.largest} elements existed"
    assert mode.largest < n * vocab // 4


def test_bf16_weight_gradient_is_kept_in_bf16():
    n, hidden, vocab = 256, 32, 3000
    h, w, labels, _ = _inputs((n,), hidden, vocab, torch.bfloat16, ignored=0.0)
    hl, wl = leaf(h), leaf(w)
    with use_backend("torch"):
        kept = saved_bytes(lambda: fused_linear_cross_entropy(hl, wl, labels), exclude=[hl, wl])
    assert kept <= (n * hidden + vocab * hidden) * 2 + n * 8 + 64


def test_ignored_positions_skip_the_lm_head():
    h, w, labels, _ = _inputs((2, 512), 64, 3000, ignored=0.0)
    sparse = labels.clone()
    sparse[:, 64:] = -100  # 1/8 of the positions carry a label
    flops = {}
    for name, lab in (("dense", labels), ("sparse", sparse)):
        hl, wl = leaf(h), leaf(w)
        with use_backend("torch"), FlopCounterMode(display=False) as counter:
            fused_linear_cross_entropy(hl, wl, lab, chunk_size=256).backward()
        flops[name] = counter.get_total_flops()
    assert flops["sparse"] == pytest.approx(flops["dense"] / 8, rel=0.01)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"labels": torch.full((4,), 50)}, r"labels must be in \[0, 50\)"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, "leading shape"),
        ({"weight": torch.randn(50, 9)}, r"must be \(vocab, hidden\)"),
        ({"weight": torch.randn(50, 8, dtype=torch.float64)}, "dtype"),
        ({"softcap": 0.0}, "softcap=0.0"),
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"bias": torch.randn(49)}, "bias"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(50, 8), "labels": torch.zeros(4, dtype=torch.long)}
    args.update(kwargs)
    with use_backend("torch"), pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize("case", [name for name in CASES if name.startswith("cross_entropy/")])
def test_triton_interpreter(triton_results, case):
    assert triton_results[case] == "ok", triton_results[case]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("ignore_index", [-1, 0])
def test_ignore_index_other_than_minus_100(ignore_index, backend):
    """Rows labelled ``ignore_index`` are dropped, whatever its value: the loss and gradients equal a hand-written
    mean cross-entropy over the other rows only (with ignore_index=0, class 0 is never a target)."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(3, 29, 32, generator=gen)
    w = torch.randn(50, 32, generator=gen) / 32**0.5
    labels = torch.randint(1, 50, (3, 29), generator=gen)
    labels[torch.rand(3, 29, generator=gen) < 0.3] = ignore_index
    kept = labels != ignore_index
    assert 0 < int(kept.sum()) < labels.numel()

    def by_hand(h, w):
        return torch.nn.functional.cross_entropy(h[kept] @ w.T, labels[kept])

    def fast(h, w):
        return fused_linear_cross_entropy(h, w, labels, ignore_index=ignore_index, chunk_size=16)

    out, grads = forward_backward(fast, [h, w], [True, True], backend)
    ref_out, ref_grads = forward_backward(by_hand, [h, w], [True, True], "reference")
    assert_all_close(out + grads, ref_out + ref_grads, FP32, NAMES)
