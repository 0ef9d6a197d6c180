"""`train_on_responses_only`: train an already-built TRL ``SFTTrainer`` on assistant tokens only.

TRL 1.16 tokenizes the dataset when the trainer is built and gives every example a ``labels`` column (a copy of
``input_ids`` unless a completion/assistant mask applied) that its collators use as is. This function rewrites that
column example by example: ``labels[i] = input_ids[i]`` inside an assistant response (see `fasttune.data.masking`),
``-100`` elsewhere. Because the mask lives in each example, it follows sequence boundaries in any collator, padded or
padding-free; packed examples (with ``seq_lengths``) are masked per packed sequence.

Markers come from ``tokenizer.fasttune_template`` (set by `get_chat_template`), else from recognising the tokenizer's
chat template among fasttune's, else from the arguments (Unsloth's rule then: a response runs to the next
instruction marker). Rows left with no trainable token are reported with their index (default: raise `DatasetError`;
``skip_invalid=True`` drops them and logs the count); when no row has one, the error names the markers searched and
shows a rendered sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from datasets import Dataset

from fasttune.data.check import DatasetError
from fasttune.data.markers import markers_for
from fasttune.data.masking import IGNORE_INDEX, TokenTexts, masked_labels, segmented_response_mask

logger = logging.getLogger(__name__)


def _label_fn(texts: TokenTexts, markers: tuple[str, str, tuple[str, ...]]):
    def label(example: dict) -> dict:
        ids = example["input_ids"]
        mask = segmented_response_mask(ids, texts, *markers, seq_lengths=example.get("seq_lengths"))
        labels = masked_labels(ids, mask, example.get("labels"))
        return {"labels": labels, "fasttune_trainable": sum(1 for x in labels if x != IGNORE_INDEX)}

    return label


def _no_trainable_error(dataset: Dataset, tokenizer: Any, markers: tuple[str, str, tuple[str, ...]]) -> ValueError:
    sample = tokenizer.decode(dataset[0]["input_ids"], skip_special_tokens=False)
    instruction_part, response_part, end_parts = markers
    return ValueError(
        f"train_on_responses_only: no row has a trainable token, every label is -100. Searched for "
        f"response_part={response_part!r} (instruction_part={instruction_part!r}, end_parts={list(end_parts)}) "
        f"and found none. Pass the markers your chat template really renders. Rendered sample (row 0, "
        f"{len(dataset[0]['input_ids'])} tokens):\n{sample[:1500]}"
    )


def _warn_double_bos(dataset: Dataset, tokenizer: Any, name: str) -> None:
    """Text rendered by a template that writes the BOS, then tokenized with special tokens, starts with two BOS."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return
    doubled = sum(1 for ids in dataset["input_ids"] if len(ids) > 1 and ids[0] == bos and ids[1] == bos)
    if doubled:
        logger.warning(
            "%s dataset: %d rows start with two %r tokens: the chat template already writes the BOS and the "
            "tokenizer added another. Pass conversations ('messages') instead of rendered text, or strip the BOS "
            "from the text (text.removeprefix(tokenizer.bos_token)).", name, doubled, tokenizer.bos_token,
        )


def mask_dataset(
    dataset: Any,
    tokenizer: Any,
    markers: tuple[str, str, tuple[str, ...]],
    skip_invalid: bool = False,
    max_length: int | None = None,
    num_proc: int | None = None,
    name: str = "train",
) -> Any:
    """Rewrite the ``labels`` column of a tokenized dataset (see the module docstring); returns the new dataset."""
    texts = TokenTexts(tokenizer)
    if not isinstance(dataset, Dataset):  # IterableDataset: lazy, so rows cannot be counted up front
        return dataset.map(_label_fn(texts, markers)).remove_columns(["fasttune_trainable"])
    out = dataset.map(_label_fn(texts, markers), num_proc=num_proc, desc=f"Masking {name} dataset to responses")
    trainable = out["fasttune_trainable"]
    out = out.remove_columns(["fasttune_trainable"])
    if len(out) and not any(trainable):
        raise _no_trainable_error(out, tokenizer, markers)
    if max_length is not None and "seq_lengths" not in out.column_names:  # packed rows fill max_length on purpose
        at_limit = sum(1 for ids in dataset["input_ids"] if len(ids) >= max_length)
        if at_limit:
            logger.warning("%s dataset: %d of %d rows are %d tokens long (max_length): SFTTrainer truncated them.",
                           name, at_limit, len(out), max_length)
    _warn_double_bos(dataset, tokenizer, name)
    empty = [row for row, count in enumerate(trainable) if count == 0]
    if not empty:
        return out
    reason = (f"no trainable token left: no {markers[1]!r} response in the row, or max_length={max_length} "
              "truncated every response away")
    if not skip_invalid:
        raise DatasetError([(row, reason) for row in empty], len(out),
                           hint="Fix these rows, or pass skip_invalid=True to train_on_responses_only to drop them.")
    logger.warning("%s dataset: dropped %d of %d rows with no trainable token (skip_invalid=True).",
                   name, len(empty), len(out))
    empty_set = set(empty)
    return out.select([i for i in range(len(out)) if i not in empty_set])


def train_on_responses_only(
    trainer: Any,
    instruction_part: str | None = None,
    response_part: str | None = None,
    end_parts: Sequence[str] | None = None,
    tokenizer: Any = None,
    skip_invalid: bool = False,
    num_proc: int | None = None,
) -> Any:
    """Make ``trainer`` (a TRL ``SFTTrainer``, already built) compute the loss on assistant tokens only."""
    tokenizer = tokenizer or getattr(trainer, "processing_class", None)
    if tokenizer is None:
        raise ValueError("tokenizer: the trainer has no processing_class; pass tokenizer=...")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    markers = markers_for(tokenizer, instruction_part, response_part, end_parts)
    max_length = getattr(getattr(trainer, "args", None), "max_length", None)
    for attr in ("train_dataset", "eval_dataset"):
        dataset = getattr(trainer, attr, None)
        if dataset is None:
            continue
        if isinstance(dataset, dict):
            masked = {key: _checked(ds, tokenizer, markers, skip_invalid, max_length, num_proc, key)
                      for key, ds in dataset.items()}
        else:
            masked = _checked(dataset, tokenizer, markers, skip_invalid, max_length, num_proc, attr.split("_")[0])
        setattr(trainer, attr, masked)
    return trainer


def _checked(dataset: Any, tokenizer: Any, markers: Any, skip_invalid: bool, max_length: Any, num_proc: Any,
             name: str) -> Any:
    columns = getattr(dataset, "column_names", None) or []
    if "input_ids" not in columns:
        raise ValueError(
            f"{name} dataset: no 'input_ids' column (columns: {columns}); train_on_responses_only needs the "
            "tokenized dataset of a built SFTTrainer (do not pass skip_prepare_dataset without tokenizing)"
        )
    return mask_dataset(dataset, tokenizer, markers, skip_invalid, max_length, num_proc, name)
