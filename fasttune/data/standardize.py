"""Dataset standardisation into one conversation format: a list of ``{"role", "content"}`` messages.

- `standardize_sharegpt`: ShareGPT (``from``/``value``, roles ``human``/``gpt``) or OpenAI (``role``/``content``)
  messages -> role/content with roles system/user/assistant (same column, as Unsloth does).
- `standardize_data_formats`: detects ShareGPT/OpenAI conversations, Alpaca rows (``instruction``/``input``/
  ``output``) or prompt/completion string pairs and converts any of them.
- `to_sharegpt`: merges several columns into one prompt (``{column}`` placeholders, ``[[...]]`` optional sections
  dropped when a column inside is empty) and pairs it with an output column as a ShareGPT conversation; with
  ``conversation_extension=n`` each conversation gets n-1 more turns drawn at random (seeded) from other rows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from datasets import Dataset

from fasttune.data.check import find_conversation_column

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)


def _role_table(system: Sequence[str], user: Sequence[str], assistant: Sequence[str]) -> dict[str, str]:
    table: dict[str, str] = {}
    for role, aliases in (("system", system), ("user", user), ("assistant", assistant)):
        for alias in aliases:
            if alias in table and table[alias] != role:
                raise ValueError(f"aliases: {alias!r} is listed for both {table[alias]!r} and {role!r}")
            table[alias] = role
    return table


def _standardize_messages(messages: Any, roles: dict[str, str], row: int) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"row {row}: the conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"row {row}, message {i}: expected a dict, got {type(message).__name__}")
        role_key = "from" if message.get("from") is not None else "role"
        content_key = "value" if message.get("value") is not None else "content"
        role = message.get(role_key)
        if role not in roles:
            raise ValueError(
                f"row {row}, message {i}: role {role!r} is not known; known roles/aliases are {sorted(roles)} "
                "(extend them with aliases_for_system / aliases_for_user / aliases_for_assistant)"
            )
        content = message.get(content_key)
        if isinstance(content, (list, tuple)):  # a list of parts ({"type": "text", "text": ...}), kept as it is
            _check_parts(content, row, i)
        # other keys of the message (gpt-oss datasets' "thinking", tool calls) go on with it: templates read them
        extra = {k: v for k, v in message.items() if k not in ("from", "value", "role", "content")}
        out.append({"role": roles[role], "content": content, **extra})
    return out


def _check_parts(parts: Sequence[Any], row: int, message: int) -> None:
    """Content given as parts: each must be a dict with a ``type``, and a text part must hold a string ``text``."""
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ValueError(f"row {row}, message {message}, content part {j}: expected a dict with a 'type' "
                             f"(e.g. {{'type': 'text', 'text': ...}}), got {repr(part)[:60]}")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise ValueError(f"row {row}, message {message}, content part {j}: a text part needs a string 'text', "
                             f"got {repr(part.get('text'))[:60]}")


def standardize_sharegpt(
    dataset: Dataset,
    aliases_for_system: Sequence[str] = ("system",),
    aliases_for_user: Sequence[str] = ("user", "human", "input"),
    aliases_for_assistant: Sequence[str] = ("gpt", "assistant", "output"),
    column: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Convert the conversation column (``conversations`` or ``messages``) to role/content messages in place."""
    name = find_conversation_column(dataset.column_names, column)
    roles = _role_table(aliases_for_system, aliases_for_user, aliases_for_assistant)

    def convert(example: dict, row: int) -> dict:
        return {name: _standardize_messages(example[name], roles, row)}

    return dataset.map(convert, with_indices=True, num_proc=num_proc, desc="Standardizing conversations")


def _text_field(example: dict, column: str, row: int, required: bool) -> str:
    """``example[column]`` as text (None/missing is "" unless required); any other type is an error naming the row.

    Emptiness is not checked here: `check_dataset` reports empty turns for every row at once (or drops them).
    """
    value = example.get(column)
    if isinstance(value, str):
        return value
    if value is None and not required:
        return ""
    shown = repr(value)[:60]
    allowed = "a string" if required else "a string or None"
    raise ValueError(f"row {row}, column {column!r}: got {type(value).__name__} {shown}; expected {allowed}")


