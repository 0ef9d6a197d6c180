"""GRPO-family losses: parity with a loop-by-loop reference, agreement with TRL's ``_compute_loss``, and exact
gradient accumulation (which TRL's per-micro-batch bnpo normalisation does not have)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fasttune.rl.losses import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, grpo_loss, window_normalizer

TIGHT = {"atol": 1e-6, "rtol": 1e-5}
LENGTHS = (6, 3, 1, 5)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs: ratios far enough from 1 that the clip is active at both ends, at token and at sequence level
# ----------------------------------------------------------------------------------------------------------------------

def _batch(lengths=LENGTHS, width=6, seed=0, token_advantages=False):
    """logps, old_logps, ref_logps ``(B, T)``, advantages, bool mask. Sequence offsets of -/+0.5 push whole-sequence
    ratios below 1 - eps and above 1 + eps; advantage signs are chosen so both clip regions are hit."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(width).expand(b, width) < torch.tensor(lengths).unsqueeze(1)
    logps = -torch.rand(b, width, generator=gen) * 3 - 0.05
    offsets = torch.tensor([0.5, -0.5, 0.4, -0.45, 0.3, -0.35, 0.6, -0.6][:b]).unsqueeze(1)
    old = logps + offsets + 0.3 * torch.randn(b, width, generator=gen)
    ref = logps + 0.5 * torch.randn(b, width, generator=gen)
    adv = torch.tensor([-1.0, 1.2, 0.7, -0.8, 0.5, 1.5, -0.4, 0.9][:b])
    if token_advantages:
        adv = adv.unsqueeze(1) * (0.5 + torch.rand(b, width, generator=gen))
    return logps, old, ref, adv, mask


# ----------------------------------------------------------------------------------------------------------------------
# (a) A plain reference: Python loops over sequences and tokens, one formula per line
# ----------------------------------------------------------------------------------------------------------------------

def _reference(logps, old, adv, mask, ref, *, loss_type, beta, eps_low, eps_high, delta, level, max_len,
               bias_kl, normalizer=None):
    batch, width = logps.shape
    active = [[t for t in range(width) if mask[i, t]] for i in range(batch)]

    def advantage(i, t):
        return adv[i] if adv.dim() == 1 else adv[i, t]

    def log_ratio(i, t):
        if level == "token":
            return logps[i, t] - old[i, t]
        return sum(logps[i, s] - old[i, s] for s in active[i]) / max(len(active[i]), 1)

    def token_loss(i, t):
        r, a = torch.exp(log_ratio(i, t)), advantage(i, t)
        capped = r if delta is None else min(r, torch.tensor(delta))
        clipped = min(max(r, torch.tensor(1 - eps_low)), torch.tensor(1 + eps_high))
        loss = -min(capped * a, clipped * a)
        if beta:
            x = ref[i, t] - logps[i, t]
            kl = torch.exp(x) - x - 1
            loss = loss + beta * (kl * r if bias_kl else kl)
        return loss

    if loss_type == "grpo":
        numerator = sum(sum(token_loss(i, t) for t in active[i]) / max(len(active[i]), 1) for i in range(batch))
        denominator = batch
    else:
        numerator = sum(token_loss(i, t) for i in range(batch) for t in active[i])
        denominator = batch * max_len if loss_type == "dr_grpo" else sum(len(a) for a in active)
    return numerator / (normalizer or denominator)


def _value_and_grad(fn, logps):
    leaf = logps.detach().clone().requires_grad_(True)
    out = fn(leaf)
    loss = out.loss if hasattr(out, "loss") else out
    loss.backward()
    return loss.detach(), leaf.grad, out


