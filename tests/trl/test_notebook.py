"""An Unsloth-style conversational notebook, ported by `fasttune port` and run as written on a tiny model.

from_pretrained(load_in_4bit) -> get_peft_model -> get_chat_template / standardize_sharegpt -> SFTTrainer with the
Unsloth-era arguments (once args=SFTConfig, once args=TrainingArguments) -> train_on_responses_only -> train (the
loss falls) -> for_inference + generate -> save. Only the model path, the in-memory dataset, the step count and the
CPU/fp32 switches differ from the published notebooks.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from fasttune.port import port_file
from fasttune.train import PaddingFreeCollator

CELLS = [
    "%%capture\n!pip install unsloth",
    """from unsloth import FastLanguageModel
import torch
max_seq_length = 128
dtype = torch.float32
load_in_4bit = True
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = MODEL_DIR, max_seq_length = max_seq_length, dtype = dtype, load_in_4bit = load_in_4bit,
)""",
    """model = FastLanguageModel.get_peft_model(
    model, r = 16,
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha = 16, lora_dropout = 0, bias = "none", use_gradient_checkpointing = "unsloth",
    random_state = 3407, use_rslora = False, loftq_config = None,
)""",
    """from unsloth.chat_templates import get_chat_template
tokenizer = get_chat_template(tokenizer, chat_template = "llama-3.1")

def formatting_prompts_func(examples):
    convos = examples["conversations"]
    texts = [tokenizer.apply_chat_template(convo, tokenize = False, add_generation_prompt = False) for convo in convos]
    return { "text" : texts, }

from datasets import Dataset
from unsloth.chat_templates import standardize_sharegpt
dataset = Dataset.from_dict({"conversations": CONVERSATIONS})
dataset = standardize_sharegpt(dataset)
dataset = dataset.map(formatting_prompts_func, batched = True,)""",
    """from trl import SFTTrainer, SFTConfig
from transformers import TrainingArguments
from unsloth import is_bfloat16_supported
options = dict(
    per_device_train_batch_size = 4, gradient_accumulation_steps = 1, warmup_steps = 0, max_steps = MAX_STEPS,
    learning_rate = 5e-3, fp16 = False, bf16 = False, use_cpu = True, logging_steps = 1, optim = "adamw_torch",
    weight_decay = 0.01, lr_scheduler_type = "constant", seed = 3407, output_dir = OUTPUT_DIR, report_to = "none",
    save_strategy = "no", disable_tqdm = True,
)
trainer = SFTTrainer(
    model = model, tokenizer = tokenizer, train_dataset = dataset, dataset_text_field = "text",
    max_seq_length = max_seq_length, dataset_num_proc = 1, packing = False,
    args = SFTConfig(**options) if ARGS == "SFTConfig" else TrainingArguments(**options),
)""",
    """from unsloth.chat_templates import train_on_responses_only
trainer = train_on_responses_only(
    trainer,
    instruction_part = "<|start_header_id|>user<|end_header_id|>\\n\\n",
    response_part = "<|start_header_id|>assistant<|end_header_id|>\\n\\n",
)
trainer_stats = trainer.train()""",
    """FastLanguageModel.for_inference(model)
messages = [{"role": "user", "content": "Say hello."}]
inputs = tokenizer.apply_chat_template(messages, tokenize = True, add_generation_prompt = True,
                                       return_tensors = "pt", return_dict = True).to(model.device)
outputs = model.generate(**inputs, max_new_tokens = 8, use_cache = True, do_sample = False)
decoded = tokenizer.batch_decode(outputs)""",
    """model.save_pretrained(SAVE_DIR)
tokenizer.save_pretrained(SAVE_DIR)""",
]

CONVERSATIONS = [
    [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}],
    [{"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "1 2 3"}],
    [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "Capital of France?"},
     {"from": "gpt", "value": "Paris."}, {"from": "human", "value": "And 2+2?"}, {"from": "gpt", "value": "4"}],
    [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}],
] * 4


def _notebook(cells: list[str]) -> dict:
    return {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                       "source": cell.splitlines(keepends=True)} for cell in cells],
            "metadata": {"language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}


def _ported_cells(tmp_path) -> list[str]:
    path = tmp_path / "conversational.ipynb"
    path.write_text(json.dumps(_notebook(CELLS), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    output, changes, _ = port_file(path)
    assert len(changes) == 6  # 2 x unsloth, 3 x unsloth.chat_templates, 1 x trl
    cells = ["".join(cell["source"]) for cell in json.loads(output.read_text(encoding="utf-8"))["cells"]]
    code = "\n".join(cells)
    assert not re.search(r"^\s*(from|import)\s+(unsloth|trl)\b", code, re.M), code
    assert "from fasttune.trl import SFTTrainer, SFTConfig" in code and "from fasttune import FastLanguageModel" in code
    return cells


def _run(cells: list[str], namespace: dict) -> dict:
    for cell in cells:  # IPython lines (%%capture, !pip) are not Python: Jupyter runs them as magics
        exec("\n".join(line for line in cell.splitlines() if not line.lstrip().startswith(("%", "!"))), namespace)
    return namespace


@pytest.mark.parametrize("args_kind", ["SFTConfig", "TrainingArguments"])
def test_ported_unsloth_notebook_runs_as_written(tiny_model_dir, tmp_path, args_kind):
    steps = 6 if args_kind == "SFTConfig" else 4
    ns = _run(_ported_cells(tmp_path), {
        "MODEL_DIR": str(tiny_model_dir("llama")), "CONVERSATIONS": CONVERSATIONS, "MAX_STEPS": steps,
        "OUTPUT_DIR": str(tmp_path / "outputs"), "SAVE_DIR": str(tmp_path / "lora_model"), "ARGS": args_kind,
    })
    trainer = ns["trainer"]
    assert type(trainer.args).__name__ == "SFTConfig" and trainer.args.max_length == 128
    assert trainer.fasttune_fast_loss and isinstance(trainer.data_collator, PaddingFreeCollator)
    model = ns["model"]
    assert model.is_loaded_in_4bit and {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    row = trainer.train_dataset[0]
    assert -100 in row["labels"] and any(label != -100 for label in row["labels"])  # responses only
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < 0.85 * losses[0], f"the loss did not fall: {losses}"
    assert all("mean_token_accuracy" in h and "entropy" in h for h in history if "loss" in h)
    assert ns["outputs"].shape[1] > ns["inputs"]["input_ids"].shape[1]  # generated new tokens
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").exists()
    assert (tmp_path / "lora_model" / "tokenizer_config.json").exists()
