"""What ``fasttune.trl.GRPOTrainer`` adds to TRL's: fast rollouts, log-probs scored only where they count, exact
gradient accumulation, and reward functions checked by name.

Each piece replaces one TRL method and falls back to TRL's own wherever its conditions do not hold (vLLM,
multimodal inputs, loss types other than grpo/bnpo/dr_grpo/dapo, entropy masks or bonuses, DDP/FSDP wrappers), so
every TRL option keeps working; the fasttune path is the common single-process LoRA/QLoRA text case. A model loaded
with ``fast_inference=True`` on CUDA with vLLM installed samples through TRL's own vLLM integration (colocate mode).

- ``_generate_single_turn``: completions from :func:`fasttune.rl.engine.generate_ids` (KV cache over the live LoRA
  weights, each prompt prefilled once for its ``num_generations`` samples, finished rows dropped) instead of
  ``model.generate``.
- ``_get_per_token_logps_and_entropies``: the backbone's hidden states at the completion tokens only, through
  :func:`fasttune.kernels.selective_logprob.selective_log_probs` (chunked; never the ``(tokens, vocab)`` logits);
  TRL's fused head on CPU scores every position, prompt included. Position ids follow the attention mask, as they do
  during generation, so left-padded prompts are scored at the positions they were sampled at.
- ``_compute_loss``: :func:`fasttune.rl.losses.grpo_loss` with the normaliser of the whole accumulation window, so
  ``gradient_accumulation_steps=k`` gives the loss and gradients of one batch k times larger (TRL divides each
  micro-batch's own mean by k, which differs for ``bnpo`` when completion lengths differ between micro-batches).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from typing import Any

import torch

from fasttune.config import _raise_if
from fasttune.lora.unwrap import base_model
from fasttune.notes import note_once
from fasttune.rl.losses import LOSS_TYPES
from fasttune.rl.rewards import RewardFunctionError, checked_reward_funcs
from fasttune.rl.sampling import filter_problems
from fasttune.state import model_state

from .compat import explicitly_set

logger = logging.getLogger("fasttune")
# GRPOTrainer(on_unusable_rewards=...): what a step in which no completion got a reward does
UNUSABLE_REWARDS: tuple[str, ...] = ("error", "skip")

FAST_LOSS_TYPES = LOSS_TYPES  # every type rl/losses.py implements runs the fast path
# generation_kwargs the engine understands (the rest send rollouts back to TRL's model.generate)
_ENGINE_GENERATION_KWARGS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
                             "repetition_penalty", "pad_token_id", "bos_token_id", "eos_token_id",
                             "cache_implementation"}


def valid_num_generations(generation_batch_size: int) -> list[int]:
    """``num_generations`` values (>= 2: GRPO's advantages need a group) that divide ``generation_batch_size``."""
    return [n for n in range(2, generation_batch_size + 1) if generation_batch_size % n == 0]


def check_generation_batch(args: Any, num_processes: int = 1) -> None:
    """Raise a ValueError that says which numbers would work when ``num_generations`` does not divide the
    generation batch (TRL's message only states the rule)."""
    n = getattr(args, "num_generations", None)
    if n is None:
        return
    if n < 2:
        raise ValueError(f"num_generations: {n} is too small; GRPO compares completions within a group, so it needs "
                         "at least 2 per prompt")
    per_step = args.per_device_train_batch_size * num_processes
    steps = args.steps_per_generation or args.gradient_accumulation_steps
    batch = args.generation_batch_size or per_step * steps
    if batch % n:
        sizes = [b for b in range(1, 4 * n + 1) if (b * num_processes * steps) % n == 0][:4]
        raise ValueError(
            f"num_generations: {n} does not divide the generation batch of {batch} completions "
            f"(per_device_train_batch_size={args.per_device_train_batch_size} x {num_processes} process(es) x "
            f"{steps} step(s) per generation). num_generations values that would: {valid_num_generations(batch)}; "
            f"or keep num_generations={n} with per_device_train_batch_size in {sizes}")


class FastGRPOConfigMixin:
    """``GRPOConfig`` that names the valid ``num_generations`` / batch sizes when they do not fit, and refuses bad
    sampling filters at construction (TRL's own class accepts ``temperature=-1`` and fails at the first rollout)."""

    def __post_init__(self) -> None:
        check_generation_batch(self, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun/accelerate set it
        problems = filter_problems(self.temperature, self.top_p, self.top_k, 0.0 if self.min_p is None else self.min_p,
                                   1.0 if self.repetition_penalty is None else self.repetition_penalty)
        _raise_if(problems, "GRPOConfig")
        super().__post_init__()


def vllm_rollouts_wanted(model: Any, args: Any) -> bool:
    """Whether to sample through TRL's vLLM integration: the model was loaded with ``fast_inference=True``, a CUDA
    device and vLLM are there, and the config did not choose ``use_vllm`` itself."""
    state = model_state(model)
    options = state.rl if state is not None else None
    if options is None or not options.fast_inference or args is None or explicitly_set(args, "use_vllm"):
        return False
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def use_vllm_colocate(model: Any, args: Any) -> None:
    """Set ``args`` (the trainer's own copy) to TRL's vLLM colocate mode with the model's memory share."""
    args.use_vllm, args.vllm_mode = True, "colocate"
    share = model_state(model).rl.gpu_memory_utilization
    if share is not None:
        args.vllm_gpu_memory_utilization = share
    note_once("grpo.vllm", "GRPOTrainer: fast_inference=True with vLLM installed on CUDA: rollouts use TRL's vLLM "
                           f"integration (colocate, gpu_memory_utilization={args.vllm_gpu_memory_utilization})")


class FastGRPOMixin:
    """Mixed in before TRL's ``GRPOTrainer`` (see the module docstring)."""

    def __init__(self, *args: Any, on_unusable_rewards: str = "error", **kwargs: Any) -> None:
        if on_unusable_rewards not in UNUSABLE_REWARDS:
            raise ValueError(f"on_unusable_rewards: {on_unusable_rewards!r} is not allowed; allowed: "
                             f"{', '.join(UNUSABLE_REWARDS)}")
        if vllm_rollouts_wanted(kwargs.get("model"), kwargs.get("args")):
            use_vllm_colocate(kwargs["model"], kwargs["args"])
        super().__init__(*args, **kwargs)
        self.fasttune_on_unusable_rewards = on_unusable_rewards
        self.reward_funcs = checked_reward_funcs(self.reward_funcs, self.reward_func_names,
                                                 lambda: self.state.global_step)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (gathered over the processes, so every rank decides alike), refused when no completion of the
        step got a number from any reward function: the advantages, the loss and the gradient would all be 0, and
        training would go on learning nothing without a word."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if len(rewards) and bool(torch.isnan(rewards).all()):
            message = (f"GRPOTrainer: at training step {self.state.global_step} no reward function returned a number "
                       f"for any of the {len(rewards)} completions (every reward was None), so the loss and the "
                       "gradient are 0 and nothing is learned")
            if self.fasttune_on_unusable_rewards == "error":
                raise RewardFunctionError(message + "; make the reward functions score these completions, or pass "
                                                    "on_unusable_rewards='skip' to GRPOTrainer to go on")
            logger.warning("%s; the step changes nothing (on_unusable_rewards='skip')", message)
        return rewards

    # ---------------------------------------------------------------- rollouts
    def _fasttune_model(self) -> Any | None:
        """The model to run ourselves, or None where TRL's path must run (wrapped / sharded models)."""
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return None
        model = self.accelerator.unwrap_model(self.model_wrapped)
        return model if model is self.model else None

    def _fasttune_rollouts_apply(self, images: Any, multimodal_fields: Any) -> bool:
        extra = set(self.generation_kwargs) - _ENGINE_GENERATION_KWARGS if hasattr(self, "generation_kwargs") else set()
        if extra:
            note_once(f"grpo.generation_kwargs{sorted(extra)}", f"GRPOTrainer: generation_kwargs {sorted(extra)} are "
                                                                 "not handled by fasttune's rollout engine; "
                                                                 "completions come from model.generate")
        return (not self.use_vllm and not self.use_transformers_continuous_batching and not images
                and not multimodal_fields and not extra and self._fasttune_model() is not None)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self._fasttune_rollouts_apply(images, multimodal_fields):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        from fasttune.rl.engine import generate_ids
        from fasttune.rl.sampling import SamplingParams

        # RepeatSampler gives each prompt's num_generations copies side by side: sample each distinct prompt once
        groups = [(list(ids), len(list(copies))) for ids, copies in itertools.groupby(map(tuple, prompt_ids))]
        same_n = len({count for _, count in groups}) == 1
        prompts = [ids for ids, _ in groups] if same_n else [list(ids) for ids in prompt_ids]
        params = SamplingParams(
            n=groups[0][1] if same_n else 1, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k if self.top_k else -1, min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty, max_tokens=self.max_completion_length)
        model = self._fasttune_model()
        state = model_state(model)
        max_length = state.max_seq_length if state is not None else None
        self._check_prompt_lengths(prompts, max_length)
        completions = generate_ids(model, prompts, params, eos_token_ids=self.eos_token_ids,
                                   pad_token_id=self._tokenizer.pad_token_id, max_length=max_length)
        return [list(c.token_ids) for per_prompt in completions for c in per_prompt], None

    def _check_prompt_lengths(self, prompts: list[list[int]], max_length: int | None) -> None:
        """A prompt that leaves no room for ``max_completion_length`` is reported with its text, never cut."""
        if max_length is None:
            return
        for index, ids in enumerate(prompts):
            if len(ids) + self.max_completion_length > max_length:
                text = self._tokenizer.decode(ids[:24], skip_special_tokens=True)
                raise ValueError(
                    f"prompt {index} of this generation batch ({text!r}...) has {len(ids)} tokens; with "
                    f"max_completion_length={self.max_completion_length} it needs max_seq_length >= "
                    f"{len(ids) + self.max_completion_length}, and the model's is {max_length}. Shorten or filter "
                    "long prompts, or load the model with a larger max_seq_length")

    # ---------------------------------------------------------------- log-probs
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        ours = model is self._fasttune_model()  # a DDP/FSDP wrapper is called as TRL calls it (gradient sync)
        transform = _logit_transform(base_model(model).config.get_text_config()) if ours else None
        if compute_aux_loss or any(v is not None for v in multimodal.values()) or transform is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        from fasttune.kernels.selective_logprob import selective_log_probs

        causal_lm = base_model(model)
        backbone, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
        softcap, scale = transform
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            with self.accelerator.autocast():
                hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  use_cache=False).last_hidden_state
            hidden = hidden[:, -logits_to_keep - 1:-1]
            scored = mask[:, -logits_to_keep:].bool()
            lp, ent = selective_log_probs(hidden[scored], head.weight, ids[:, -logits_to_keep:][scored],
                                          bias=head.bias, temperature=self.temperature, softcap=softcap,
                                          logit_scale=scale, with_entropy=compute_entropy)
            zeros = torch.zeros(scored.shape, dtype=lp.dtype, device=lp.device)
            logps.append(zeros.masked_scatter(scored, lp))
            if compute_entropy:
                entropies.append(zeros.masked_scatter(scored, ent))
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    # ---------------------------------------------------------------- loss
    def _fasttune_loss_applies(self) -> bool:
        return (self.loss_type in FAST_LOSS_TYPES and self.off_policy_mask_threshold is None
                and self.top_entropy_quantile >= 1.0 and not getattr(self, "_entropy_bonus_enabled", False)
                and not (self.use_vllm and self.vllm_importance_sampling_correction)
                and not self.aux_loss_enabled)

    def _window_normalizer(self, inputs: dict[str, Any]) -> float | None:
        """The loss normaliser of the accumulation window this micro-batch belongs to (None: this batch alone)."""
        from fasttune.rl.losses import window_normalizer

        if not self.model.training:
            masks = [inputs["completion_mask"]]
        else:
            accumulation, per_generation = self.current_gradient_accumulation_steps, self.args.steps_per_generation
            buffered = self._buffered_inputs
            if buffered is None or per_generation % accumulation:
                note_once("grpo.window", f"GRPOTrainer: steps_per_generation={per_generation} is not a multiple of "
                                         f"gradient_accumulation_steps={accumulation}, so an accumulation window spans "
                                         "generations; each micro-batch is normalised on its own")
                return None
            first = (self._step % per_generation) // accumulation * accumulation
            masks = [batch["completion_mask"] for batch in buffered[first:first + accumulation]]
        normalizer = window_normalizer(self.loss_type, masks, self.max_completion_length)
        if self.loss_type == "dapo" and self.accelerator.num_processes > 1:  # global token mean; DDP averages grads
            total = self.accelerator.reduce(torch.tensor(float(normalizer), device=self.accelerator.device), "sum")
            normalizer = float(total) / self.accelerator.num_processes
        return normalizer

    def _compute_loss(self, model, inputs):
        if not self._fasttune_loss_applies():
            return super()._compute_loss(model, inputs)
        from fasttune.rl.losses import grpo_loss

        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), completion_ids.size(1),
            compute_entropy=True)
        old = inputs.get("old_per_token_logps")
        out = grpo_loss(
            logps, logps.detach() if old is None else old, inputs["advantages"], mask,
            ref_logps=inputs.get("ref_per_token_logps"), loss_type=self.loss_type, beta=self.beta,
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length, normalizer=self._window_normalizer(inputs),
            bias_correction_kl=self.args.use_bias_correction_kl)
        self._log_loss_metrics(out, entropies, mask)
        return out.loss

    def _log_loss_metrics(self, out: Any, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """TRL's metric names, from the loss's own statistics."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        tokens = mask.sum().clamp(min=1)
        metrics["entropy"].append(self.accelerator.gather((entropies * mask).sum() / tokens).nanmean().item())
        if self.beta != 0.0:
            metrics["kl"].append(self.accelerator.gather(out.kl_mean.detach()).nanmean().item())
        for name, value in (("low_mean", out.clip_low_frac), ("high_mean", out.clip_high_frac),
                            ("region_mean", out.clip_region_frac)):
            metrics[f"clip_ratio/{name}"].append(self.accelerator.gather(value.detach()).nanmean().item())


# config fields of heads that scale their logits in ways selective_log_probs is not told about (TRL's path handles them)
_OTHER_SCALINGS = ("output_multiplier", "lm_head_multiplier", "logits_scaling")


def _logit_transform(text_config: Any) -> tuple[float | None, float] | None:
    """(final-logit softcap, logit scale) as the model's own head applies them; None for heads we leave to TRL."""
    if any(getattr(text_config, name, None) is not None for name in _OTHER_SCALINGS):
        return None
    scale = getattr(text_config, "logit_scale", None)
    return getattr(text_config, "final_logit_softcapping", None), 1.0 if scale is None else float(scale)
