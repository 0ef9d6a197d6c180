"""``fasttune.trl.SFTTrainer`` / ``SFTConfig``: TRL's classes, taking the Unsloth-era arguments, fast by default.

On top of TRL's ``SFTTrainer`` (a subclass; nothing in TRL is patched):

* the Unsloth-era arguments (``tokenizer=``, trainer-level ``dataset_text_field`` / ``max_seq_length`` / ``packing``...,
  ``args=TrainingArguments(...)``) are translated, see :mod:`fasttune.train.compat`;
* the fast path, when the model carries fasttune's fast forwards (``FastLanguageModel``): the fused, label-only loss
  (:class:`fasttune.train.FastLossMixin`, still logging TRL's ``entropy`` / ``mean_token_accuracy`` / ``num_tokens``)
  and, unless the user gave a ``data_collator`` or asked for packing, padding-free batches
  (:class:`fasttune.train.PaddingFreeCollator`). Loss options that need the full logits (``loss_type="dft"``,
  ``compute_loss_func``, label smoothing) keep TRL's own loss;
* gradient checkpointing is the mode chosen in ``get_peft_model`` (:mod:`fasttune.patch.checkpointing`);
* ``max_length`` defaults to the ``max_seq_length`` given to ``from_pretrained`` (TRL's default is 1024) unless the
  config sets it;
* a ``messages`` dataset is tokenized by fasttune (:func:`fasttune.data.tokenize_conversations`, i.e. ``encode_chat``)
  instead of by TRL's ``apply_chat_template``: text in a message that spells a control token (``<|eot_id|>``...)
  stays text, so a row cannot forge a turn, and a template error names its row. Skipped where TRL's own tokenization
  is needed: ``assistant_only_loss`` (masks from the template), a ``formatting_func``, ``skip_prepare_dataset``;
* a rendered-text dataset (``dataset_text_field``, Unsloth's ``formatting_prompts_func`` flow) is tokenized by fasttune
  as TRL would, except that turn markers spelled inside a message never become real turns
  (:func:`fasttune.data.text_rows.tokenize_text_rows`): rows that still carry their ``conversations`` are tokenized
  from it where the text is its rendering; other rows whose turn markers could not come from well-formed messages are
  refused by index unless ``forged_turns="allow"``;
* the LoRA weights of a fasttune QLoRA model keep their exact values and dtype (fp32, as peft made them): TRL casts a
  quantized model's trainable weights to bf16 while the trainer is built (the QLoRA paper's setting), rounding the
  initial adapters; they are saved before and put back after (``fasttune.lora.precision`` keeps the dtype later on).
"""

from __future__ import annotations

import logging
from typing import Any

import trl
from datasets import Dataset
from torch import nn

from ..data.pretokenize import tokenize_conversations
from ..data.text_rows import CONVERSATION_COLUMNS, check_forged_turns, tokenize_text_rows
from ..lora.precision import restore_snapshot, snapshot_trainable
from ..patch import is_patched
from ..state import model_state
from .compat import CompatConfigMixin, CompatTrainerMixin, explicitly_set
from .fused_loss import FastLossMixin
from .padding_free import PaddingFreeCollator

logger = logging.getLogger("fasttune")


class SFTConfig(CompatConfigMixin, trl.SFTConfig):
    """TRL's ``SFTConfig``; also takes ``max_seq_length=`` (now ``max_length``)."""

    fasttune_kind = "sft"


def _tokenize_here(dataset: Any, config: Any, kwargs: dict[str, Any]) -> bool:
    """Whether fasttune tokenizes ``dataset`` (a plain ``messages`` dataset TRL would render with its template)."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or "messages" not in columns or "input_ids" in columns:
        return False
    if {"prompt", "completion"} & set(columns) or kwargs.get("processing_class") is None:
        return False
    skip = (config.dataset_kwargs or {}).get("skip_prepare_dataset", False)
    return not (config.assistant_only_loss or kwargs.get("formatting_func") is not None or skip)


def _tokenize_text_here(dataset: Any, config: Any, kwargs: dict[str, Any]) -> bool:
    """Whether fasttune tokenizes ``dataset`` as rendered text (``dataset_text_field``; see fasttune.data.text_rows)."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(dataset, Dataset) or not isinstance(columns, list) or not len(dataset):
        return False
    field = config.dataset_text_field
    if field not in columns or "input_ids" in columns or {"messages", "prompt", "completion"} & set(columns):
        return False
    tokenizer = kwargs.get("processing_class")
    if tokenizer is None or hasattr(tokenizer, "image_processor"):
        return False
    first = dataset[0]
    if any(isinstance(first.get(c), list) and first[c] and isinstance(first[c][0], dict) and "from" in first[c][0]
           for c in CONVERSATION_COLUMNS):
        return False  # ShareGPT from/value rows: TRL converts them to messages and takes the conversational path
    skip = (config.dataset_kwargs or {}).get("skip_prepare_dataset", False)
    return not (kwargs.get("formatting_func") is not None or skip)