VARIANTS = {
    "plain": dict(delta=None, bias_kl=False, token_advantages=False, eps_high=0.2),
    "delta_biaskl_tokenadv": dict(delta=1.4, bias_kl=True, token_advantages=True, eps_high=0.28),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_the_loop_reference(loss_type, level, beta, variant):
    v = VARIANTS[variant]
    logps, old, ref, adv, mask = _batch(token_advantages=v["token_advantages"])
    opts = dict(loss_type=loss_type, beta=beta, delta=v["delta"], max_len=8, level=level, eps_low=0.2,
                eps_high=v["eps_high"], bias_kl=v["bias_kl"])

    def ours(lp):
        return grpo_loss(lp, old, adv, mask, ref_logps=ref, loss_type=loss_type, beta=beta, epsilon_low=0.2,
                         epsilon_high=v["eps_high"], delta=v["delta"], importance_sampling_level=level,
                         max_completion_length=8, bias_correction_kl=v["bias_kl"])

    loss, grad, out = _value_and_grad(ours, logps)
    ref_loss, ref_grad, _ = _value_and_grad(lambda lp: _reference(lp, old, adv, mask, ref, **opts), logps)
    torch.testing.assert_close(loss, ref_loss, **TIGHT, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(grad, ref_grad, **TIGHT, msg=lambda m: f"d loss / d logps: {m}")
    assert out.clip_low_frac > 0 and out.clip_high_frac > 0, "the clip must be active at both ends in this test"
    assert torch.count_nonzero(grad[~mask]) == 0, "padding gets no gradient"


def test_clip_fractions_and_kl_mean_count_what_they_say():
    logps, old, ref, adv, mask = _batch()
    out = grpo_loss(logps, old, adv, mask, ref_logps=ref, epsilon_low=0.2, epsilon_high=0.28)
    pairs = [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    ratio = {p: math.exp(logps[p] - old[p]) for p in pairs}
    low = sum(bool(ratio[p] < 0.8 and adv[p[0]] < 0) for p in pairs) / len(pairs)  # plain floats (pytest 9.2's
    high = sum(bool(ratio[p] > 1.28 and adv[p[0]] > 0) for p in pairs) / len(pairs)  # approx refuses tensors)
    kl = float(sum(math.exp(ref[p] - logps[p]) - (ref[p] - logps[p]) - 1 for p in pairs) / len(pairs))
    assert (out.clip_low_frac.item(), out.clip_high_frac.item()) == pytest.approx((low, high))
    assert out.clip_region_frac.item() == pytest.approx(low + high)
    assert out.kl_mean.item() == pytest.approx(kl, rel=1e-5)
    assert out.num_tokens.item() == sum(LENGTHS) and out.normalizer.item() == len(LENGTHS)


def test_sequence_level_ratio_is_one_per_sequence():
    """GSPO: the ratio is exp(mean over the sequence's tokens of the log ratio); fractions count sequences."""
    logps, old, _, adv, mask = _batch()
    out = grpo_loss(logps, old, adv, mask, importance_sampling_level="sequence", loss_type="bnpo")
    seq_ratio = torch.exp(((logps - old) * mask).sum(-1) / mask.sum(-1))
    expected = -torch.minimum(seq_ratio * adv, seq_ratio.clamp(0.8, 1.2) * adv)
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(out.per_token_loss[i, :n], expected[i].expand(n), **TIGHT)
    low = ((seq_ratio < 0.8) & (adv < 0)).float().mean()
    assert out.clip_low_frac.item() == pytest.approx(low.item())


def test_empty_sequences_and_empty_batches():
    logps, old, _, adv, mask = _batch(lengths=(4, 0, 2))
    for level in IMPORTANCE_SAMPLING_LEVELS:
        loss, grad, _ = _value_and_grad(lambda lp, lv=level: grpo_loss(lp, old, adv, mask,
                                                                       importance_sampling_level=lv), logps)
        ref_loss, ref_grad, _ = _value_and_grad(lambda lp, lv=level: _reference(
            lp, old, adv, mask, None, loss_type="grpo", beta=0, eps_low=0.2, eps_high=0.2, delta=None, level=lv,
            max_len=None, bias_kl=False), logps)
        torch.testing.assert_close(loss, ref_loss, **TIGHT)
        torch.testing.assert_close(grad, ref_grad, **TIGHT)
    empty = torch.zeros(0, 5, requires_grad=True)
    out = grpo_loss(empty, empty.detach(), torch.zeros(0), torch.zeros(0, 5, dtype=torch.bool), loss_type="bnpo")
    out.loss.backward()
    assert out.loss.item() == 0.0 and empty.grad.shape == (0, 5)


def test_gspo_clip_fractions_count_only_sequences_with_tokens():
    """An empty completion has no ratio: counted in the denominator it would dilute the fraction (1/3 here, not 1/2)."""
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    old = torch.full((3, 4), -1.0)
    logps = old.clone()
    logps[0] -= 0.5  # sequence 0: ratio exp(-0.5) = 0.61 < 1 - 0.2, with a negative advantage: clipped low
    adv = torch.tensor([-1.0, -1.0, -1.0])
    for level, low in (("sequence", 1 / 2), ("token", 4 / 6)):
        out = grpo_loss(logps, old, adv, mask, importance_sampling_level=level, loss_type="bnpo")
        assert out.clip_low_frac.item() == pytest.approx(low), level
        assert out.clip_region_frac.item() == pytest.approx(low) and out.clip_high_frac.item() == 0.0


def test_on_policy_old_logps_none_means_ratio_one_and_the_policy_gradient():
    """With old = logps.detach() the ratio is 1 and d loss / d logp_it = -A_i / (n_i B) for grpo."""
    logps, _, _, adv, mask = _batch()
    _, grad, out = _value_and_grad(lambda lp: grpo_loss(lp, None, adv, mask), logps)
    n = mask.sum(-1, keepdim=True).float()
    torch.testing.assert_close(grad, (-adv.unsqueeze(1) / n / len(LENGTHS)) * mask, **TIGHT)
    assert out.clip_region_frac.item() == 0.0


def test_bf16_logps_are_computed_in_fp32():
    """601 is not a bf16 number: neither the token count nor the ratios are rounded to the logps' dtype; the
    gradient comes back in bf16."""
    logps, old, _, adv, mask = _batch(lengths=(300, 301), width=301)
    low = logps.bfloat16().requires_grad_(True)
    out = grpo_loss(low, old.bfloat16(), adv, mask, loss_type="bnpo")
    expected = grpo_loss(logps.bfloat16().float(), old.bfloat16().float(), adv, mask, loss_type="bnpo")
    out.loss.backward()
    assert out.num_tokens.item() == out.normalizer.item() == 601
    assert out.loss.dtype == torch.float32 and low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, expected.loss, **TIGHT)


def test_dapo_and_bnpo_agree_on_one_batch_and_differ_only_by_the_normalizer_passed():
    logps, old, _, adv, mask = _batch()
    bnpo = grpo_loss(logps, old, adv, mask, loss_type="bnpo")
    dapo = grpo_loss(logps, old, adv, mask, loss_type="dapo")
    global_tokens = grpo_loss(logps, old, adv, mask, loss_type="dapo", normalizer=torch.tensor(60))
    torch.testing.assert_close(bnpo.loss, dapo.loss, **TIGHT)
    torch.testing.assert_close(global_tokens.loss * 60, dapo.loss * sum(LENGTHS), **TIGHT)


# ----------------------------------------------------------------------------------------------------------------------
# (b) TRL's own GRPOTrainer._compute_loss, called unbound on a stub holding the attributes it reads
# ----------------------------------------------------------------------------------------------------------------------

def _trl_loss(logps, old, ref, adv, mask, *, loss_type, beta=0.0, level="token", eps_low=0.2, eps_high=0.2,
              delta=None, bias_kl=False, max_len=8, accumulation=1, steps_per_generation=None, num_items=None):
    """TRL 1.16's loss of one micro-batch and its logged metrics (logps is what the model would return)."""
    from trl import GRPOTrainer

    batch, width = logps.shape
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, _metrics=metrics,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation,
        max_completion_length=max_len,
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta,
                             steps_per_generation=steps_per_generation or accumulation),
        accelerator=SimpleNamespace(num_processes=1, sync_gradients=True, reduce=lambda x, reduction: x,
                                    gather=lambda x: x, gather_for_metrics=lambda x: x),
    )
    inputs = {
        "prompt_ids": torch.zeros(batch, 1, dtype=torch.long), "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.zeros(batch, width, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(mask.sum()) if num_items is None else float(num_items)),
    }
    return GRPOTrainer._compute_loss(stub, None, inputs), metrics["train"]


