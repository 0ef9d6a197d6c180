"""Selective log-probs: parity with the full-logits reference, the work it skips, and agreement with TRL's fused head."""

from __future__ import annotations

import collections

import pytest
import torch
from kernel_testing import BF16, FP32, assert_all_close, assert_bf16_parity, cotangents, leaf
from torch.utils._python_dispatch import TorchDispatchMode

from fasttune.kernels import use_backend
from fasttune.kernels.reference import selective_log_probs_ref
from fasttune.kernels.selective_logprob import selective_log_probs

NAMES = ("logps", "entropy", "dhidden", "dweight", "dbias")


def _inputs(n, hidden, vocab, dtype=torch.float32, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 2 / hidden**0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    b = (torch.randn(vocab, generator=gen) * 0.5).to(dtype) if bias else None
    return h, w, targets, b


def _run(fn, h, w, targets, b=None, weight_grad=True, **kw):
    """fn on leaf copies -> [logps, entropy, dh, dW, db], backpropagating fixed random ``dL/dlogps``."""
    hl, wl = leaf(h), leaf(w, weight_grad)
    bl = leaf(b) if b is not None else None
    logps, entropy = fn(hl, wl, targets, bias=bl, with_entropy=True, **kw)
    logps.backward(cotangents([logps])[0])
    return [logps.detach(), entropy, hl.grad, wl.grad, bl.grad if bl is not None else None]


def _compare(h, w, targets, b=None, weight_grad=True, tol=FP32, chunk_size=16, **kw):
    with use_backend("torch"):
        fast = _run(selective_log_probs, h, w, targets, b, weight_grad, chunk_size=chunk_size, **kw)
    ref = _run(selective_log_probs_ref, h, w, targets, b, weight_grad, **kw)
    assert fast[0].dtype == torch.float32 and fast[0].shape == (h.shape[0],)
    assert_all_close(fast, ref, tol, NAMES)
    return fast


@pytest.mark.parametrize("temperature,softcap,logit_scale", [
    (1.0, None, 1.0), (0.7, None, 1.0), (1.0, 5.0, 1.0), (1.0, None, 0.25), (0.6, 3.0, 1.7), (1.3, 30.0, 0.5),
])
def test_fp32_values_and_all_gradients(temperature, softcap, logit_scale):
    h, w, targets, b = _inputs(37, 24, 300, bias=True)  # 37 rows in chunks of 10: the last chunk has 7
    _compare(h, w, targets, b, chunk_size=10, temperature=temperature, softcap=softcap, logit_scale=logit_scale)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 1024])
def test_chunk_sizes_that_do_not_divide_the_rows(chunk_size):
    h, w, targets, b = _inputs(13, 7, 123, seed=1, bias=True)
    _compare(h, w, targets, b, chunk_size=chunk_size, temperature=0.9, softcap=4.0)


def test_transform_order_is_scale_then_softcap_then_temperature():
    """Each other order gives other values: the test above would not notice a swapped pair when it is linear."""
    h, w, targets, _ = _inputs(9, 16, 80, seed=2)
    with use_backend("torch"):
        ours, _ = selective_log_probs(h, w, targets, temperature=0.5, softcap=2.0, logit_scale=3.0)
    y = (h @ w.T) * 3.0
    expected = torch.log_softmax(2.0 * torch.tanh(y / 2.0) / 0.5, -1).gather(1, targets[:, None]).squeeze(1)
    swapped = torch.log_softmax(2.0 * torch.tanh(y / 0.5 / 2.0), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(ours, expected, **FP32)
    assert (ours - swapped).abs().max() > 1e-2


def test_entropy_is_the_full_distribution_entropy_and_detached():
    h, w, targets, _ = _inputs(11, 16, 90, seed=3)
    hl = leaf(h)
    with use_backend("torch"):
        logps, entropy = selective_log_probs(hl, w, targets, temperature=0.8, softcap=6.0, chunk_size=4,
                                             with_entropy=True)
        _, none = selective_log_probs(hl, w, targets)
    log_p = torch.log_softmax(6.0 * torch.tanh((h @ w.T) / 6.0) / 0.8, -1)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), **FP32)
    assert logps.requires_grad and not entropy.requires_grad and none is None


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bf16_values_and_gradients(softcap):
    # tiny: bf16 matmuls are emulated on this CPU. Within BF16 of the fp32 truth, no worse than the bf16 reference.
    h, w, targets, b = _inputs(8, 16, 64, torch.bfloat16, seed=4, bias=True)

    def fast(hh, ww, bb):
        return selective_log_probs(hh, ww, targets, bias=bb, temperature=0.7, softcap=softcap, chunk_size=3)[0]

    def ref(hh, ww, bb):
        return selective_log_probs_ref(hh, ww, targets, bias=bb, temperature=0.7, softcap=softcap)[0]

    assert_bf16_parity(fast, ref, [h, w, b], [True, True, True], "torch", ("logps", "dhidden", "dweight", "dbias"))
    with use_backend("torch"):
        out = _run(selective_log_probs, h, w, targets, b, temperature=0.7, softcap=softcap, chunk_size=3)
    truth = _run(selective_log_probs_ref, h.float(), w.float(), targets, b.float(), temperature=0.7, softcap=softcap)
    assert [t.dtype for t in out[2:]] == [torch.bfloat16] * 3, "gradients come back in the inputs' dtype"
    assert out[0].dtype == out[1].dtype == torch.float32
    assert_all_close(out[1:2], truth[1:2], BF16, ("entropy",))


