"""kernels/segment_attention.py against F.scaled_dot_product_attention per segment: output, q/k/v gradients, with and
without a checkpoint's kept first forward; odd segment lengths; fp32 and bf16 with their own tolerances."""

from __future__ import annotations

import pytest
import torch

from fasttune.kernels import segment_attention as sa
from fasttune.kernels.recompute import CheckpointScope, checkpoint_scope, recomputing

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
LENGTHS = [(123,), (5, 123, 64), (1, 17, 256)]


def _inputs(lengths, dtype, heads=3, dim=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(heads, n, dim, generator=g).to(dtype).requires_grad_(True) for _ in range(3))
    return q, k, v, torch.randn(heads, n, dim, generator=g).to(dtype)


def _grads(fn, q, k, v, grad):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach().float(), [t.grad.float() for t in (q, k, v)]


def _check(name, fast, ref, dtype):
    diff = (fast - ref).abs()
    assert torch.allclose(fast, ref, **TOL[dtype]), f"{name} {dtype}: max abs diff {diff.max():.3e} at {diff.argmax()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_sdpa_per_segment(lengths, dtype):
    q, k, v, grad = _inputs(lengths, dtype)
    scale = 40 ** -0.5
    ref = _grads(lambda *t: sa.segment_attention_reference(*t, lengths, scale), q, k, v, grad)
    fast = _grads(lambda *t: sa.segment_attention(*t, lengths, scale), q, k, v, grad)
    _check("out", fast[0], ref[0], dtype)
    for name, f, r in zip("qkv", fast[1], ref[1]):
        _check(f"d{name}", f, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,kv_heads", [(None, 6), (None, 2), (50, 2)], ids=["causal", "causal-gqa", "window-gqa"])
def test_causal_window_and_grouped_heads_match_sdpa(window, kv_heads, dtype):
    """Text rows: causal per example, a sliding window shorter than the longest segment (123 > 50), and grouped-query
    heads (k, v with fewer heads, read shared by the kernel; their gradients summed over the group)."""
    lengths = (5, 123, 64)
    q, _, _, grad = _inputs(lengths, dtype, heads=6, seed=2)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(kv_heads, sum(lengths), 40, generator=g).to(dtype).requires_grad_(True) for _ in range(2))
    ref = _grads(lambda *t: sa.segment_attention_reference(*t, lengths, 0.15, causal=True, window=window), q, k, v,
                 grad)
    fast = _grads(lambda *t: sa.segment_attention(*t, lengths, 0.15, causal=True, window=window), q, k, v, grad)
    bidirectional = _grads(lambda *t: sa.segment_attention_reference(*t, lengths, 0.15), q, k, v, grad)
    assert not torch.allclose(bidirectional[0], ref[0], **TOL[dtype]), "the mask must matter in this case"
    _check("out", fast[0], ref[0], dtype)
    for name, f, r in zip("qkv", fast[1], ref[1]):
        _check(f"d{name}", f, r, dtype)


def test_bad_head_counts_and_window_without_causal():
    q, k, v, _ = _inputs((4,), torch.float32, heads=6)
    with pytest.raises(ValueError, match="heads"):
        sa.segment_attention(q, k[:4], v[:4], (4,), 0.1, causal=True)
    with pytest.raises(ValueError, match="window"):
        sa.segment_attention(q, k, v, (4,), 0.1, window=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_reuses_the_first_forward(dtype, monkeypatch):
    lengths = (5, 123, 64)
    q, k, v, grad = _inputs(lengths, dtype, seed=1)
    scale = 0.2
    ref = _grads(lambda *t: sa.segment_attention_reference(*t, lengths, scale), q, k, v, grad)
    scope = CheckpointScope()
    with torch.no_grad(), checkpoint_scope(scope):  # the checkpoint's first forward keeps (out, lse)
        first = sa.segment_attention(q, k, v, lengths, scale)
    assert len(scope.kept) == 1
    calls = []
    forward = sa._FORWARD
    monkeypatch.setattr(sa, "_FORWARD", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    with recomputing(), checkpoint_scope(scope):  # the recompute: no attention forward runs again
        fast = _grads(lambda *t: sa.segment_attention(*t, lengths, scale), q, k, v, grad)
    assert not calls and scope.kept == [()]
    _check("first forward", first.float(), ref[0], dtype)
    _check("out", fast[0], ref[0], dtype)
    for name, f, r in zip("qkv", fast[1], ref[1]):
        _check(f"d{name}", f, r, dtype)


def test_a_kept_entry_of_another_shape_is_not_used():
    scope = CheckpointScope()
    q, k, v, _ = _inputs((7, 9), torch.float32)
    with torch.no_grad(), checkpoint_scope(scope):
        sa.segment_attention(q, k, v, (7, 9), 0.3)
    q2, k2, v2, _ = _inputs((4, 4), torch.float32)
    with recomputing(), checkpoint_scope(scope):
        out = sa.segment_attention(q2, k2, v2, (4, 4), 0.3)
    torch.testing.assert_close(out, sa.segment_attention_reference(q2, k2, v2, (4, 4), 0.3), rtol=1e-4, atol=1e-5)
    assert scope.cursor == 0  # the kept entry stayed unused


def test_lengths_must_cover_the_sequence():
    q, k, v, _ = _inputs((7, 9), torch.float32)
    with pytest.raises(ValueError, match=r"lengths: \[7, 8\] sum to 15, but q has 16 positions"):
        sa.segment_attention(q, k, v, (7, 8), 0.3)
