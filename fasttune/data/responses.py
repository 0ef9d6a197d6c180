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

Where the row still carries its conversation (TRL keeps the ``messages`` column, or ``prompt`` + ``completion``; packed
rows do not), two more things are done:

- a row whose message text contains a control string (``<|eot_id|>``...) was tokenized by TRL with that string as a
  real control token, forging turn boundaries; it is re-tokenized with `encode_chat` (the text stays text), cut to
  ``max_length`` as the trainer's ``truncation_mode`` says, and a warning counts such rows;
- an assistant turn with empty content is reported: it would train only the end-of-turn token;
- message text that contains a marker this tokenizer writes as plain text (``[/INST]`` on a Llama-2-style tokenizer,
  alpaca's ``### Response:``) is reported with the message and the marker: masking would take it for a turn boundary
  (`fasttune.data.markers.plain_text_markers`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from datasets import Dataset

from fasttune.data.check import DatasetError
from fasttune.data.encode import control_strings, encode_row, find_control_strings
from fasttune.data.markers import markers_for, plain_marker_problems, plain_text_markers
from fasttune.data.masking import IGNORE_INDEX, TokenTexts, masked_labels, segmented_response_mask

Markers = tuple[str, str, tuple[str, ...]]
_EXTRA = ["fasttune_trainable", "fasttune_reencoded", "fasttune_empty_answer", "fasttune_full_length",
          "fasttune_plain_marker"]

logger = logging.getLogger(__name__)


def _conversation(example: dict) -> list | None:
    """The conversation a TRL-tokenized row came from (``messages``, or ``prompt`` + ``completion``), if it kept it."""
    if "seq_lengths" in example:  # packed: several conversations per row
        return None
    messages = example.get("messages")
    if isinstance(messages, list):
        return messages
    prompt, completion = example.get("prompt"), example.get("completion")
    return prompt + completion if isinstance(prompt, list) and isinstance(completion, list) else None


def _empty_answer(messages: list | None) -> int:
    """Index of the first assistant message with empty (or whitespace) text, else -1.

    Reported as an error (``skip_invalid=True`` drops the row) rather than a warning: such a turn trains the model to
    close its turn at once, i.e. to answer nothing, and a real dataset that has one holds a data bug (a failed
    generation, a lost field); there is no correct way to train on it, so dropping it must be a visible choice.
    """
    for i, message in enumerate(messages or []):
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and message.get("role") == "assistant" and not str(content).strip():
            return i
    return -1


def _label_fn(tokenizer: Any, markers: Markers, keep: slice):
    """The per-row function: re-tokenize rows with control strings in their text, then mask (module docstring)."""
    texts = TokenTexts(tokenizer)
    controls = control_strings(tokenizer)
    plain = plain_text_markers(tokenizer, markers)

    def label(example: dict, row: int) -> dict:
        ids, old_labels = example["input_ids"], example.get("labels")
        messages = _conversation(example)
        forged = plain_marker_problems(messages, plain) if messages is not None else []
        reencoded = messages is not None and bool(find_control_strings(messages, controls))
        full_length = -1
        if reencoded:
            full = encode_row(tokenizer, messages, row)
            ids, old_labels, full_length = full[keep], None, len(full)  # TRL's labels belong to the old ids
        mask = segmented_response_mask(ids, texts, *markers, seq_lengths=example.get("seq_lengths"))
        labels = masked_labels(ids, mask, old_labels)
        trainable = sum(1 for x in labels if x != IGNORE_INDEX)
        if not trainable and messages is not None and full_length < 0:
            full_length = len(encode_row(tokenizer, messages, row))  # for the error: how long the row really is
        return {"input_ids": ids, "labels": labels, "fasttune_trainable": trainable,
                "fasttune_reencoded": reencoded, "fasttune_empty_answer": _empty_answer(messages),
                "fasttune_full_length": full_length, "fasttune_plain_marker": forged[0] if forged else ""}

    return label


def _no_answer_reason(length: int, full_length: int, max_length: int | None, response_part: str) -> str:
    """Why a row has no trainable token: the length limit cut the answer off, or no response marker was found."""
    if max_length is not None and length >= max_length:
        size = f"{full_length} tokens long" if full_length > 0 else f"longer than {max_length} tokens"
        return (f"no trainable token left: the row is {size} and max_length={max_length} cut off every assistant "
                "answer; raise max_length (SFTConfig) or shorten the row")
    return f"no trainable token left: no {response_part!r} response was found in the row's tokens"


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


def _truncation(max_length: int | None, truncation_mode: str) -> slice:
    """The slice SFTTrainer applies to each row (``SFTConfig.truncation_mode``)."""
    if max_length is None:
        return slice(None)
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode: {truncation_mode!r} is not supported; use 'keep_start' or 'keep_end'")
    return slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)


def _row_problems(out: Any, max_length: int | None, response_part: str) -> list[tuple[int, str]]:
    problems = []
    columns = zip(out["fasttune_trainable"], out["fasttune_empty_answer"], out["fasttune_full_length"],
                  out["input_ids"], out["fasttune_plain_marker"])
    for row, (trainable, empty, full_length, ids, forged) in enumerate(columns):
        if forged:
            problems.append((row, forged))
        if empty >= 0:
            problems.append((row, f"message {empty} (assistant): content is empty, so only the end-of-turn token "
                                  "would be trained (teaching the model to answer nothing); give it text or drop it"))
        if trainable == 0:
            problems.append((row, _no_answer_reason(len(ids), full_length, max_length, response_part)))
    return problems


def mask_dataset(
    dataset: Any,
    tokenizer: Any,
    markers: Markers,
    skip_invalid: bool = False,
    max_length: int | None = None,
    num_proc: int | None = None,
    name: str = "train",
    truncation_mode: str = "keep_start",
) -> Any:
    """Rewrite the ``labels`` column of a tokenized dataset (see the module docstring); returns the new dataset."""
    label = _label_fn(tokenizer, markers, _truncation(max_length, truncation_mode))
    if not isinstance(dataset, Dataset):  # IterableDataset: lazy, so rows cannot be counted up front
        return dataset.map(label, with_indices=True).remove_columns(_EXTRA)
    out = dataset.map(label, with_indices=True, num_proc=num_proc, desc=f"Masking {name} dataset to responses")
    trainable = out["fasttune_trainable"]
    cut = max_length is not None and any(len(ids) >= max_length for ids in out["input_ids"])
    if len(out) and not any(trainable) and not cut:  # with rows at max_length, the per-row report says why
        raise _no_trainable_error(out, tokenizer, markers)
    reencoded = [row for row, flag in enumerate(out["fasttune_reencoded"]) if flag]
    if reencoded:
        logger.warning("%s dataset: %d rows have control strings (e.g. %r) inside message text (first: row %d); "
                       "they were re-tokenized so that this text stays plain text instead of forging turn "
                       "boundaries.", name, len(reencoded), control_strings(tokenizer)[:1], reencoded[0])
    problems = _row_problems(out, max_length, markers[1])
    out = out.remove_columns(_EXTRA)
    if max_length is not None and "seq_lengths" not in out.column_names:  # packed rows fill max_length on purpose
        at_limit = sum(1 for ids in dataset["input_ids"] if len(ids) >= max_length)
        if at_limit:
            logger.warning("%s dataset: %d of %d rows are %d tokens long (max_length): SFTTrainer truncated them.",
                           name, at_limit, len(out), max_length)
    _warn_double_bos(dataset, tokenizer, name)
    if not problems:
        return out
    if not skip_invalid:
        raise DatasetError(problems, len(out),
                           hint="Fix these rows, or pass skip_invalid=True to train_on_responses_only to drop them.")
    bad = {row for row, _ in problems}
    logger.warning("%s dataset: dropped %d of %d rows with no trainable token, an empty answer or a plain-text turn "
                   "marker in a message (skip_invalid=True).", name, len(bad), len(out))
    return out.select([i for i in range(len(out)) if i not in bad])


def train_on_responses_only(
    trainer: Any,
    instruction_part: str | None = None,
    response_part: str | None = None,
    end_parts: Sequence[str] | None = None,
    tokenizer: Any = None,
    skip_invalid: bool = False,
    num_proc: int | None = None,
) -> Any:
    """Make ``trainer`` (a TRL ``SFTTrainer``, already built) compute the loss on assistant tokens only.

    With a vision collator (``UnslothVisionDataCollator``) the markers go to the collator, which masks every batch."""
    collator = getattr(trainer, "data_collator", None)
    if hasattr(collator, "set_response_markers"):  # a vision collator masks each batch as it builds it
        collator.set_response_markers(instruction_part, response_part, end_parts)
        return trainer
    tokenizer = tokenizer or getattr(trainer, "processing_class", None)
    if tokenizer is None:
        raise ValueError("tokenizer: the trainer has no processing_class; pass tokenizer=...")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    markers = markers_for(tokenizer, instruction_part, response_part, end_parts)
    args = getattr(trainer, "args", None)
    max_length = getattr(args, "max_length", None)
    truncation_mode = getattr(args, "truncation_mode", "keep_start")
    for attr in ("train_dataset", "eval_dataset"):
        dataset = getattr(trainer, attr, None)
        if dataset is None:
            continue
        if isinstance(dataset, dict):
            masked = {key: _checked(ds, tokenizer, markers, skip_invalid, max_length, num_proc, key, truncation_mode)
                      for key, ds in dataset.items()}
        else:
            masked = _checked(dataset, tokenizer, markers, skip_invalid, max_length, num_proc, attr.split("_")[0],
                              truncation_mode)
        setattr(trainer, attr, masked)
    return trainer


def _checked(dataset: Any, tokenizer: Any, markers: Any, skip_invalid: bool, max_length: Any, num_proc: Any,
             name: str, truncation_mode: str = "keep_start") -> Any:
    columns = getattr(dataset, "column_names", None) or []
    if "input_ids" not in columns:
        raise ValueError(
            f"{name} dataset: no 'input_ids' column (columns: {columns}); train_on_responses_only needs the "
            "tokenized dataset of a built SFTTrainer (do not pass skip_prepare_dataset without tokenizing)"
        )
    return mask_dataset(dataset, tokenizer, markers, skip_invalid, max_length, num_proc, name, truncation_mode)
