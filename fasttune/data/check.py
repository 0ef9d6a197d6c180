"""Dataset checks before training: every bad row is reported with its index and the reason.

``check_dataset`` looks at conversations (a ``messages`` or ``conversations`` column of role/content dicts): an
unknown role, a system message that is not first, a non-string or empty content, no assistant turn; given a tokenizer
with a chat template, a conversation in which no assistant token is found; given ``max_seq_length`` too, one whose
assistant tokens all lie beyond it. By default it raises `DatasetError` with the report; ``skip_invalid=True`` drops
the bad rows and logs how many. When no row has an assistant token the error names the markers searched and shows a
rendered sample. Conversations longer than ``max_seq_length`` are counted in a log line: they are truncated, never
dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fasttune.data.markers import markers_for
from fasttune.data.masking import TokenTexts, response_mask
from fasttune.data.validate import conversation_problems

logger = logging.getLogger(__name__)

MAX_REPORTED = 20


class DatasetError(ValueError):
    """Rows of a dataset that cannot be trained on; ``problems`` holds ``(row_index, reason)`` pairs."""

    def __init__(self, problems: Sequence[tuple[int, str]], total: int, hint: str = ""):
        self.problems = list(problems)
        shown = "\n".join(f"  row {row}: {reason}" for row, reason in self.problems[:MAX_REPORTED])
        more = len(self.problems) - MAX_REPORTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        hint = hint or "Fix these rows, or pass skip_invalid=True to drop them."
        super().__init__(f"{len(self.problems)} of {total} rows cannot be trained on:\n{shown}{tail}\n{hint}")


def find_conversation_column(column_names: Sequence[str], column: str | None = None) -> str:
    """The column holding conversations: ``column`` if given, else ``messages`` or ``conversations``."""
    if column is not None:
        if column not in column_names:
            raise ValueError(f"column: {column!r} is not a column of the dataset; columns are {list(column_names)}")
        return column
    for name in ("messages", "conversations"):
        if name in column_names:
            return name
    raise ValueError(
        f"the dataset has no 'messages' or 'conversations' column (columns: {list(column_names)}); pass column=..., "
        "or convert it with standardize_data_formats / to_sharegpt first"
    )


class _TokenCheck:
    """Tokenizes conversations with the tokenizer's template and finds their trainable (assistant) tokens."""

    def __init__(self, tokenizer: Any, max_seq_length: int | None):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.markers = markers_for(tokenizer)
        self.texts = TokenTexts(tokenizer)
        self.truncated = self.longest = self.unmatched = 0
        self.sample = ""

    def problem(self, messages: list[dict]) -> str | None:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        mask = response_mask(ids, self.texts, *self.markers)
        limit = self.max_seq_length
        if limit is not None and len(ids) > limit:
            self.truncated += 1
            self.longest = max(self.longest, len(ids))
        if 1 not in mask:
            self.unmatched += 1
            self.sample = self.sample or self.tokenizer.decode(ids, skip_special_tokens=False)
            return f"no assistant token found after response_part {self.markers[1]!r}"
        first = mask.index(1)
        if limit is not None and first >= limit:
            return f"fully truncated: its first assistant token is at position {first} but max_seq_length={limit}"
        return None

    def no_match_error(self) -> ValueError:
        instruction_part, response_part, end_parts = self.markers
        return ValueError(
            f"check_dataset: no row has a trainable token. Searched for response_part={response_part!r} "
            f"(instruction_part={instruction_part!r}, end_parts={list(end_parts)}); the tokenizer's chat template "
            f"does not render them. Rendered sample (row 0):\n{self.sample[:1500]}"
        )


def check_dataset(
    dataset: Any,
    tokenizer: Any = None,
    max_seq_length: int | None = None,
    skip_invalid: bool = False,
    column: str | None = None,
) -> Any:
    """Check every conversation of ``dataset`` (a ``datasets.Dataset``); return it, minus bad rows if skipping.

    With ``tokenizer`` (carrying a chat template) each valid conversation is also tokenized and must contain an
    assistant token; with ``max_seq_length`` too, conversations whose assistant tokens all lie beyond it are bad and
    longer ones are counted in a log line (they will be truncated).
    """
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
        raise ValueError(f"max_seq_length: {max_seq_length!r} must be a positive integer or None")
    if max_seq_length is not None and tokenizer is None:
        raise ValueError("max_seq_length: checking lengths needs the tokenizer; pass tokenizer=...")
    name = find_conversation_column(dataset.column_names, column)
    tokens = _TokenCheck(tokenizer, max_seq_length) if tokenizer is not None else None
    problems: list[tuple[int, str]] = []
    valid = 0
    for row, messages in enumerate(dataset[name]):
        reasons = conversation_problems(messages)
        if not reasons and tokens is not None:
            valid += 1
            reason = tokens.problem(list(messages))
            reasons = [reason] if reason else []
        problems += [(row, reason) for reason in reasons]
    if tokens is not None and valid and tokens.unmatched == valid:
        raise tokens.no_match_error()
    if tokens is not None and tokens.truncated:
        logger.warning(
            "check_dataset: %d of %d conversations are longer than max_seq_length=%d tokens (longest %d) and will be "
            "truncated to it.", tokens.truncated, len(dataset), max_seq_length, tokens.longest,
        )
    if not problems:
        return dataset
    if not skip_invalid:
        raise DatasetError(problems, len(dataset))
    bad = {row for row, _ in problems}
    logger.warning("check_dataset: dropped %d of %d rows (skip_invalid=True); first: row %d: %s",
                   len(bad), len(dataset), problems[0][0], problems[0][1])
    return dataset.select([i for i in range(len(dataset)) if i not in bad])