def _alpaca_row(example: dict, row: int, output_column: str) -> dict:
    messages = []
    system = _text_field(example, "system", row, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    prompt = _text_field(example, "instruction", row, required=False)
    extra = _text_field(example, "input", row, required=False)
    if extra:
        prompt = f"{prompt}\n\n{extra}" if prompt else extra
    output = _text_field(example, "output", row, required=True)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {output_column: messages}


def _prompt_completion_row(example: dict, row: int, output_column: str) -> dict:
    for column in ("prompt", "completion"):
        value = example[column]
        if not isinstance(value, str):
            raise ValueError(
                f"row {row}, column {column!r}: got {type(value).__name__} {repr(value)[:60]}; standardize_data_formats "
                "converts string prompt/completion pairs only (conversational prompt/completion datasets can go to "
                "SFTTrainer as they are)"
            )
    return {output_column: [{"role": "user", "content": example["prompt"]},
                            {"role": "assistant", "content": example["completion"]}]}


def standardize_data_formats(
    dataset: Dataset,
    output_column: str = "conversations",
    num_proc: int | None = None,
    **aliases: Sequence[str],
) -> Dataset:
    """Detect the dataset's format (ShareGPT/OpenAI conversations, Alpaca, prompt/completion) and standardize it."""
    columns = dataset.column_names
    if "conversations" in columns or "messages" in columns:
        out = standardize_sharegpt(dataset, num_proc=num_proc, **aliases)
        source = find_conversation_column(out.column_names)
        return out if source == output_column else out.rename_column(source, output_column)
    if "instruction" in columns and "output" in columns:
        return dataset.map(_alpaca_row, fn_kwargs={"output_column": output_column}, remove_columns=columns,
                           with_indices=True, num_proc=num_proc, desc="Converting Alpaca rows to conversations")
    if "prompt" in columns and "completion" in columns:
        return dataset.map(_prompt_completion_row, fn_kwargs={"output_column": output_column}, with_indices=True,
                           remove_columns=columns, num_proc=num_proc, desc="Converting prompt/completion")
    raise ValueError(
        f"standardize_data_formats: cannot tell the format from the columns {columns}; expected 'conversations' or "
        "'messages' (ShareGPT/OpenAI), 'instruction'+'output' (Alpaca) or 'prompt'+'completion'; use to_sharegpt to "
        "merge other columns"
    )


def merge_prompt(merged_prompt: str, row: dict) -> str:
    """Fill ``{column}`` placeholders; drop each ``[[...]]`` section whose columns are empty in ``row``."""

    def fill(text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: str(row[m.group(1)]), text)

    def optional(match: re.Match) -> str:
        names = _PLACEHOLDER.findall(match.group(1))
        empty = any(row.get(n) is None or str(row.get(n)).strip() == "" for n in names)
        return "" if empty else fill(match.group(1))

    return fill(_OPTIONAL.sub(optional, merged_prompt))


def to_sharegpt(
    dataset: Dataset,
    merged_prompt: str,
    merged_column_name: str = "instruction",
    output_column_name: str = "output",
    remove_unused_columns: bool = True,
    conversation_extension: int = 1,
    random_state: int = 3407,
) -> Dataset:
    """Merge columns into a ``conversations`` column of ShareGPT messages (see the module docstring)."""
    columns = dataset.column_names
    wanted = set(_PLACEHOLDER.findall(merged_prompt)) | {output_column_name}
    missing = sorted(wanted - set(columns))
    if missing:
        raise ValueError(f"to_sharegpt: columns {missing} are not in the dataset; its columns are {columns}")
    if not isinstance(conversation_extension, int) or conversation_extension < 1:
        raise ValueError(f"conversation_extension: {conversation_extension!r} must be an integer >= 1")
    rows = dataset.to_list()
    turns = [
        [{"from": "human", "value": merge_prompt(merged_prompt, row)}, {"from": "gpt", "value": str(row[output_column_name])}]
        for row in rows
    ]
    rng = random.Random(random_state)
    conversations = []
    for first in turns:
        conversation = list(first)
        for _ in range(conversation_extension - 1):
            conversation += turns[rng.randrange(len(turns))]
        conversations.append(conversation)
    data: dict[str, list] = {} if remove_unused_columns else {c: [r[c] for r in rows] for c in columns}
    data[merged_column_name] = [conv[0]["value"] for conv in conversations]
    data["conversations"] = conversations
    if remove_unused_columns:
        data.pop(merged_column_name)
    return Dataset.from_dict(data)