def test_autocast_runs_the_matmuls_in_the_autocast_dtype():
    h, w, targets, b = _inputs(8, 16, 64, seed=5, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with use_backend("torch"):
            out = _run(selective_log_probs, h, w, targets, b, softcap=5.0, chunk_size=3)
        ref = _run(selective_log_probs_ref, h, w, targets, b, softcap=5.0)
    assert all(g.dtype == torch.float32 for g in out[2:])
    assert_all_close(out, ref, BF16, NAMES)


def test_zero_rows_return_empty_and_backward_works():
    h, w, targets, b = _inputs(0, 16, 50, bias=True)
    fast = _compare(h, w, targets, b)
    assert fast[0].shape == (0,) and fast[1].shape == (0,)
    assert fast[2].shape == (0, 16) and torch.count_nonzero(fast[3]) == 0 and torch.count_nonzero(fast[4]) == 0


class _OpCounter(TorchDispatchMode):
    """Counts aten calls by op name; records the largest tensor any op produced."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _matmuls(counter):
    return sum(counter.calls[name] for name in ("mm", "addmm", "addmm_", "matmul"))


def test_frozen_weight_gets_no_gradient_and_no_dw_matmul():
    h, w, targets, _ = _inputs(20, 48, 500, seed=6)
    fast = _compare(h, w, targets, None, weight_grad=False, chunk_size=8)
    assert fast[3] is None
    counts = {}
    for trained in (False, True):
        wl = leaf(w, trained)
        with use_backend("torch"), _OpCounter() as counter:
            selective_log_probs(leaf(h), wl, targets, chunk_size=8)[0].sum().backward()
        counts[trained] = _matmuls(counter)
        assert (wl.grad is None) == (not trained)
    # 3 chunks: forward logits, backward recomputed logits and dh; dW only when the weight is trained
    assert (counts[False], counts[True]) == (9, 12)


def test_never_materialises_the_full_logits():
    h, w, targets, b = _inputs(64, 4, 400, seed=7, bias=True)  # dW (400 x 4) is smaller than a chunk's logits
    hl, wl = leaf(h), leaf(w)
    with use_backend("torch"), _OpCounter() as counter:
        selective_log_probs(hl, wl, targets, bias=b, softcap=5.0, chunk_size=8, with_entropy=True)[0].sum().backward()
    assert counter.largest <= 8 * 400, f"a tensor of {counter.largest} elements; a chunk of logits is {8 * 400}"


def test_reference_backend_runs_the_reference():
    h, w, targets, _ = _inputs(5, 8, 30, seed=8)
    with use_backend("reference"), _OpCounter() as counter:
        selective_log_probs(h, w, targets, chunk_size=2)
    assert counter.calls["_log_softmax"] == 1


_BAD = [
    (dict(temperature=0.0), "temperature=0.0 must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(softcap=-1.0), "softcap=-1.0 must be a finite number > 0 or None"),
    (dict(logit_scale=float("inf")), "logit_scale=inf must be a finite number"),
    (dict(chunk_size=0), "chunk_size=0 must be a positive int"),
    (dict(hidden=torch.randn(2, 3, 8)), r"hidden \(2, 3, 8\) must be \(N, hidden\)"),
    (dict(weight=torch.randn(30, 9)), r"weight \(30, 9\) must be \(vocab, hidden\) with hidden = 8"),
    (dict(weight=torch.randn(30, 8, dtype=torch.float64)), "hidden dtype torch.float32 differs from weight dtype"),
    (dict(bias=torch.randn(29)), r"bias \(29,\) torch.float32 must be \(vocab,\) = \(30,\)"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), r"targets \(4,\) torch.int64 must be integer token ids of shape "
                                                     r"\(N,\) = \(5,\)"),
    (dict(targets=torch.zeros(5)), "targets .* torch.float32 must be integer token ids"),
    (dict(targets=torch.tensor([0, 1, 30, 2, -1])), r"targets must be in \[0, 30\) .* from -1 to 30"),
]


@pytest.mark.parametrize("bad,message", _BAD)
def test_clear_errors(bad, message):
    args = dict(hidden=torch.randn(5, 8), weight=torch.randn(30, 8), targets=torch.zeros(5, dtype=torch.long))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        selective_log_probs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_agrees_with_trls_chunked_logprob_kernel():
    """TRL's own kernel (the one its fused LM head calls) on the same tensors: values, entropy and gradients."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    h, w, targets, b = _inputs(19, 24, 200, seed=9, bias=True)
    kw = dict(temperature=0.7, softcap=4.0, logit_scale=1.5)

    def trl_op(hh, ww, tt, bias=None, with_entropy=True, **_):
        logps, entropy, *_rest = ChunkedLogProbFunction.apply(hh, ww, bias, tt, kw["temperature"], 64, kw["softcap"],
                                                              kw["logit_scale"], ("entropy",))
        return logps, entropy.detach()

    with use_backend("torch"):
        ours = _run(selective_log_probs, h, w, targets, b, chunk_size=6, **kw)
    theirs = _run(trl_op, h, w, targets, b)
    assert_all_close(ours, theirs, FP32, NAMES)


def test_agrees_with_trls_fused_lm_head_on_a_tiny_softcapped_model():
    """``add_fused_lm_head`` reads Gemma-2's ``final_logit_softcapping`` from the config; we pass it explicitly."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=3.0)
    model = Gemma2ForCausalLM(config).eval()
    add_fused_lm_head(model, temperature=0.8)
    ids = torch.randint(0, 64, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        trl_logps = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    mask = labels[:, 1:] != -100
    with use_backend("torch"):
        ours, _ = selective_log_probs(hidden[mask], model.lm_head.weight, labels[:, 1:][mask], temperature=0.8,
                                      softcap=config.final_logit_softcapping, chunk_size=4)
    torch.testing.assert_close(ours, trl_logps[mask], **FP32)
