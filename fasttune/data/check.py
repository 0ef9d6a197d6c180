"""Dataset checks before training: every bad row is reported with its index and the reason.

``check_dataset`` looks at conversations (a ``messages`` or ``conversations`` column of role/content dicts): an
unknown role, a system message that is not first, a non-string or empty content, no assistant turn; given a tokenizer
with a chat template, a conversation in which no assistant token is found; given ``max_seq_length`` too, one whose
assistant tokens all lie beyond it. By default it raises `DatasetError` with the report; ``skip_invalid=True`` drops
the bad rows and logs how many. When no row has an assistant token the error names the markers searched and shows a
rendered sample. Conversations longer than ``max_seq_length`` are counted in a log line: they are truncated, never
dropped.

Message text that contains a control string of the chat template (``<|eot_id|>``, ``<|im_start|>``, ``[INST]``...) is
reported too, with the message and the string: fasttune's own tokenization (`encode_chat`) keeps it plain text, but
tokenized elsewhere (``apply_chat_template`` as TRL calls it) it would forge turn boundaries. Pass
``allow_control_strings=True`` when such text is intended (a dataset about tokenizers, say). Text that contains a
turn marker the tokenizer writes as plain text (``[/INST]`` on a Llama-2-style tokenizer) is always reported: response
masking would take it for a turn boundary even in fasttune's own tokenization.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fasttune.data.encode import control_strings, encode_chat, find_control_strings
from fasttune.data.markers import markers_for, plain_marker_problems, plain_text_markers
from fasttune.data.masking import TokenTexts, response_mask
from fasttune.data.validate import conversation_problems

logger = logging.getLogger(__name__)

MAX_REPORTED = 20


class DatasetError(ValueError):
    """Rows of a dataset that cannot be trained on; ``problems`` holds ``(row_index, reason)`` pairs.

    A row may have several problems: the headline counts distinct rows against ``total`` rows, the list shows problems.
    """

    def __init__(self, problems: Sequence[tuple[int, str]], total: int, hint: str = ""):
        self.problems = list(problems)
        self.rows = sorted({row for row, _ in self.problems})
        shown = "\n".join(f"  row {row}: {reason}" for row, reason in self.problems[:MAX_REPORTED])
        more = len(self.problems) - MAX_REPORTED
        tail = f"\n  ... and {more} more problems" if more > 0 else ""
        count = f" ({len(self.problems)} problems)" if len(self.problems) != len(self.rows) else ""
        hint = hint or "Fix these rows, or pass skip_invalid=True to drop them."
        super().__init__(f"{len(self.rows)} of {total} rows cannot be trained on{count}:\n{shown}{tail}\n{hint}")


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
        self.plain = plain_text_markers(tokenizer, self.markers)
        self.texts = TokenTexts(tokenizer)
        self.truncated = self.longest = self.unmatched = 0
        self.sample = ""

    def problem(self, messages: list[dict]) -> str | None:
        ids = encode_chat(self.tokenizer, messages)
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
            return (f"fully truncated: the conversation is {len(ids)} tokens long and max_seq_length={limit} cuts off "
                    f"every assistant answer (the first answer token is at position {first}); raise max_seq_length "
                    "or shorten the conversation")
        return None

    def no_match_error(self) -> ValueError:
        instruction_part, response_part, end_parts = self.markers
        return ValueError(
            f"check_dataset: no row has a trainable token. Searched for response_part={response_part!r} "
            f"(instruction_part={instruction_part!r}, end_parts={list(end_parts)}); the tokenizer's chat template "
            f"does not render them. Rendered sample (row 0):\n{self.sample[:1500]}"
        )


def _control_reason(message: int, role: str, string: str) -> str:
    return (f"message {message} ({role}): the text contains {string!r}, a control token of the chat template; "
            "tokenized with apply_chat_template it would forge a turn boundary (fasttune's encode_chat keeps it text). "
            "Remove it, or pass allow_control_strings=True if it is meant as text")


def check_dataset(
    dataset: Any,
    tokenizer: Any = None,
    max_seq_length: int | None = None,
    skip_invalid: bool = False,
    column: str | None = None,
    allow_control_strings: bool = False,
) -> Any:
    """Check every conversation of ``dataset`` (a ``datasets.Dataset``); return it, minus bad rows if skipping.

    With ``tokenizer`` (carrying a chat template) each valid conversation is also tokenized and must contain an
    assistant token; with ``max_seq_length`` too, conversations whose assistant tokens all lie beyond it are bad and
    longer ones are counted in a log line (they will be truncated). Control strings inside messages (the tokenizer's
    control tokens, or every fasttune template's without a tokenizer) are problems unless ``allow_control_strings``.
    """
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
        raise ValueError(f"max_seq_length: {max_seq_length!r} must be a positive integer or None")
    if max_seq_length is not None and tokenizer is None:
        raise ValueError("max_seq_length: checking lengths needs the tokenizer; pass tokenizer=...")
    name = find_conversation_column(dataset.column_names, column)
    tokens = _TokenCheck(tokenizer, max_seq_length) if tokenizer is not None else None
    controls = () if allow_control_strings else control_strings(tokenizer)
    problems: list[tuple[int, str]] = []
    valid = 0
    for row, messages in enumerate(dataset[name]):
        reasons = conversation_problems(messages)
        if not reasons:
            reasons = [_control_reason(*found) for found in find_control_strings(messages, controls)]
        if not reasons and tokens is not None:
            reasons = plain_marker_problems(messages, tokens.plain)
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