@pytest.mark.parametrize("beta,level,delta,bias_kl", [
    (0.0, "token", None, False), (0.04, "token", 1.4, True), (0.0, "sequence", None, False),
    (0.04, "sequence", 1.4, True), (0.04, "sequence", None, False),
])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_agrees_with_trl_compute_loss(loss_type, beta, level, delta, bias_kl):
    logps, old, ref, adv, mask = _batch()
    opts = dict(beta=beta, delta=delta, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level=level,
                bias_correction_kl=bias_kl, max_completion_length=8)
    loss, grad, out = _value_and_grad(lambda lp: grpo_loss(lp, old, adv, mask, ref_logps=ref, loss_type=loss_type,
                                                           **opts), logps)
    captured = {}

    def theirs(lp):
        value, captured["metrics"] = _trl_loss(lp, old, ref, adv, mask, loss_type=loss_type, beta=beta, level=level,
                                               eps_high=0.28, delta=delta, bias_kl=bias_kl)
        return value

    trl_loss, trl_grad, _ = _value_and_grad(theirs, logps)
    torch.testing.assert_close(loss, trl_loss, **TIGHT)
    torch.testing.assert_close(grad, trl_grad, **TIGHT)
    m = captured["metrics"]
    assert out.clip_low_frac.item() == pytest.approx(m["clip_ratio/low_mean"][0])
    assert out.clip_high_frac.item() == pytest.approx(m["clip_ratio/high_mean"][0])
    assert out.clip_region_frac.item() == pytest.approx(m["clip_ratio/region_mean"][0])
    if beta:
        assert out.kl_mean.item() == pytest.approx(m["kl"][0], rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# (c) Exact gradient accumulation with window_normalizer
# ----------------------------------------------------------------------------------------------------------------------

ACC_LENGTHS = (1, 12, 2, 11, 12, 10, 1, 3)  # 8 sequences, very unequal lengths, 4 micro-batches of 2


def _accumulate(fn, logps, micro=2):
    """Sum of fn over micro-batches of ``micro`` sequences, each backpropagated on its own (as a trainer does)."""
    leaf = logps.detach().clone().requires_grad_(True)
    total = 0.0
    for start in range(0, logps.shape[0], micro):
        loss = fn(leaf[start:start + micro], slice(start, start + micro))
        loss.backward()
        total = total + loss.detach()
    return total, leaf.grad


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_window_normalizer_makes_accumulation_exact(loss_type, level, beta):
    logps, old, ref, adv, mask = _batch(lengths=ACC_LENGTHS, width=12, seed=3)
    opts = dict(loss_type=loss_type, beta=beta, importance_sampling_level=level, max_completion_length=12,
                epsilon_high=0.28, delta=1.5)
    full, full_grad, _ = _value_and_grad(lambda lp: grpo_loss(lp, old, adv, mask, ref_logps=ref, **opts), logps)
    norm = window_normalizer(loss_type, [mask[i:i + 2] for i in range(0, 8, 2)], max_completion_length=12)
    summed, grad = _accumulate(lambda lp, s: grpo_loss(lp, old[s], adv[s], mask[s], ref_logps=ref[s],
                                                       normalizer=norm, **opts).loss, logps)
    torch.testing.assert_close(summed, full, **TIGHT)
    torch.testing.assert_close(grad, full_grad, **TIGHT)


def test_window_normalizer_values():
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 1]])]
    assert window_normalizer("grpo", masks) == 3.0
    assert window_normalizer("bnpo", masks) == window_normalizer("dapo", masks) == 6.0
    assert window_normalizer("dr_grpo", masks, max_completion_length=3) == 9.0
    assert window_normalizer("bnpo", [torch.zeros(2, 3)]) == 1.0  # never below 1: an all-padding window gives 0


