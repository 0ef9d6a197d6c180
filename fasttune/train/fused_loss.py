"""Let TRL's ``SFTTrainer`` train with fasttune's fused loss, still logging TRL's token metrics.

TRL 1.x's ``SFTTrainer`` wraps the model's forward with its own fused LM head and calls
``model(**inputs, fused_lm_head=True)``; on CPU that head scores *every* position (prompt and padding included).
``FastLossMixin`` replaces ``compute_loss`` so the trainer calls the model with ``labels`` and ``num_items_in_batch``
instead, which a model patched by :func:`fasttune.patch.patch_model` answers with
:func:`fasttune.kernels.fused_linear_cross_entropy` (only labelled positions reach the lm_head).

    class FastSFTTrainer(FastLossMixin, SFTTrainer): ...

The metrics TRL's ``compute_loss`` logs are kept, with its names and meaning: ``entropy`` (mean entropy of the
next-token distribution over labelled positions), ``mean_token_accuracy`` (share of labelled positions whose label is
the argmax) -- both per micro-batch, averaged by TRL's ``log`` -- and ``num_tokens``. The fused loss computes the first
two inside its chunks (``fasttune_token_stats=True``), so the full logits are still never built. A mixture of experts'
load-balancing loss, when TRL turns it on (``router_aux_loss_coef``), is added as TRL adds it (and logged as
``aux_loss``).
Set ``fasttune_fast_loss = False`` on the trainer to get TRL's own ``compute_loss`` back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fasttune.kernels.cross_entropy import TokenStats, token_stats_ref

from ..patch import is_patched


class FastLossMixin:
    """``compute_loss`` that asks the model for its own (fused) loss; mix in before ``SFTTrainer``."""

    fasttune_fast_loss: bool = True

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: int | torch.Tensor | None = None):
        if not self.fasttune_fast_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                        num_items_in_batch=num_items_in_batch)
        inputs = {**inputs, "use_cache": False}
        call = dict(inputs)
        if num_items_in_batch is not None:
            call["num_items_in_batch"] = num_items_in_batch
        logs_metrics = hasattr(self, "_metrics")
        patched = is_patched(getattr(self, "model", model))
        if logs_metrics and patched:
            call["fasttune_token_stats"] = True
        aux_coef = getattr(self, "router_aux_loss_coef", None) if getattr(self, "aux_loss_enabled", False) else None
        if aux_coef is not None and patched:  # TRL turned the MoE load-balancing loss on: weighted below, as TRL does
            call["output_router_logits"] = True
            call["fasttune_add_aux"] = False
        outputs = model(**call)
        loss = outputs.loss
        if loss is None:
            raise ValueError("FastLossMixin: the model returned no loss; the batch must contain 'labels'")
        args = getattr(self, "args", None)
        if args is not None and args.average_tokens_across_devices and num_items_in_batch is not None:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size)
        aux = getattr(outputs, "aux_loss", None)
        if aux_coef is not None and patched and aux is not None:
            # TRL's rule: the aux loss is a per-micro-batch mean that DDP averages over the ranks, so it is added after
            # the token loss is scaled by the process count (scaling it too would count it once per process), and
            # divided over the accumulation steps when the token loss is normalised by num_items_in_batch
            steps = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
            loss = loss + aux_coef * aux.to(loss.device) / steps
            if logs_metrics:
                mode = "train" if self.model.training else "eval"
                self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        if logs_metrics:
            self._log_token_metrics(outputs, inputs)
        if return_outputs:  # evaluation asks for logits, which the fused loss never built: one more forward
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, outputs: Any, inputs: dict[str, Any]) -> None:
        """Append ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` to TRL's ``_metrics``, as its
        ``SFTTrainer.compute_loss`` does (same reductions across processes)."""
        stats = getattr(outputs, "token_stats", None)
        if stats is None and getattr(outputs, "logits", None) is not None:  # a fallback forward built the logits
            labels = inputs["labels"]
            stats = TokenStats(*token_stats_ref(outputs.logits.detach()[:, :-1], labels[:, 1:]))
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        if stats is not None:
            num_valid = gather(stats.num_labels.reshape(1)).sum()
            entropy_sum = gather(stats.entropy_sum.reshape(1)).sum()
            num_correct = gather(stats.num_correct.reshape(1)).sum()
            valid = bool(num_valid > 0)
            self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if valid else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if valid else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                # (1, tokens), or (4, 1, tokens) for packed multimodal-RoPE rows (text positions first)
                local = torch.tensor(inputs["position_ids"].shape[-1], device=inputs["position_ids"].device)
            else:
                raise ValueError("FastLossMixin: the batch has neither 'attention_mask' nor 'position_ids' to count "
                                 "its tokens (num_tokens)")
            self._total_train_tokens += gather(local.reshape(1)).sum().item() // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
