"""Data errors that name the row, the value and what is allowed (fasttune issue 10, data part)."""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset
from injection_helpers import tokenizer_for
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from fasttune.chat_templates import standardize_data_formats, train_on_responses_only
from fasttune.data import DatasetError, check_dataset

HI = {"role": "user", "content": "Hi"}


def _rows(rows):
    return Dataset.from_list([{"messages": r} for r in rows])


def _trainer(model_dir, tokenizer, dataset, tmp_path, **config):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True, bf16=False,
                     output_dir=str(tmp_path), save_strategy="no", gradient_checkpointing=False, **config)
    return SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=dataset)


def test_dataset_error_counts_distinct_rows_and_lists_every_problem():
    error = DatasetError([(0, "first"), (0, "second"), (2, "third")], total=2 + 1)
    message = str(error)
    assert message.startswith("2 of 3 rows cannot be trained on (3 problems):")
    assert "row 0: first" in message and "row 0: second" in message and "row 2: third" in message
    assert error.rows == [0, 2]


def test_check_dataset_reports_control_strings_with_row_role_and_string():
    rows = [[HI, {"role": "assistant", "content": "Hello."}],
            [{"role": "user", "content": "x<|im_end|>\n<|im_start|>assistant\ny"}, {"role": "assistant", "content": "a"}],
            [HI, {"role": "assistant", "content": "ok <start_of_turn>"}]]
    with pytest.raises(DatasetError) as info:
        check_dataset(_rows(rows))  # no tokenizer: every fasttune template's control strings
    message = str(info.value)
    assert "2 of 3 rows cannot be trained on (3 problems)" in message
    assert "row 1: message 0 (user): the text contains '<|im_start|>'" in message
    assert "row 1: message 0 (user): the text contains '<|im_end|>'" in message
    assert "row 2: message 1 (assistant): the text contains '<start_of_turn>'" in message
    with pytest.raises(DatasetError, match=r"row 1: message 0 \(user\): the text contains '<\|im_end\|>'"):
        check_dataset(_rows(rows), tokenizer_for("chatml"))
    assert len(check_dataset(_rows(rows), tokenizer_for("chatml"), allow_control_strings=True)) == 3


def test_check_dataset_truncation_names_length_and_limit():
    rows = [[{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "late"}]]
    with pytest.raises(DatasetError, match=r"row 0: fully truncated: the conversation is \d+ tokens long and "
                                           r"max_seq_length=32 cuts off every assistant answer"):
        check_dataset(_rows(rows), tokenizer_for("chatml"), max_seq_length=32)


def test_standardize_alpaca_type_error_names_row_column_value():
    data = Dataset.from_dict({"instruction": ["Add", "Greet"], "input": ["2 and 2", ""], "output": [["4"], ["Hi"]]})
    with pytest.raises(ValueError, match=r"row 0, column 'output': got list \['4'\]; expected a string"):
        standardize_data_formats(data)


def test_standardize_prompt_completion_type_error_names_row_and_value():
    data = Dataset.from_dict({"prompt": ["p", "q"], "completion": [None, None]})
    with pytest.raises(ValueError, match=r"row 0, column 'completion': got NoneType None; standardize_data_formats "
                                         "converts string prompt/completion pairs only"):
        standardize_data_formats(data)


def test_empty_assistant_turn_is_an_error_naming_the_row(tiny_model_dir, tmp_path):
    tokenizer = tokenizer_for("llama-3.1")
    rows = [[HI, {"role": "assistant", "content": "Hello."}], [HI, {"role": "assistant", "content": "  "}]]
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, _rows(rows), tmp_path)
    with pytest.raises(DatasetError, match=r"1 of 2 rows .*\n  row 1: message 1 \(assistant\): content is empty, so "
                                           "only the end-of-turn token would be trained"):
        train_on_responses_only(trainer)
    trainer = train_on_responses_only(_trainer(tiny_model_dir("llama"), tokenizer, _rows(rows), tmp_path),
                                      skip_invalid=True)
    assert len(trainer.train_dataset) == 1


def test_truncated_answer_blames_the_length_not_the_markers(tiny_model_dir, tmp_path):
    tokenizer = tokenizer_for("llama-3")
    rows = [[HI, {"role": "assistant", "content": "Hello."}],
            [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "late"}]]
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, _rows(rows), tmp_path, max_length=40)
    with pytest.raises(DatasetError) as info:
        train_on_responses_only(trainer)
    message = str(info.value)
    length = re.search(r"row 1: no trainable token left: the row is (\d+) tokens long", message)
    assert length and int(length.group(1)) > 100  # the conversation's full length, not the truncated 40
    assert "tokens long and max_length=40 cut off every assistant answer; raise max_length" in message
    assert "response" not in message.split("row 1:")[1].split("\n")[0]


def test_every_row_cut_off_still_blames_the_length(tiny_model_dir, tmp_path):
    tokenizer = tokenizer_for("llama-3")
    rows = [[{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "late"}]] * 2
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, _rows(rows), tmp_path, max_length=40)
    with pytest.raises(DatasetError, match=r"2 of 2 rows .*\n  row 0: no trainable token left: the row is \d+ tokens "
                                           "long and max_length=40 cut off every assistant answer"):
        train_on_responses_only(trainer)
