"""Three more Unsloth notebooks, ported by `fasttune port` and run as written on tiny fp32 models.

- Alpaca/Ollama: to_sharegpt (merged columns, conversation_extension) -> standardize_sharegpt -> apply_chat_template
  with an Alpaca prompt -> SFTTrainer(dataset_text_field="text") -> generate -> save_pretrained_gguf q8_0 + Modelfile.
- Gemma-3 (text): get_chat_template("gemma-3"), content as lists of text parts, train_on_responses_only with the gemma
  markers, generation from list-of-parts messages; FastModel.get_peft_model with the notebook's finetune_* switches.
- Continued pretraining: target_modules with embed_tokens/lm_head, UnslothTrainer + UnslothTrainingArguments with
  embedding_learning_rate on plain text, unsloth_train, generate, save and reload.
Only model paths, in-memory datasets, step counts and CPU/fp32 switches differ from the published notebooks.
"""

from __future__ import annotations

import json
import re

import torch
from test_notebook import _notebook, _run
from trl_helpers import TEXTS

from fasttune.port import port_file

COMMON = """import torch
max_seq_length = 128
dtype = torch.float32
load_in_4bit = False
"""
TRAIN_OPTIONS = """per_device_train_batch_size = 4, gradient_accumulation_steps = 1, warmup_steps = 0, max_steps = 8,
    fp16 = False, bf16 = False, use_cpu = True, logging_steps = 1, optim = "adamw_torch", weight_decay = 0.01,
    lr_scheduler_type = "constant", seed = 3407, output_dir = OUTPUT_DIR, report_to = "none", save_strategy = "no",
    disable_tqdm = True,"""


def _port_and_run(tmp_path, cells: list[str], namespace: dict) -> dict:
    path = tmp_path / "notebook.ipynb"
    path.write_text(json.dumps(_notebook(cells)), encoding="utf-8")
    output, changes, _ = port_file(path)
    ported = ["".join(c["source"]) for c in json.loads(output.read_text(encoding="utf-8"))["cells"]]
    assert changes and not re.search(r"^\s*(from|import)\s+(unsloth|trl)\b", "\n".join(ported), re.M)
    return _run(ported, {"OUTPUT_DIR": str(tmp_path / "outputs"), **namespace})


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_learns(trainer) -> None:
    losses = _losses(trainer)
    assert len(losses) == trainer.args.max_steps and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], f"the loss did not fall: {losses}"


ALPACA_CELLS = [
    "%%capture\n!pip install unsloth",
    COMMON + """from unsloth import FastLanguageModel
model, tokenizer = FastLanguageModel.from_pretrained(model_name = MODEL_DIR, max_seq_length = max_seq_length,
                                                     dtype = dtype, load_in_4bit = load_in_4bit)
model = FastLanguageModel.get_peft_model(model, r = 16, lora_alpha = 16, lora_dropout = 0, bias = "none",
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing = "unsloth", random_state = 3407)""",
    """from datasets import Dataset
dataset = Dataset.from_dict(ROWS)
from unsloth import to_sharegpt
dataset = to_sharegpt(dataset, merged_prompt = "{instruction}[[\\nYour input is:\\n{input}]]",
                      output_column_name = "output", conversation_extension = 3)
from unsloth import standardize_sharegpt
dataset = standardize_sharegpt(dataset)
chat_template = \"\"\"Below are some instructions that describe some tasks. Write responses that appropriately complete each request.

### Instruction:
{INPUT}

### Response:
{OUTPUT}\"\"\"
from unsloth import apply_chat_template
dataset = apply_chat_template(dataset, tokenizer = tokenizer, chat_template = chat_template)""",
    """from trl import SFTTrainer
from transformers import TrainingArguments
from unsloth import is_bfloat16_supported
trainer = SFTTrainer(model = model, tokenizer = tokenizer, train_dataset = dataset, dataset_text_field = "text",
    max_seq_length = max_seq_length, dataset_num_proc = 1, packing = False,
    args = TrainingArguments(learning_rate = 1e-2, """ + TRAIN_OPTIONS + """))
trainer_stats = trainer.train()""",
    """FastLanguageModel.for_inference(model)
messages = [{"role": "user", "content": "Add the numbers\\nYour input is:\\n1 2"}]
input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt = True,
                                          return_tensors = "pt").to(model.device)
from transformers import TextStreamer
text_streamer = TextStreamer(tokenizer, skip_prompt = True)
_ = model.generate(input_ids, streamer = text_streamer, max_new_tokens = 8, pad_token_id = tokenizer.eos_token_id)""",
    # the same cell as transformers-4-era notebooks also wrote it (a keyword), then transformers 5's dict form
    """inputs = tokenizer.apply_chat_template(messages, tokenize = True, add_generation_prompt = True,
                                       return_tensors = "pt").to(model.device)
by_keyword = model.generate(input_ids = inputs, max_new_tokens = 8, do_sample = False)
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt = True, return_tensors = "pt",
                                       return_dict = True).to(model.device)
outputs = model.generate(**inputs, max_new_tokens = 8, use_cache = True, do_sample = False)""",
    """model.save_pretrained_gguf(SAVE_DIR, tokenizer, quantization_method = "q8_0")
print(tokenizer._ollama_modelfile)""",
]
ALPACA_ROWS = {"instruction": ["Add the numbers", "Say hi", "Name a colour", "Reverse the word"] * 4,
               "input": ["1 2", "", "", "alpha"] * 4, "output": ["3", "hi", "blue", "ahpla"] * 4}