def test_trl_per_micro_batch_normalisation():
    """Documents TRL 1.16: with unequal completion lengths its bnpo (each micro-batch's own token mean / steps) is
    NOT the full batch's token mean; grpo and dr_grpo (equal sequences per micro-batch) and dapo (num_items_in_batch
    of the window, steps_per_generation = accumulation steps) are."""
    logps, old, ref, adv, mask = _batch(lengths=ACC_LENGTHS, width=12, seed=3)
    for loss_type in LOSS_TYPES:
        full, _ = _trl_loss(logps, old, ref, adv, mask, loss_type=loss_type, max_len=12)
        summed, _ = _accumulate(lambda lp, s, lt=loss_type: _trl_loss(
            lp, old[s], ref[s], adv[s], mask[s], loss_type=lt, max_len=12, accumulation=4,
            num_items=mask.sum())[0], logps)
        if loss_type == "bnpo":
            assert abs(summed - full) > 0.05 * abs(full), (
                f"TRL bnpo accumulated {summed.item():.4f} vs full batch {full.item():.4f}")
            ours = grpo_loss(logps, old, adv, mask, loss_type="bnpo").loss
            torch.testing.assert_close(ours, full, **TIGHT)  # the full-batch value itself is the same
        else:
            torch.testing.assert_close(summed, full, **TIGHT)


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------

