"""The data page: a dataset's rows rendered with the chat template, each token marked trained or not, and the
dataset checks' problems by row.

The marks are the labels the trainer's collator produces (``labels != -100``), made by the same functions
``fasttune train`` runs, in its order: the CLI's loading and format detection (``fasttune.cli.data``), TRL's
tokenization as fasttune does it (``tokenize_conversations`` / ``tokenize_text_rows``), truncation to
``model.max_seq_length``, ``train_on_responses_only``'s masking (``mask_dataset``) where the recipe trains on answers
only, then ``PaddingFreeCollator``. ``tests/studio/test_preview.py`` compares them with a real ``SFTTrainer``'s batch.
Preference (DPO, ORPO, KTO) and GRPO rows are shown as their parts: TRL's trainers score completion tokens only
(chosen / rejected / completion); GRPO trains on completions it samples, so no token of the row itself is trained.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from fasttune.chat_templates import standardize_data_formats
from fasttune.cli.data import TRL_FORMATS, detect_format, load_rows
from fasttune.cli.recipe import Recipe
from fasttune.cli.train import chat_tokenizer, responses_only
from fasttune.data import DatasetError, check_dataset, markers_for, tokenize_conversations
from fasttune.data.masking import IGNORE_INDEX, TokenTexts
from fasttune.data.responses import mask_dataset
from fasttune.data.text_rows import tokenize_text_rows
from fasttune.data.validate import conversation_problems
from fasttune.train.padding_free import PaddingFreeCollator

MAX_SHOWN = 50  # rows rendered at most per request


def collated_labels(example: dict[str, Any], tokenizer: Any) -> list[int]:
    """The labels ``SFTTrainer``'s padding-free collator gives this tokenized example (one row, no packing)."""
    collator = PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id or 0)
    return collator([example])["labels"][0].tolist()


def _token_pieces(texts: TokenTexts, ids: list[int], labels: list[int]) -> list[list[Any]]:
    """[[text, trained], ...] per token: its text (response masking's own ``TokenTexts``) and whether it is
    trained."""
    return [[texts.piece(int(token_id)), label != IGNORE_INDEX] for token_id, label in zip(ids, labels)]


def _row_mask(example: dict[str, Any], tokenizer: Any, markers: Any, max_length: int,
              answers_only: bool) -> tuple[dict[str, Any], str | None]:
    """(the example with ``labels`` as the trainer masks it, its problem or None)."""
    example = dict(example, input_ids=list(example["input_ids"])[:max_length])  # TRL truncates (keep_start)
    if not answers_only:
        return example, None
    one = Dataset.from_list([example])
    try:
        masked = mask_dataset(one, tokenizer, markers, max_length=max_length, name="preview")
    except DatasetError as error:
        return dict(example, labels=[IGNORE_INDEX] * len(example["input_ids"])), error.problems[0][1]
    except ValueError as error:  # no row of this one-row dataset has a trainable token
        return dict(example, labels=[IGNORE_INDEX] * len(example["input_ids"])), str(error).splitlines()[0]
    return masked[0], None


def preview(recipe: Recipe, tokenizer: Any, start: int = 0, count: int = 8) -> dict[str, Any]:
    """The data page's content for rows ``start .. start+count`` (see the module docstring)."""
    spec, method = recipe.data, recipe.train.method
    rows = load_rows(spec)
    fmt = detect_format(rows.column_names, spec, method)
    count = max(1, min(count, MAX_SHOWN))
    shown = range(min(start, len(rows)), min(start + count, len(rows)))
    out: dict[str, Any] = {"format": fmt, "method": method, "columns": rows.column_names, "total_rows": len(rows),
                           "start": shown.start, "rows": [], "problems": []}
    if fmt in TRL_FORMATS or method == "grpo":
        out["rows"] = [_parts_row(i, rows[i], fmt) for i in shown]
        out["trained"] = ("GRPO trains on the completions it samples for each prompt; no token of the row is trained"
                          if method == "grpo" else "the completion tokens (chosen / rejected / completion)")
        return out
    tokenizer = chat_tokenizer(tokenizer, spec.chat_template, fmt)
    max_length = recipe.model.max_seq_length
    answers_only = responses_only(recipe, fmt)
    if fmt == "text":
        data = rows.select_columns([spec.text_field])
        data = data.rename_column(spec.text_field, "text") if spec.text_field != "text" else data
        try:
            tokenized = tokenize_text_rows(data.select(shown), tokenizer)
        except DatasetError as error:
            out["problems"] = [{"row": shown.start + row, "problem": reason} for row, reason in error.problems]
            return out
    else:
        data = standardize_data_formats(rows, output_column="messages")
        try:
            check_dataset(data, tokenizer, max_seq_length=max_length)
        except DatasetError as error:
            out["problems"] = [{"row": row, "problem": reason} for row, reason in error.problems]
        tokenized = []
        for i in shown:  # one by one: a row the trainer would refuse is shown with its problem, not tokenized
            problems = conversation_problems(data[i]["messages"])
            if problems:
                out["rows"].append({"index": i, "problem": "; ".join(problems), "parts": [
                    {"column": m.get("role", "?") if isinstance(m, dict) else "?", "text": _text(
                        m.get("content", "") if isinstance(m, dict) else m), "trained": False}
                    for m in data[i]["messages"] or []]})
            else:
                tokenized.append((i, tokenize_conversations(data.select([i]), tokenizer)[0]))
    markers = markers_for(tokenizer) if answers_only else None
    trained_total = tokens_total = 0
    texts = TokenTexts(tokenizer)
    if fmt == "text":
        tokenized = list(zip(shown, tokenized))
    for index, example in tokenized:
        example, problem = _row_mask(example, tokenizer, markers, max_length, answers_only)
        labels = collated_labels(example, tokenizer)
        ids = example["input_ids"]
        trained = sum(1 for x in labels if x != IGNORE_INDEX)
        trained_total, tokens_total = trained_total + trained, tokens_total + len(ids)
        out["rows"].append({"index": index, "tokens": _token_pieces(texts, ids, labels),
                            "trained_tokens": trained, "total_tokens": len(ids), "problem": problem,
                            "labels": labels})
    out["rows"].sort(key=lambda row: row["index"])
    out["trained"] = "the assistant answers (highlighted)" if answers_only else "every token (highlighted)"
    out["trained_tokens"], out["total_tokens"] = trained_total, tokens_total
    return out


def _parts_row(index: int, row: dict[str, Any], fmt: str) -> dict[str, Any]:
    trained = {"chosen", "rejected", "completion"} if fmt != "prompt_only" else set()
    parts = [{"column": key, "text": _text(value), "trained": key in trained} for key, value in row.items()]
    return {"index": index, "parts": parts}


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in value)
    return str(value)
