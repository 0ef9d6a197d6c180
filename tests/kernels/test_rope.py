"""RoPE parity: fast torch path and Triton kernel against the reference (q, k and their gradients)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import FP32, assert_all_close, assert_bf16_parity, forward_backward, leaf, saved_bytes
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from triton_cases import CASES

from fasttune.kernels import apply_rope, use_backend
from fasttune.kernels.reference import apply_rope_ref

NAMES = ("q", "k", "dq", "dk", "dcos", "dsin")
MASK = [True, True, False, False]


def _cos_sin(position_ids: torch.Tensor, head_dim: int, dtype=torch.float32):
    """cos/sin ``(batch, seq, head_dim)`` exactly as transformers' Llama rotary embedding builds them."""
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    return rotary(torch.zeros(1, dtype=dtype), position_ids)


def _qk(b, hq, hk, s, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=gen).transpose(1, 2).to(dtype)  # strided, as transformers hands it
    k = torch.randn(b, hk, s, d, generator=gen).to(dtype)
    return q, k


@pytest.mark.parametrize("b,hq,hk,s,d", [(2, 4, 2, 16, 64), (5, 3, 1, 123, 18), (1, 2, 2, 7, 128)])
def test_torch_path_fp32(b, hq, hk, s, d):
    pos = torch.randint(0, 4096, (b, s))  # arbitrary per-token positions, not just arange
    cos, sin = _cos_sin(pos, d)
    q, k = _qk(b, hq, hk, s, d)
    out, grads = forward_backward(apply_rope, [q, k, cos, sin], MASK, "torch")
    ref_out, ref_grads = forward_backward(apply_rope_ref, [q, k, cos, sin], MASK, "reference")
    assert_all_close(out + grads, ref_out + ref_grads, FP32, NAMES)


def test_torch_path_bf16():
    # bf16 q/k/cos/sin (transformers casts cos/sin to the activations' dtype): within BF16 of fp32.
    pos = torch.arange(123).repeat(5, 1)
    cos, sin = _cos_sin(pos, 18, torch.bfloat16)
    q, k = _qk(5, 3, 1, 123, 18, torch.bfloat16)
    assert_bf16_parity(apply_rope, apply_rope_ref, [q, k, cos, sin], MASK, "torch", NAMES)


def test_reference_matches_transformers():
    pos = torch.randint(0, 100, (2, 11))
    cos, sin = _cos_sin(pos, 32)
    q, k = _qk(2, 4, 2, 11, 32)
    for ours, theirs in zip(apply_rope_ref(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_packed_positions_restart_per_sequence():
    """Two sequences packed in one row with restarting positions rotate exactly as each one alone."""
    lengths, d = (5, 9), 16
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    q, k = _qk(1, 2, 1, sum(lengths), d)
    with use_backend("torch"):
        packed_q, packed_k = apply_rope(q, k, *_cos_sin(pos, d))
        start = 0
        for n in lengths:
            alone = apply_rope(q[:, :, start:start + n], k[:, :, start:start + n], *_cos_sin(torch.arange(n)[None], d))
            torch.testing.assert_close(packed_q[:, :, start:start + n], alone[0], **FP32)
            torch.testing.assert_close(packed_k[:, :, start:start + n], alone[1], **FP32)
            start += n
        # positions that do not restart rotate the second sequence differently: the test can tell them apart
        unpacked_q, _ = apply_rope(q, k, *_cos_sin(torch.arange(sum(lengths))[None], d))
    assert (unpacked_q[:, :, 6:] - packed_q[:, :, 6:]).abs().max() > 0.1


def test_broadcast_batch_of_cos_sin_and_cos_with_grad():
    pos = torch.arange(10)[None]
    cos, sin = _cos_sin(pos, 16)
    q, k = _qk(3, 2, 2, 10, 16)
    out, grads = forward_backward(apply_rope, [q, k, cos, sin], MASK, "torch")
    ref_out, ref_grads = forward_backward(apply_rope_ref, [q, k, cos, sin], MASK, "reference")
    assert_all_close(out + grads, ref_out + ref_grads, FP32, NAMES)
    # cos/sin needing a gradient (learned positions) fall back to plain autograd and get one
    out, grads = forward_backward(apply_rope, [q, k, cos, sin], [True] * 4, "torch")
    ref_out, ref_grads = forward_backward(apply_rope_ref, [q, k, cos, sin], [True] * 4, "reference")
    assert_all_close(out + grads, ref_out + ref_grads, FP32, NAMES)


def test_saves_only_cos_and_sin():
    pos = torch.arange(256).repeat(2, 1)
    cos, sin = _cos_sin(pos, 64, torch.bfloat16)
    q, k = (leaf(t) for t in _qk(2, 8, 2, 256, 64, torch.bfloat16))
    with use_backend("torch"):
        fast = saved_bytes(lambda: apply_rope(q, k, cos, sin), exclude=[q, k])
    assert fast == cos.nbytes + sin.nbytes  # nothing of the size of q or k


@pytest.mark.parametrize("bad", ["head_dim", "k_seq", "cos_shape"])
def test_rejects_bad_shapes(bad):
    q, k = _qk(1, 2, 1, 4, 8)
    cos, sin = _cos_sin(torch.arange(4)[None], 8)
    if bad == "head_dim":
        q, k, cos, sin = q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]
    elif bad == "k_seq":
        k = k[:, :, :3]
    else:
        cos = cos[:, :3]
    with pytest.raises(ValueError, match="apply_rope"):
        apply_rope(q, k, cos, sin)


@pytest.mark.parametrize("case", [name for name in CASES if name.startswith("rope/")])
def test_triton_interpreter(triton_results, case):
    assert triton_results[case] == "ok", triton_results[case]