_BAD = [
    (dict(loss_type="ppo"), "loss_type: 'ppo' is not supported; allowed values are grpo, bnpo, dr_grpo, dapo"),
    (dict(importance_sampling_level="batch"), "importance_sampling_level: 'batch' is not supported; allowed values "
                                              "are token, sequence"),
    (dict(beta=0.1), r"ref_logps: beta=0.1 .* pass ref_logps \(batch, completion_len\) or set beta=0"),
    (dict(loss_type="dr_grpo"), "max_completion_length: loss_type='dr_grpo' normalises by"),
    (dict(old_logps=torch.zeros(4, 5)), r"old_logps \(4, 5\) must have logps' shape \(4, 6\)"),
    (dict(mask=torch.ones(6, 4)), r"mask \(6, 4\) must have logps' shape \(4, 6\)"),
    (dict(ref_logps=torch.zeros(4)), r"ref_logps \(4,\) must have logps' shape \(4, 6\)"),
    (dict(advantages=torch.zeros(3)), r"advantages \(3,\) must be \(batch,\) = \(4,\) or logps' shape \(4, 6\)"),
    (dict(logps=torch.zeros(24)), r"logps \(24,\) must be \(batch, completion_len\)"),
    (dict(epsilon_low=1.0), "epsilon_low=1.0 must be < 1"),
    (dict(epsilon_high=-0.1), "epsilon_high=-0.1 must be a finite number >= 0"),
    (dict(delta=0.0), "delta=0.0 must be a finite number > 0"),
    (dict(normalizer=0), "normalizer=0 must be a number > 0"),
    (dict(normalizer=torch.ones(2)), r"normalizer: a tensor of shape \(2,\)"),
    (dict(max_completion_length=0), "max_completion_length=0 must be a positive int or None"),
]


@pytest.mark.parametrize("bad,message", _BAD)
def test_clear_errors(bad, message):
    logps, old, ref, adv, mask = _batch()
    args = dict(logps=logps, old_logps=old, advantages=adv, mask=mask)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        grpo_loss(args.pop("logps"), args.pop("old_logps"), args.pop("advantages"), args.pop("mask"), **args)


def test_window_normalizer_errors():
    with pytest.raises(ValueError, match="loss_type: 'sapo' is not supported"):
        window_normalizer("sapo", [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="masks: pass a non-empty list"):
        window_normalizer("grpo", [])
    with pytest.raises(ValueError, match=r"masks\[1\] \(3,\) must be \(batch, completion_len\)"):
        window_normalizer("bnpo", [torch.ones(2, 3), torch.ones(3)])
    with pytest.raises(ValueError, match="max_completion_length=None: loss_type='dr_grpo' needs"):
        window_normalizer("dr_grpo", [torch.ones(2, 3)])
