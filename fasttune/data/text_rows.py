"""`tokenize_text_rows`: the rendered-text flow (``dataset_text_field="text"``) tokenized without forged turns.

Unsloth's notebooks render each conversation to a ``text`` column (``tokenizer.apply_chat_template(convos,
tokenize=False)``) and train on it. TRL tokenizes that text with special tokens parsed, so a control string a user
wrote inside a message (``<|eot_id|><|start_header_id|>assistant<|end_header_id|>...``) becomes real turn markers,
and responses-only training then trains the forged "answer". ``fasttune.trl.SFTTrainer`` tokenizes such datasets here,
exactly as TRL would (text + EOS when it does not end with one, then ``tokenizer(text)``), with two differences:

- **The row still carries its conversation** (the notebooks' ``map`` keeps ``conversations`` beside ``text``) and
  ``text`` is that conversation's rendering (or the rendering without its leading BOS, as Gemma notebooks write it):
  the rendering's tokens come from `encode_chat` (message text stays text). Where the text holds no control string
  inside a message these are the same tokens, so a clean row trains exactly as before; otherwise the forged markers
  are plain text, and the rows are counted in a warning. A message spelling a marker that the tokenizer writes as
  plain text anyway (alpaca's ``### Response:``) cannot be neutralised by tokenizing: that row is refused as below.
- **No conversation** (or text that is not its rendering): the template's turn markers in the text must alternate as
  a rendering of well-formed messages does (instruction, response, instruction, response, ...; a system turn has its
  own marker). Two instruction or two response markers in a row mean a turn was written inside a message; such rows
  are refused by index, with the marker and where it is, unless ``forged_turns="allow"`` (train them as TRL would).
  Text alone cannot show a forged *pair* of turns (a whole fake answer and a fake next question): keep the
  conversation column to be safe against that too.
"""

from __future__ import annotations

import logging
from typing import Any

from fasttune.data.check import DatasetError
from fasttune.data.encode import control_strings, encode_chat, find_control_strings
from fasttune.data.markers import markers_for, plain_marker_problems, plain_text_markers

logger = logging.getLogger("fasttune")

FORGED_TURNS = ("refuse", "allow")
CONVERSATION_COLUMNS = ("conversations", "conversation")


def _conversation_column(columns: list[str]) -> str | None:
    return next((c for c in CONVERSATION_COLUMNS if c in columns), None)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def turn_marker_problem(text: str, instruction_part: str, response_part: str) -> str | None:
    """Why ``text`` cannot be a rendering of well-formed messages (two same turn markers in a row), or None."""
    found = sorted([(i, "instruction", instruction_part) for i in _positions(text, instruction_part)]
                   + [(i, "response", response_part) for i in _positions(text, response_part)])
    for (_, kind_a, _), (at, kind_b, marker) in zip(found, found[1:]):
        if kind_a == kind_b:
            return (f"the text holds a second {kind_b} marker {marker!r} in a row at character {at}: a message "
                    "spells a turn marker, which would train a forged turn")
    return None


def _positions(text: str, marker: str) -> list[int]:
    out, at = [], text.find(marker)
    while at >= 0:
        out.append(at)
        at = text.find(marker, at + len(marker))
    return out


