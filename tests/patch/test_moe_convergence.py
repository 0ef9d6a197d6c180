"""Convergence of a mixture of experts: the same tiny MoE trained with the fast path on and off.

A dense model's runs can be compared step by step to rounding (test_convergence.py). A MoE's cannot, over many steps:
top-k routing is discontinuous, so once two experts' router scores for a token are within rounding of each other, a
summation-order difference (grouped experts vs transformers' loop, packed vs padded rows) picks the other expert and
the runs part. transformers' own two expert implementations (eager, grouped_mm) part the same way (measured: qwen3_moe
at step 25, gpt-oss at step 13 of 30), and so does the fast path (qwen3_moe at step 22).

So this test records every router input's scores and decisions of both runs: until the first step where any token's
top-k differs, the losses agree as a dense model's do (``LOSS_RTOL``, test_convergence.py's fp32 bound) and so do the
router scores of every token of every layer (``SCORE_RTOL`` of the largest score); at that step the scores still
agree that closely, so the flip was a near tie that the runs' rounding-size drift tipped (a flip needs the gap
between two experts' scores to be within twice the drift), not a wrong expert; and it comes late (not before
``MIN_AGREEING`` steps). A real error in the fast path changes the losses or the scores from the first step.
"""

from __future__ import annotations

import pytest
import torch
from fast_helpers import load_peft
from test_convergence import _examples, _padded

from fasttune.models import family as family_spec
from fasttune.patch import patch_model
from fasttune.tiny import FAMILIES
from fasttune.train import PaddingFreeCollator

MOE_FAMILIES = [f for f in FAMILIES if family_spec(f).moe is not None]
LOSS_RTOL = 1e-4  # as test_convergence.FP32: summation order, amplified by Adam on near-zero gradient components
SCORE_RTOL = 1e-2  # router scores, relative to the layer's largest: test_convergence.FP32's 1% bound on the updates
MIN_AGREEING = 6
# The runs' drift grows with the steps (Adam amplifies rounding in near-zero gradient components; measured on gpt-oss:
# 1e-6 of the largest router score at step 0, 1e-3 at step 12, 4.5e-2 at step 17), so a MoE is compared over fewer
# steps than a dense model.
MOE_STEPS = 12


def _train(model, fast: bool, router: str) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Losses and, per step, each sparse layer's ``(scores of every expert, top-k indices)`` of the real tokens."""
    calls: list = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((out[0].detach(), out[2].detach())))
             for name, m in model.named_modules() if name.endswith(f"mlp.{router}")]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    collate = PaddingFreeCollator()
    losses, routes = [], []
    model.train()
    for step in range(MOE_STEPS):
        examples = _examples(model.config.vocab_size, step)
        batch = collate(examples) if fast else _padded(examples)
        calls.clear()
        loss = model(**batch).loss
        keep = batch["attention_mask"].reshape(-1).bool() if not fast else None
        routes.append([(s[keep], i[keep]) if keep is not None else (s, i) for s, i in calls])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for hook in hooks:
        hook.remove()
    return losses, routes


def _score_drift(ref_route: list, route: list) -> float:
    """Largest difference of the two runs' router scores, relative to the largest score, over the layers."""
    return max(float((s.float() - ref_s.float()).abs().max() / ref_s.float().abs().max())
               for (ref_s, _), (s, _) in zip(ref_route, route))


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_training_agrees_until_a_routing_tie(family, tiny_model_dir):
    path = tiny_model_dir(family)
    router = family_spec(family).moe.router
    runs = {}
    for fast in (False, True):
        model = load_peft(path, seed=7)
        if fast:
            patch_model(model)
        runs[fast] = _train(model, fast, router)
    (ref_losses, ref_routes), (losses, routes) = runs[False], runs[True]
    assert losses[-1] < losses[0], f"{family}: training did not reduce the loss ({losses[0]:.3f} -> {losses[-1]:.3f})"
    first_flip = None
    for step in range(MOE_STEPS):
        drift = _score_drift(ref_routes[step], routes[step])
        assert drift <= SCORE_RTOL, f"{family} step {step}: router scores differ by {drift:.2e} of the largest"
        if any(not torch.equal(ref_i.sort(-1).values, i.sort(-1).values)
               for (_, ref_i), (_, i) in zip(ref_routes[step], routes[step])):
            first_flip = step  # a near tie (the scores agree within SCORE_RTOL): the runs part from here
            break
        a, b = losses[step], ref_losses[step]
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{family} step {step}: loss {a:.7f} vs {b:.7f} with equal routing"
    assert first_flip is None or first_flip >= MIN_AGREEING, f"{family}: routing parted at step {first_flip}"