def test_alpaca_ollama_notebook(tiny_model_dir, tmp_path):
    save = tmp_path / "gguf"
    ns = _port_and_run(tmp_path, ALPACA_CELLS, {"MODEL_DIR": str(tiny_model_dir("llama")), "ROWS": ALPACA_ROWS,
                                                 "SAVE_DIR": str(save)})
    tokenizer, trainer = ns["tokenizer"], ns["trainer"]
    text = ns["dataset"][0]["text"]
    assert text.startswith("Below are some instructions") and text.count("### Response:\n") == 3  # 3 turns
    ids = trainer.train_dataset[0]["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # one BOS
    _assert_learns(trainer)
    assert ns["outputs"].shape[1] > ns["inputs"]["input_ids"].shape[1]
    assert torch.equal(ns["_"], ns["outputs"]) and torch.equal(ns["by_keyword"], ns["outputs"])  # greedy: same ids
    assert (save / "model.Q8_0.gguf").stat().st_size > 0
    modelfile = (save / "Modelfile").read_text(encoding="utf-8")
    assert "### Instruction:\n{{ $m.Content }}" in modelfile and 'PARAMETER stop "<|end_of_text|>"' in modelfile
    assert tokenizer._ollama_modelfile.split("\n", 1)[1] == modelfile.split("\n", 1)[1]  # same TEMPLATE and stops


GEMMA3_CELLS = [
    COMMON + """from unsloth import FastModel
model, tokenizer = FastModel.from_pretrained(model_name = MODEL_DIR, max_seq_length = max_seq_length,
                                             load_in_4bit = load_in_4bit, dtype = dtype, full_finetuning = False)
model = FastModel.get_peft_model(model, finetune_vision_layers = False, finetune_language_layers = True,
    finetune_attention_modules = True, finetune_mlp_modules = True,
    r = 8, lora_alpha = 8, lora_dropout = 0, bias = "none", random_state = 3407)""",
    """from unsloth.chat_templates import get_chat_template
tokenizer = get_chat_template(tokenizer, chat_template = "gemma-3")
from datasets import Dataset
from unsloth.chat_templates import standardize_data_formats
dataset = standardize_data_formats(Dataset.from_dict({"conversations": CONVERSATIONS}))
def formatting_prompts_func(examples):
   convos = examples["conversations"]
   texts = [tokenizer.apply_chat_template(convo, tokenize = False, add_generation_prompt = False).removeprefix('<bos>')
            for convo in convos]
   return { "text" : texts, }
dataset = dataset.map(formatting_prompts_func, batched = True)""",
    """from trl import SFTTrainer, SFTConfig
trainer = SFTTrainer(model = model, tokenizer = tokenizer, train_dataset = dataset, eval_dataset = None,
    args = SFTConfig(dataset_text_field = "text", learning_rate = 1e-2, """ + TRAIN_OPTIONS + """))
from unsloth.chat_templates import train_on_responses_only
trainer = train_on_responses_only(trainer, instruction_part = "<start_of_turn>user\\n",
                                  response_part = "<start_of_turn>model\\n")
trainer_stats = trainer.train()""",
    """messages = [{"role": "user", "content": [{"type" : "text", "text" : "Say hello."}]}]
text = tokenizer.apply_chat_template(messages, add_generation_prompt = True, tokenize = False)
outputs = model.generate(**tokenizer([text], return_tensors = "pt", add_special_tokens = False).to(model.device),
                         max_new_tokens = 8, do_sample = False)""",
]
GEMMA3_CONVERSATIONS = [
    [{"from": "human", "value": [{"type": "text", "text": "Say hello."}]},
     {"from": "gpt", "value": [{"type": "text", "text": "Hello!"}]}],
    [{"from": "system", "value": [{"type": "text", "text": "Be terse."}]},
     {"from": "human", "value": [{"type": "text", "text": "Count to three."}]},
     {"from": "gpt", "value": [{"type": "text", "text": "1 2 3"}]}],
] * 6


def test_gemma3_text_notebook_with_content_parts(tiny_model_dir, tmp_path):
    ns = _port_and_run(tmp_path, GEMMA3_CELLS, {"MODEL_DIR": str(tiny_model_dir("gemma3")),
                                                 "CONVERSATIONS": GEMMA3_CONVERSATIONS})
    tokenizer, trainer = ns["tokenizer"], ns["trainer"]
    assert ns["dataset"][1]["text"] == ("<start_of_turn>user\nBe terse.\n\nCount to three.<end_of_turn>\n"
                                        "<start_of_turn>model\n1 2 3<end_of_turn>\n")
    row = trainer.train_dataset[1]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained == "1 2 3<end_of_turn>\n" or trained == "1 2 3<end_of_turn>", trained
    _assert_learns(trainer)
    assert ns["text"] == "<bos><start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n"
    assert ns["outputs"].shape[1] > len(tokenizer(ns["text"], add_special_tokens=False)["input_ids"])


CPT_CELLS = [
    COMMON + """from unsloth import FastLanguageModel
model, tokenizer = FastLanguageModel.from_pretrained(model_name = MODEL_DIR, max_seq_length = max_seq_length,
                                                     dtype = dtype, load_in_4bit = load_in_4bit)
model = FastLanguageModel.get_peft_model(model, r = 16,
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "embed_tokens", "lm_head"],
    lora_alpha = 32, lora_dropout = 0, bias = "none", use_gradient_checkpointing = "unsloth", random_state = 3407,
    use_rslora = True, loftq_config = None)""",
    """from datasets import Dataset
EOS_TOKEN = tokenizer.eos_token
def formatting_prompts_func(examples):
    return { "text" : [text + EOS_TOKEN for text in examples["text"]], }
dataset = Dataset.from_dict({"text": TEXTS}).map(formatting_prompts_func, batched = True)""",
    """from unsloth import is_bfloat16_supported
from unsloth import UnslothTrainer, UnslothTrainingArguments
trainer = UnslothTrainer(model = model, tokenizer = tokenizer, train_dataset = dataset, dataset_text_field = "text",
    max_seq_length = max_seq_length, dataset_num_proc = 1,
    args = UnslothTrainingArguments(learning_rate = 5e-3, embedding_learning_rate = 5e-4, """ + TRAIN_OPTIONS + """))
from unsloth import unsloth_train
trainer_stats = unsloth_train(trainer)""",
    """FastLanguageModel.for_inference(model)
inputs = tokenizer(["Item 1: the code for"], return_tensors = "pt").to(model.device)
outputs = model.generate(**inputs, max_new_tokens = 8, use_cache = True, do_sample = False)
model.save_pretrained(SAVE_DIR)
tokenizer.save_pretrained(SAVE_DIR)""",
]


def test_continued_pretraining_notebook(tiny_model_dir, tmp_path):
    from fasttune import FastLanguageModel

    save = tmp_path / "lora_model"
    ns = _port_and_run(tmp_path, CPT_CELLS, {"MODEL_DIR": str(tiny_model_dir("llama")), "TEXTS": TEXTS,
                                              "SAVE_DIR": str(save)})
    trainer, model = ns["trainer"], ns["model"]
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {5e-3, 5e-4}
    _assert_learns(trainer)
    assert ns["outputs"].shape[1] > ns["inputs"]["input_ids"].shape[1]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}
    assert len(trained) == 2
    reloaded, _ = FastLanguageModel.from_pretrained(str(save), max_seq_length=128, dtype=torch.float32,
                                                   load_in_4bit=False)
    again = {n: p for n, p in reloaded.named_parameters() if "modules_to_save" in n}
    assert again.keys() == trained.keys()
    for name, value in trained.items():
        torch.testing.assert_close(again[name], value, msg=name)