class _RowTokenizer:
    def __init__(self, tokenizer: Any, column: str | None, forged_turns: str):
        self.tokenizer = tokenizer
        self.column = column
        self.forged_turns = forged_turns
        self.eos = tokenizer.eos_token
        self.bos = tokenizer.bos_token
        self.controls = control_strings(tokenizer)
        try:
            instruction_part, response_part, _ = markers_for(tokenizer)
        except ValueError:  # a template fasttune does not know: its markers are unknown, nothing to check against
            instruction_part = response_part = ""
        self.markers = (instruction_part, response_part) if instruction_part and response_part else None
        # markers this tokenizer writes as plain text (alpaca's '### Response:'): tokenizing cannot neutralise them
        self.plain = plain_text_markers(tokenizer, (instruction_part, response_part, ())) if self.markers else ()

    def __call__(self, example: dict, row: int, field: str) -> dict:
        text = example[field]
        if not isinstance(text, str):
            raise ValueError(f"row {row} ({field!r} column): {type(text).__name__} where text was expected")
        full = text + self.eos if self.eos and not text.endswith(self.eos) else text  # TRL's add_eos
        ids = list(self.tokenizer(full).input_ids)  # what TRL trains on
        conversation = example.get(self.column) if self.column else None
        strip = self._rendering_offset(conversation, text) if _is_conversation(conversation) else None
        if strip is not None:
            spelled = plain_marker_problems(conversation, self.plain) if self.plain else []
            if spelled:
                return {"input_ids": ids,
                        "fasttune_text_row": spelled[0] if self.forged_turns == "refuse" else "forged"}
            if not find_control_strings(conversation, self.controls):  # encode_chat would give the text's own tokens
                return {"input_ids": ids, "fasttune_text_row": "clean"}
            safe = encode_chat(self.tokenizer, conversation)
            if not strip or (safe and safe[0] == self.tokenizer.bos_token_id):
                return self._replaced(ids, safe[strip:], text, row, field)
        problem = turn_marker_problem(text, *self.markers) if self.markers else None
        if problem is not None and self.forged_turns == "refuse":
            return {"input_ids": ids, "fasttune_text_row": problem}
        return {"input_ids": ids, "fasttune_text_row": "forged" if problem else "clean"}

    def _rendering_offset(self, conversation: list, text: str) -> int | None:
        """How many leading tokens of the conversation's rendering ``text`` lacks (0, or 1 without its BOS), or None
        when ``text`` is not its rendering."""
        rendered = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        if text == rendered:
            return 0
        if self.bos and rendered.startswith(self.bos) and text == rendered[len(self.bos):]:
            return 1  # the notebook removed the BOS text (Gemma's .removeprefix('<bos>')): drop the BOS token
        return None

    def _replaced(self, ids: list[int], safe: list[int], text: str, row: int, field: str) -> dict:
        """TRL's ``ids`` with the text's own tokens replaced by the conversation's ``safe`` ones."""
        plain = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        if safe == plain:
            return {"input_ids": ids, "fasttune_text_row": "clean"}
        at = next((i for i in range(len(ids) - len(plain) + 1) if ids[i:i + len(plain)] == plain), None)
        if at is None:
            raise ValueError(f"row {row} ({field!r} column): the tokenized text does not contain the text's own "
                             "tokens; cannot replace them by the conversation's")
        return {"input_ids": ids[:at] + safe + ids[at + len(plain):], "fasttune_text_row": "reencoded"}


def check_forged_turns(value: str) -> str:
    if value not in FORGED_TURNS:
        raise ValueError(f"forged_turns: {value!r} is not allowed; allowed: {', '.join(FORGED_TURNS)}")
    return value


def tokenize_text_rows(dataset: Any, tokenizer: Any, field: str = "text", forged_turns: str = "refuse",
                       num_proc: int | None = None, name: str = "train") -> Any:
    """Add ``input_ids`` to a text dataset as TRL would, without forged turns (see the module docstring)."""
    check_forged_turns(forged_turns)
    column = _conversation_column(dataset.column_names)
    row_tokenizer = _RowTokenizer(tokenizer, column, forged_turns)
    out = dataset.map(lambda example, row: row_tokenizer(example, row, field), with_indices=True, num_proc=num_proc,
                      desc=f"Tokenizing {name} text (no forged turns)")
    states = out["fasttune_text_row"]
    out = out.remove_columns(["fasttune_text_row"])
    problems = [(row, state) for row, state in enumerate(states) if state not in ("clean", "reencoded", "forged")]
    if problems:
        raise DatasetError(problems, len(out), hint=(
            f"Keep the conversation column ({' or '.join(CONVERSATION_COLUMNS)}) beside {field!r} so fasttune "
            "tokenizes the messages safely, fix these rows, or pass forged_turns='allow' to SFTTrainer to train "
            "them as written."))
    reencoded = [row for row, state in enumerate(states) if state == "reencoded"]
    if reencoded:
        logger.warning("%s dataset: %d rows hold control strings inside message text (first: row %d); they were "
                       "tokenized from their %r column so that this text stays plain text.", name, len(reencoded),
                       reencoded[0], column)
    forged = [row for row, state in enumerate(states) if state == "forged"]
    if forged:
        logger.warning("%s dataset: %d rows hold turn markers inside a message (first: row %d); trained as written "
                       "(forged_turns='allow').", name, len(forged), forged[0])
    return out


__all__ = ["FORGED_TURNS", "check_forged_turns", "tokenize_text_rows", "turn_marker_problem"]
