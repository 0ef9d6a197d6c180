"""train_on_responses_only on real TRL SFTTrainers, and the Unsloth notebook flow end to end on a tiny model.

get_chat_template -> standardize -> SFTTrainer(peft model) -> train_on_responses_only -> train().
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from fasttune.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only
from fasttune.data import DatasetError, TokenTexts, check_dataset

pytestmark = pytest.mark.slow

SHAREGPT = [
    [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "What is the capital of France?"},
     {"from": "gpt", "value": "Paris."}, {"from": "human", "value": "And 2+2?"}, {"from": "gpt", "value": "4"}],
    [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}],
    [{"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "1 2 3"}],
    [{"from": "human", "value": "def add(a, b):"}, {"from": "gpt", "value": "return a + b"},
     {"from": "human", "value": "Thanks"}, {"from": "gpt", "value": "You are welcome."}],
]


def _model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["o_proj"],
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _trainer(model_dir, tokenizer, dataset, tmp_path, **config):
    args = SFTConfig(max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3, report_to="none", use_cpu=True,
                     bf16=False, output_dir=str(tmp_path), logging_steps=1, save_strategy="no", seed=0,
                     gradient_checkpointing=False, **config)
    return SFTTrainer(model=_model(model_dir), processing_class=tokenizer, args=args, train_dataset=dataset)


def _messages_dataset():
    data = standardize_sharegpt(Dataset.from_dict({"conversations": SHAREGPT}))
    return data.rename_column("conversations", "messages")


def _expected_labels(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"])]


def test_unsloth_notebook_flow_trains_on_assistant_tokens_only(tiny_model_dir, fresh_tokenizer, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-core machine is shared: oversubscribed threads make 3 tiny steps take 10x longer
    try:
        _notebook_flow(tiny_model_dir, fresh_tokenizer, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _notebook_flow(tiny_model_dir, fresh_tokenizer, tmp_path):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3.1")
    dataset = check_dataset(_messages_dataset(), tokenizer, max_seq_length=256)
    trainer = train_on_responses_only(_trainer(tiny_model_dir("llama"), tokenizer, dataset, tmp_path))
    for row, messages in zip(trainer.train_dataset, dataset["messages"]):
        assert row["labels"] == _expected_labels(tokenizer, messages)
    seen = []
    original = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        seen.append(inputs["labels"].clone())
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    result = trainer.train()
    assert len(seen) == 3 and math.isfinite(result.training_loss)
    texts = TokenTexts(tokenizer)
    trained = {"".join(texts.piece(t) for t in row.tolist() if t != -100) for batch in seen for row in batch}
    allowed = {"Paris.<|eot_id|>4<|eot_id|>", "Hello!<|eot_id|>", "1 2 3<|eot_id|>",
               "return a + b<|eot_id|>You are welcome.<|eot_id|>"}
    assert trained <= allowed and trained
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_text_dataset_and_explicit_unsloth_markers(tiny_model_dir, fresh_tokenizer, tmp_path):
    tokenizer = get_chat_template(fresh_tokenizer("qwen2"), "chatml")
    dataset = _messages_dataset()
    texts = Dataset.from_dict({"text": [tokenizer.apply_chat_template(m, tokenize=False) for m in dataset["messages"]]})
    trainer = _trainer(tiny_model_dir("qwen2"), tokenizer, texts, tmp_path)
    # Unsloth's rule when only the two markers are given and differ from the template's: up to the next user turn.
    train_on_responses_only(trainer, instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant")
    pieces = TokenTexts(tokenizer)
    row = trainer.train_dataset[1]
    trained = "".join(pieces.piece(t) for t in row["labels"] if t != -100)
    # TRL appends the eos (<|im_end|> after mapping) to text that does not end with it; that token is trained too.
    assert trained == "\nHello!<|im_end|>\n<|im_end|>"


def test_packed_padding_free_batches_keep_sequence_boundaries(tiny_model_dir, fresh_tokenizer, tmp_path):
    tokenizer = get_chat_template(fresh_tokenizer("gemma"), "gemma")
    dataset = _messages_dataset()
    trainer = _trainer(tiny_model_dir("gemma"), tokenizer, dataset, tmp_path, packing=True, max_length=256,
                       padding_free=True)
    trainer = train_on_responses_only(trainer)
    expected = {tuple(_expected_labels(tokenizer, m)) for m in dataset["messages"]}
    for row in trainer.train_dataset:
        offset = 0
        for length in row["seq_lengths"]:
            assert tuple(row["labels"][offset:offset + length]) in expected
            offset += length
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["labels"].shape == batch["input_ids"].shape


def test_no_trainable_token_error_names_markers_and_shows_sample(tiny_model_dir, fresh_tokenizer, tmp_path):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3")
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, _messages_dataset(), tmp_path)
    with pytest.raises(ValueError) as info:
        train_on_responses_only(trainer, instruction_part="<|user|>\n", response_part="<|assistant|>\n")
    message = str(info.value)
    assert "'<|assistant|>\\n'" in message and "'<|user|>\\n'" in message
    assert "<|start_header_id|>user<|end_header_id|>" in message  # the rendered sample


def test_rows_truncated_before_the_answer_are_reported_or_dropped(tiny_model_dir, fresh_tokenizer, tmp_path, caplog):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3")
    rows = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]] * 3
    rows.append([{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "late"}])
    dataset = Dataset.from_dict({"messages": rows})
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, dataset, tmp_path, max_length=40)
    with pytest.raises(DatasetError, match=r"1 of 4 rows .*\n  row 3: no trainable token left"):
        train_on_responses_only(trainer)
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, dataset, tmp_path, max_length=40)
    with caplog.at_level(logging.WARNING, logger="fasttune.data.responses"):
        train_on_responses_only(trainer, skip_invalid=True)
    assert len(trainer.train_dataset) == 3
    assert "dropped 1 of 4 rows" in caplog.text and "1 of 4 rows are 40 tokens long" in caplog.text


def test_same_labels_as_trl_assistant_only_loss(tiny_model_dir, fresh_tokenizer, tmp_path):
    tokenizer = get_chat_template(fresh_tokenizer("phi3"), "phi-3")
    dataset = _messages_dataset()
    ours = train_on_responses_only(_trainer(tiny_model_dir("phi3"), tokenizer, dataset, tmp_path))
    trl = _trainer(tiny_model_dir("phi3"), tokenizer, dataset, tmp_path, assistant_only_loss=True)
    assert ours.train_dataset["labels"] == trl.train_dataset["labels"]
    assert any(label != -100 for row in trl.train_dataset["labels"] for label in row)


def test_double_bos_from_rendered_text_is_reported(tiny_model_dir, fresh_tokenizer, tmp_path, caplog):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3.1")
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in _messages_dataset()["messages"]]
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, Dataset.from_dict({"text": texts}), tmp_path)
    with caplog.at_level(logging.WARNING, logger="fasttune.data.responses"):
        train_on_responses_only(trainer)
    assert "4 rows start with two '<|begin_of_text|>' tokens" in caplog.text
    caplog.clear()
    stripped = [t.removeprefix(tokenizer.bos_token) for t in texts]
    trainer = _trainer(tiny_model_dir("llama"), tokenizer, Dataset.from_dict({"text": stripped}), tmp_path)
    with caplog.at_level(logging.WARNING, logger="fasttune.data.responses"):
        train_on_responses_only(trainer)
    assert "start with two" not in caplog.text
