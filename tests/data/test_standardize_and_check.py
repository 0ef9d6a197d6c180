"""standardize_sharegpt / standardize_data_formats / to_sharegpt, and check_dataset's row-by-row report."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset

from fasttune.data import (
    DatasetError,
    check_dataset,
    get_chat_template,
    standardize_data_formats,
    standardize_sharegpt,
    to_sharegpt,
)

SHAREGPT = [
    [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
]
OPENAI = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]


def test_standardize_sharegpt_maps_keys_and_roles():
    out = standardize_sharegpt(Dataset.from_dict({"conversations": SHAREGPT}))
    assert out["conversations"][0] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    ]
    assert out["conversations"][1][1] == {"role": "assistant", "content": "4"}
    same = standardize_sharegpt(Dataset.from_dict({"messages": OPENAI}))
    assert same["messages"] == OPENAI


def test_standardize_sharegpt_unknown_role_names_row_and_message():
    data = Dataset.from_dict({"conversations": [SHAREGPT[1], [{"from": "bot", "value": "x"}]]})
    with pytest.raises(ValueError, match=r"row 1, message 0: role 'bot' is not known"):
        standardize_sharegpt(data)
    out = standardize_sharegpt(data, aliases_for_assistant=("gpt", "bot"))
    assert out["conversations"][1] == [{"role": "assistant", "content": "x"}]


def test_standardize_data_formats_alpaca_prompt_completion_and_sharegpt():
    alpaca = Dataset.from_dict({"instruction": ["Add", "Greet"], "input": ["2 and 2", ""], "output": ["4", "Hi"]})
    out = standardize_data_formats(alpaca)
    assert out.column_names == ["conversations"]
    assert out["conversations"][0] == [{"role": "user", "content": "Add\n\n2 and 2"},
                                       {"role": "assistant", "content": "4"}]
    assert out["conversations"][1][0] == {"role": "user", "content": "Greet"}
    pairs = standardize_data_formats(Dataset.from_dict({"prompt": ["p"], "completion": ["c"]}), output_column="messages")
    assert pairs["messages"][0] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    shared = standardize_data_formats(Dataset.from_dict({"conversations": SHAREGPT}), output_column="messages")
    assert shared["messages"][1][0] == {"role": "user", "content": "2+2?"}
    with pytest.raises(ValueError, match="cannot tell the format"):
        standardize_data_formats(Dataset.from_dict({"question": ["q"]}))


def test_to_sharegpt_merges_columns_with_optional_sections():
    data = Dataset.from_dict({"instruction": ["Add", "Greet"], "input": ["2 and 2", ""], "output": ["4", "Hi"]})
    out = to_sharegpt(data, merged_prompt="{instruction}[[\nInput: {input}]]", output_column_name="output")
    assert out.column_names == ["conversations"]
    assert out["conversations"][0] == [{"from": "human", "value": "Add\nInput: 2 and 2"}, {"from": "gpt", "value": "4"}]
    assert out["conversations"][1][0]["value"] == "Greet"
    extended = to_sharegpt(data, "{instruction}", conversation_extension=3, random_state=1)
    assert all(len(c) == 6 for c in extended["conversations"])
    assert extended["conversations"] == to_sharegpt(data, "{instruction}", conversation_extension=3,
                                                    random_state=1)["conversations"]
    with pytest.raises(ValueError, match=r"columns \['question'\] are not in the dataset"):
        to_sharegpt(data, "{question}")


BAD_ROWS = [
    [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "ok"}],
    [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "   "}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "only a question"}],
    [{"role": "user", "content": 42}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}, {"role": "assistant", "content": "b"}],
]


def _rows(rows):
    return Dataset.from_list([{"messages": r} for r in rows])


def test_check_dataset_reports_every_bad_row_with_reason():
    data = _rows(BAD_ROWS[:4] + BAD_ROWS[5:])  # Arrow cannot hold row 4's int content next to strings
    with pytest.raises(DatasetError) as info:
        check_dataset(data)
    message = str(info.value)
    assert "4 of 5 rows cannot be trained on" in message
    assert "row 1: message 0: unknown role 'bot'" in message
    assert "row 2: message 0 (user): content is empty" in message
    assert "row 3: the conversation has no assistant turn" in message
    assert "row 4: message 1: a system message is only allowed as the first message" in message
    assert [row for row, _ in info.value.problems] == [1, 2, 3, 4]


def test_check_dataset_non_string_content():
    from fasttune.data import conversation_problems

    assert conversation_problems(BAD_ROWS[4]) == ["message 0 (user): content must be a string or a list of text parts, got int 42"]


def test_check_dataset_skip_invalid_drops_and_reports(caplog):
    data = _rows(BAD_ROWS[:4])
    with caplog.at_level(logging.WARNING, logger="fasttune.data.check"):
        out = check_dataset(data, skip_invalid=True)
    assert len(out) == 1 and out[0]["messages"][0]["content"] == "fine"
    assert "dropped 3 of 4 rows" in caplog.text


def test_check_dataset_truncation_is_counted_and_full_truncation_reported(fresh_tokenizer, caplog):
    tokenizer = get_chat_template(fresh_tokenizer("qwen2"), "chatml")
    long_prompt = "word " * 60
    rows = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello " * 40}],
        [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "late"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "short"}],
    ]
    with pytest.raises(DatasetError, match=r"row 1: fully truncated: the conversation is \d+ tokens long and max_seq_length=32 cuts off"):
        check_dataset(_rows(rows), tokenizer, max_seq_length=32)
    with caplog.at_level(logging.WARNING, logger="fasttune.data.check"):
        kept = check_dataset(_rows(rows), tokenizer, max_seq_length=32, skip_invalid=True)
    assert len(kept) == 2
    assert "2 of 3 conversations are longer than max_seq_length=32" in caplog.text
    with pytest.raises(ValueError, match="needs the tokenizer"):
        check_dataset(_rows(rows), max_seq_length=32)


def test_check_dataset_without_conversation_column():
    with pytest.raises(ValueError, match="no 'messages' or 'conversations' column"):
        check_dataset(Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(ValueError, match="ShareGPT keys"):
        check_dataset(Dataset.from_dict({"conversations": SHAREGPT}))


def test_check_dataset_with_a_template_that_renders_no_marker(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rows = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]] * 2
    with pytest.raises(ValueError, match=r"no row has a trainable token\. Searched for response_part=") as info:
        check_dataset(_rows(rows), tokenizer)
    assert "'<|start_header_id|>assistant<|end_header_id|>\\n\\n'" in str(info.value)
    assert "user: Hi\nassistant: Hello" in str(info.value)
    tokenizer.chat_template = tokenizer.fasttune_template.jinja
    assert len(check_dataset(_rows(rows), tokenizer)) == 2