def _slow_reason(model: Any, config: Any, kwargs: dict[str, Any]) -> str | None:
    """Why the fused loss cannot be used for this trainer, or None when it can."""
    if not isinstance(model, nn.Module) or not is_patched(model):
        return "the model has no fasttune fast path (load it with FastLanguageModel)"
    if config.loss_type != "nll":
        return f"loss_type={config.loss_type!r} needs the full logits"
    if kwargs.get("compute_loss_func") is not None:
        return "compute_loss_func needs the full logits"
    if config.label_smoothing_factor > 0:
        return f"label_smoothing_factor={config.label_smoothing_factor} needs the full logits"
    return None


def rows_to_dataset(rows: list | tuple, split: str) -> Dataset:
    """A ``datasets.Dataset`` of a list of example dicts (PIL images inside are stored as PNG bytes)."""
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise TypeError(f"{split}: row {bad} is a {type(rows[bad]).__name__}; a list dataset must hold dicts "
                        "(e.g. {'messages': [...]})")
    logger.info("fasttune: %s is a list of %d rows; converting it to a datasets.Dataset", split, len(rows))
    return Dataset.from_list(list(rows))


class SFTTrainer(CompatTrainerMixin, FastLossMixin, trl.SFTTrainer):
    """TRL's ``SFTTrainer`` with the Unsloth-era arguments and fasttune's fast path (see the module docstring).

    ``fasttune_fast_loss`` / ``fasttune_padding_free`` say which parts of the fast path this trainer uses.
    """

    fasttune_kind = "sft"
    fasttune_config = SFTConfig

    def _fasttune_prepare(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        model = kwargs.get("model")
        if kwargs.get("args") is None and isinstance(model, nn.Module):  # TRL's default, built here to adjust it
            name = (getattr(model.config, "name_or_path", "") or "model").rstrip("/").split("/")[-1]
            kwargs["args"] = SFTConfig(output_dir=f"{name}-SFT")
        kwargs = super()._fasttune_prepare(kwargs)
        config = kwargs["args"]
        state = model_state(model)
        length = state.max_seq_length if state is not None else None
        if config is not None and length is not None and not explicitly_set(config, "max_length"):
            logger.info("fasttune: SFTConfig.max_length not set; using the model's max_seq_length=%d", length)
            config.max_length = length
        for split in ("train_dataset", "eval_dataset"):
            if isinstance(kwargs.get(split), (list, tuple)):  # Unsloth's vision notebooks pass a list of dicts
                kwargs[split] = rows_to_dataset(kwargs[split], split)
        if config is not None:
            for split in ("train_dataset", "eval_dataset"):
                if _tokenize_here(kwargs.get(split), config, kwargs):
                    kwargs[split] = tokenize_conversations(kwargs[split], kwargs["processing_class"],
                                                           num_proc=config.dataset_num_proc)
                elif _tokenize_text_here(kwargs.get(split), config, kwargs):
                    kwargs[split] = tokenize_text_rows(kwargs[split], kwargs["processing_class"],
                                                       config.dataset_text_field, self._fasttune_forged_turns,
                                                       config.dataset_num_proc, split.split("_")[0])
        reason = _slow_reason(model, config, kwargs) if config is not None else "no config"
        self.fasttune_fast_loss = reason is None
        self.fasttune_padding_free = (reason is None and kwargs.get("data_collator") is None and not config.packing
                                      and not config.padding_free)
        if reason is not None and isinstance(model, nn.Module) and is_patched(model):
            logger.info("fasttune: SFTTrainer keeps TRL's loss: %s", reason)
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        self._fasttune_saved = (snapshot_trainable(model) if isinstance(model, nn.Module) and is_patched(model)
                                and quantized else {})
        return kwargs

    def __init__(self, *args: Any, forged_turns: str = "refuse", **kwargs: Any) -> None:
        self._fasttune_forged_turns = check_forged_turns(forged_turns)
        super().__init__(*args, **kwargs)
        self._restore_trainable_weights()
        if self.fasttune_padding_free and not self._is_vision_dataset:
            pad = self.args.pad_to_multiple_of
            self.data_collator = PaddingFreeCollator(
                completion_only_loss=bool(self.completion_only_loss),
                pad_to_multiple_of=pad if isinstance(pad, int) else None,
                pad_token_id=self._tokenizer.pad_token_id or 0,
            )
        else:
            self.fasttune_padding_free = False

    def _restore_trainable_weights(self) -> None:
        """Undo TRL's bf16 cast of a quantized model's trainable weights, values included (see the module docstring)."""
        restored = restore_snapshot(self.model, self._fasttune_saved)
        self._fasttune_saved = {}
        if restored:
            logger.info("fasttune: kept %d trainable weights as they were (TRL casts a quantized model's to bf16)",
                        restored)
