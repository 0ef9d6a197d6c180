"""Unsloth's Gemma 3 (4B) notebook, ported by `fasttune port` and run as written on a tiny multimodal Gemma 3.

The checkpoint is multimodal, so ``FastModel`` returns a processor as the "tokenizer"; the notebook then uses it as a
tokenizer: ``apply_chat_template`` on text conversations, ``tokenizer.pad_token_id`` / ``tokenizer.pad_token`` to show
the trained tokens, ``tokenizer([text], return_tensors="pt")`` to generate, a ``TextStreamer`` over it. Only the model
path, the in-memory dataset (FineTome-like conversations), the row shown (1 for 100), step counts, the device
(``model.device`` for "cuda") and the CPU/fp32/optimizer switches differ from the published notebook.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from datasets import Dataset

from fasttune.port import port_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
from tests.trl.test_notebook import _notebook, _run  # noqa: E402

CELLS = [
    "%%capture\n!pip install unsloth",
    """from unsloth import FastModel
import torch
model, tokenizer = FastModel.from_pretrained(
    model_name = MODEL_DIR,
    max_seq_length = 2048, # Choose any for long context!
    load_in_4bit = True,  # 4 bit quantization to reduce memory
    load_in_8bit = False, # [NEW!] A bit more accurate, uses 2x memory
    full_finetuning = False, # [NEW!] We have full finetuning now!
)""",
    """model = FastModel.get_peft_model(
    model,
    finetune_vision_layers     = False, # Turn off for just text!
    finetune_language_layers   = True,  # Should leave on!
    finetune_attention_modules = True,  # Attention good for GRPO
    finetune_mlp_modules       = True,  # SHould leave on always!
    r = 8,           # Larger = higher accuracy, but might overfit
    lora_alpha = 8,  # Recommended alpha == r at least
    lora_dropout = 0,
    bias = "none",
    random_state = 3407,
)""",
    """from unsloth.chat_templates import get_chat_template
tokenizer = get_chat_template(
    tokenizer,
    chat_template = "gemma-3",
)""",
    """from datasets import Dataset
dataset = DATASET
from unsloth.chat_templates import standardize_data_formats
dataset = standardize_data_formats(dataset)""",
    """def formatting_prompts_func(examples):
   convos = examples["conversations"]
   texts = [tokenizer.apply_chat_template(convo, tokenize = False, add_generation_prompt = False).removeprefix('<bos>') for convo in convos]
   return { "text" : texts, }

dataset = dataset.map(formatting_prompts_func, batched = True)""",
    """from trl import SFTTrainer, SFTConfig
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    eval_dataset = None, # Can set up evaluation!
    args = SFTConfig(
        dataset_text_field = "text",
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 1, # Use GA to mimic batch size!
        warmup_steps = 0,
        max_steps = MAX_STEPS,
        learning_rate = 2e-2, # Reduce to 2e-5 for long training runs
        logging_steps = 1,
        optim = "adamw_torch",
        weight_decay = 0.01,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = OUTPUT_DIR,
        report_to = "none", # Use this for WandB etc
        fp16 = False, bf16 = False, use_cpu = True, disable_tqdm = True,
    ),
)""",
    """from unsloth.chat_templates import train_on_responses_only
trainer = train_on_responses_only(
    trainer,
    instruction_part = "<start_of_turn>user\\n",
    response_part = "<start_of_turn>model\\n",
)""",
    """shown_ids = tokenizer.decode(trainer.train_dataset[1]["input_ids"])""",
    """shown_labels = tokenizer.decode([tokenizer.pad_token_id if x == -100 else x for x in trainer.train_dataset[1]["labels"]]).replace(tokenizer.pad_token, " ")""",
    "trainer_stats = trainer.train()",
    """from unsloth.chat_templates import get_chat_template
tokenizer = get_chat_template(
    tokenizer,
    chat_template = "gemma-3",
)
messages = [{
    "role": "user",
    "content": [{
        "type" : "text",
        "text" : "Count to three.",
    }]
}]
text = tokenizer.apply_chat_template(
    messages,
    add_generation_prompt = True, # Must add for generation
)
outputs = model.generate(
    **tokenizer([text], return_tensors = "pt").to(model.device),
    max_new_tokens = 8, # Increase for longer outputs!
    # Recommended Gemma-3 settings!
    temperature = 1.0, top_p = 0.95, top_k = 64,
)
decoded = tokenizer.batch_decode(outputs)""",
    """from transformers import TextStreamer
_ = model.generate(
    **tokenizer([text], return_tensors = "pt").to(model.device),
    max_new_tokens = 8, # Increase for longer outputs!
    # Recommended Gemma-3 settings!
    temperature = 1.0, top_p = 0.95, top_k = 64,
    streamer = TextStreamer(tokenizer, skip_prompt = True),
)""",
    """model.save_pretrained(SAVE_DIR)  # Local saving
tokenizer.save_pretrained(SAVE_DIR)""",
]

CONVERSATIONS = [
    [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}],
    [{"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "1 2 3"}],
] * 4


def test_gemma3_4b_notebook_runs_as_written_on_a_multimodal_checkpoint(tiny_vlm_dir, tmp_path):
    path = tmp_path / "Gemma3_(4B).ipynb"
    path.write_text(json.dumps(_notebook(CELLS)), encoding="utf-8")
    output, changes, _ = port_file(path)
    cells = ["".join(c["source"]) for c in json.loads(output.read_text(encoding="utf-8"))["cells"]]
    assert changes and not re.search(r"^\s*(from|import)\s+(unsloth|trl)\b", "\n".join(cells), re.M)
    save = tmp_path / "gemma-3"
    ns = _run(cells, {"MODEL_DIR": str(tiny_vlm_dir("gemma3")), "MAX_STEPS": 6, "OUTPUT_DIR": str(tmp_path / "out"),
                      "SAVE_DIR": str(save), "DATASET": Dataset.from_dict({"conversations": CONVERSATIONS})})
    tokenizer, trainer = ns["tokenizer"], ns["trainer"]
    assert type(tokenizer).__name__ == "Gemma3Processor"
    prefix = "<bos><start_of_turn>user\nCount to three.<end_of_turn>\n<start_of_turn>model\n"
    assert ns["shown_ids"].startswith(prefix + "1 2 3<end_of_turn>"), ns["shown_ids"]
    # the masked positions print as pad tokens turned into spaces: only the answer turn is left
    labels = trainer.train_dataset[1]["labels"]
    masked = len(ns["shown_labels"]) - len(ns["shown_labels"].lstrip(" "))
    assert masked == labels.index(next(x for x in labels if x != -100)) > 0
    assert ns["shown_labels"].strip() == "1 2 3<end_of_turn>", ns["shown_labels"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    prompt = tokenizer.tokenizer([ns["text"]], return_tensors="pt")["input_ids"]
    assert torch.equal(ns["outputs"][:, :prompt.shape[1]], prompt) and ns["outputs"].shape[1] > prompt.shape[1]
    assert ns["text"] in ns["decoded"][0]  # (after a second <bos>: the processor's tokenizer adds one, as published)
    assert (save / "adapter_config.json").is_file() and (save / "processor_config.json").is_file()
