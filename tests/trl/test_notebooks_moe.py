"""Unsloth's two mixture-of-experts notebooks, ported by `fasttune port` and run as written on tiny models of their
architectures: gpt-oss (20B) fine-tuning (harmony chat template, ``reasoning_effort``, analysis/final channels,
``train_on_responses_only`` on the final channel) and Qwen3 (30B-A3B) (reasoning and chat data mixed with pandas,
``enable_thinking`` on and off). Both load in 4-bit (NF4-packed experts) and put LoRA on every expert through the
notebooks' own ``target_modules``. Only model paths, in-memory datasets, step counts and CPU switches (fp32,
``adamw_torch``, no ``.to("cuda")``) differ from the published notebooks. The tiny tokenizers get the chat template
the released tokenizers ship (fasttune's copy of it) before the notebook starts, as ``from_pretrained`` would find it.
"""

from __future__ import annotations

import shutil

import torch
from test_notebooks_unsloth import _assert_learns, _port_and_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune.chat_templates import get_chat_template
from fasttune.quant.experts import PackedExperts

MOE_TARGETS = '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'
TRAIN = """per_device_train_batch_size = 2, gradient_accumulation_steps = 2, warmup_steps = 1, max_steps = 8,
        learning_rate = 1e-2, logging_steps = 1, optim = "adamw_torch", weight_decay = 0.01,
        lr_scheduler_type = "linear", seed = 3407, output_dir = OUTPUT_DIR, report_to = "none",
        use_cpu = True, bf16 = False, fp16 = False, save_strategy = "no", disable_tqdm = True,"""


def _with_template(model_dir, tmp_path, template: str):
    """A copy of the tiny model whose tokenizer carries ``template`` (as the released tokenizer does)."""
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    tokenizer = get_chat_template(AutoTokenizer.from_pretrained(out), chat_template=template)
    tokenizer.save_pretrained(out)
    return out


GPT_OSS_CELLS = [
    "%%capture\n!pip install unsloth",
    """from unsloth import FastLanguageModel
import torch
max_seq_length = 1024
dtype = torch.float32
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = MODEL_DIR,
    dtype = dtype, # None for auto detection
    max_seq_length = max_seq_length, # Choose any for long context!
    load_in_4bit = True,  # 4 bit quantization to reduce memory
    full_finetuning = False, # [NEW!] We have full finetuning now!
)""",
    """model = FastLanguageModel.get_peft_model(
    model,
    r = 8, # Choose any number > 0 ! Suggested 8, 16, 32, 64, 128
    target_modules = """ + MOE_TARGETS + """,
    lora_alpha = 16,
    lora_dropout = 0, # Supports any, but = 0 is optimized
    bias = "none",    # Supports any, but = "none" is optimized
    use_gradient_checkpointing = "unsloth", # True or "unsloth" for very long context
    random_state = 3407,
    use_rslora = False,  # We support rank stabilized LoRA
    loftq_config = None, # And LoftQ
)""",
    """from transformers import TextStreamer

messages = [
    {"role": "user", "content": "Solve x^5 + 3x^4 - 10 = 3."},
]
inputs = tokenizer.apply_chat_template(
    messages,
    add_generation_prompt = True,
    return_tensors = "pt",
    return_dict = True,
    reasoning_effort = "low", # **NEW!** Set reasoning effort to low, medium or high
).to(model.device)

_ = model.generate(**inputs, max_new_tokens = 8, streamer = TextStreamer(tokenizer))
before = inputs""",
    """from datasets import Dataset
dataset = Dataset.from_dict({"messages": MESSAGES})
def formatting_prompts_func(examples):
    convos = examples["messages"]
    texts = [tokenizer.apply_chat_template(convo, tokenize = False, add_generation_prompt = False) for convo in convos]
    return { "text" : texts, }

from unsloth.chat_templates import standardize_sharegpt
dataset = standardize_sharegpt(dataset)
dataset = dataset.map(formatting_prompts_func, batched = True,)""",
    """from trl import SFTConfig, SFTTrainer
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    args = SFTConfig(
        """ + TRAIN + """
    ),
)
from unsloth.chat_templates import train_on_responses_only

gpt_oss_kwargs = dict(instruction_part = "<|start|>user<|message|>", response_part="<|start|>assistant<|channel|>final<|message|>")

trainer = train_on_responses_only(
    trainer,
    **gpt_oss_kwargs,
)
trainer_stats = trainer.train()""",
    """messages = [
    {"role": "system", "content": "reasoning language: French\\n\\nYou are a helpful assistant that can solve mathematical problems."},
    {"role": "user", "content": "Solve x^5 + 3x^4 - 10 = 3."},
]
inputs = tokenizer.apply_chat_template(
    messages,
    add_generation_prompt = True,
    return_tensors = "pt",
    return_dict = True,
    reasoning_effort = "medium",
).to(model.device)
from transformers import TextStreamer
_ = model.generate(**inputs, max_new_tokens = 8, streamer = TextStreamer(tokenizer))""",
    """model.save_pretrained("finetuned_model".replace("finetuned_model", SAVE_DIR + "/lora"))
model.save_pretrained_merged(SAVE_DIR + "/merged", tokenizer, save_method = "merged_16bit")""",
]
GPT_OSS_MESSAGES = [
    [{"role": "system", "content": "reasoning language: French\n\nYou are a helpful assistant.", "thinking": None},
     {"role": "user", "content": "What is two plus two?", "thinking": None},
     {"role": "assistant", "content": "Four.", "thinking": "Deux plus deux font quatre."}],
    [{"role": "system", "content": "reasoning language: German\n\nYou are a helpful assistant.", "thinking": None},
     {"role": "user", "content": "Name a colour.", "thinking": None},
     {"role": "assistant", "content": "Blue.", "thinking": "Eine Farbe: blau."}],
] * 4


def test_gpt_oss_notebook(tiny_model_dir, tmp_path):
    model_dir = _with_template(tiny_model_dir("gpt_oss"), tmp_path, "gpt-oss")
    ns = _port_and_run(tmp_path, GPT_OSS_CELLS, {"MODEL_DIR": str(model_dir), "MESSAGES": GPT_OSS_MESSAGES,
                                                  "SAVE_DIR": str(tmp_path / "saved")})
    tokenizer, trainer, model = ns["tokenizer"], ns["trainer"], ns["model"]
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts.base_layer.base_layer.gate_up_proj, PackedExperts)  # 4-bit experts, LoRA on both
    prompt = tokenizer.decode(ns["before"]["input_ids"][0])
    assert "Reasoning: low" in prompt and prompt.endswith("<|start|>assistant")
    assert "Reasoning: medium" in tokenizer.decode(ns["inputs"]["input_ids"][0])
    text = ns["dataset"][0]["text"]
    assert "<|channel|>analysis<|message|>Deux plus deux font quatre.<|end|>" in text
    assert text.endswith("<|start|>assistant<|channel|>final<|message|>Four.<|return|>")
    row = trainer.train_dataset[0]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained == "Four.<|return|>", trained  # the final channel only: not the analysis, not the prompt
    _assert_learns(trainer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "saved" / "merged", dtype=torch.float32)
    ids = ns["inputs"]["input_ids"]
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


QWEN3_CELLS = [
    """from unsloth import FastLanguageModel
import torch
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = MODEL_DIR,
    max_seq_length = 256,   # Context length - can be longer, but uses more memory
    load_in_4bit = True,     # 4bit uses much less memory
    load_in_8bit = False,    # A bit more accurate, uses 2x memory
    full_finetuning = False, # We have full finetuning now!
    dtype = torch.float32,
)""",
    """model = FastLanguageModel.get_peft_model(
    model,
    r = 32,           # Choose any number > 0! Suggested 8, 16, 32, 64, 128
    target_modules = """ + MOE_TARGETS + """,
    lora_alpha = 32,  # Best to choose alpha = rank or rank*2
    lora_dropout = 0, # Supports any, but = 0 is optimized
    bias = "none",    # Supports any, but = "none" is optimized
    use_gradient_checkpointing = "unsloth", # True or "unsloth" for very long context
    random_state = 3407,
    use_rslora = False,   # We support rank stabilized LoRA
    loftq_config = None,  # And LoftQ
)""",
    """from datasets import Dataset
reasoning_dataset = Dataset.from_dict(REASONING)
non_reasoning_dataset = Dataset.from_dict({"conversations": CHATS})
def generate_conversation(examples):
    problems  = examples["problem"]
    solutions = examples["generated_solution"]
    conversations = []
    for problem, solution in zip(problems, solutions):
        conversations.append([
            {"role" : "user",      "content" : problem},
            {"role" : "assistant", "content" : solution},
        ])
    return { "conversations": conversations, }
reasoning_conversations = tokenizer.apply_chat_template(
    reasoning_dataset.map(generate_conversation, batched = True)["conversations"],
    tokenize = False,
)
from unsloth.chat_templates import standardize_sharegpt
dataset = standardize_sharegpt(non_reasoning_dataset)

non_reasoning_conversations = tokenizer.apply_chat_template(
    dataset["conversations"],
    tokenize = False,
)
chat_percentage = 0.25
import pandas as pd
non_reasoning_subset = pd.Series(non_reasoning_conversations)
non_reasoning_subset = non_reasoning_subset.sample(
    int(len(reasoning_conversations)*(chat_percentage/(1 - chat_percentage))),
    random_state = 2407,
)
data = pd.concat([
    pd.Series(reasoning_conversations),
    pd.Series(non_reasoning_subset)
])
data.name = "text"

from datasets import Dataset
combined_dataset = Dataset.from_pandas(pd.DataFrame(data))
combined_dataset = combined_dataset.shuffle(seed = 3407)""",
    """from trl import SFTTrainer, SFTConfig
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = combined_dataset,
    eval_dataset = None, # Can set up evaluation!
    args = SFTConfig(
        dataset_text_field = "text",
        """ + TRAIN + """
    ),
)
trainer_stats = trainer.train()""",
    """messages = [
    {"role" : "user", "content" : "Solve (x + 2)^2 = 0."}
]
text = tokenizer.apply_chat_template(
    messages,
    tokenize = False,
    add_generation_prompt = True, # Must add for generation
    enable_thinking = False, # Disable thinking
)

from transformers import TextStreamer
_ = model.generate(
    **tokenizer(text, return_tensors = "pt"),
    max_new_tokens = 8, # Increase for longer outputs!
    temperature = 0.7, top_p = 0.8, top_k = 20, # For non thinking
    streamer = TextStreamer(tokenizer, skip_prompt = True),
)
no_thinking = text""",
    """text = tokenizer.apply_chat_template(
    messages,
    tokenize = False,
    add_generation_prompt = True, # Must add for generation
    enable_thinking = True, # Disable thinking
)

from transformers import TextStreamer
_ = model.generate(
    **tokenizer(text, return_tensors = "pt"),
    max_new_tokens = 8, # Increase for longer outputs!
    temperature = 0.6, top_p = 0.95, top_k = 20, # For thinking
    streamer = TextStreamer(tokenizer, skip_prompt = True),
)
model.save_pretrained(SAVE_DIR)  # Local saving
tokenizer.save_pretrained(SAVE_DIR)""",
]
QWEN3_REASONING = {
    "problem": ["What is 2 + 3?", "What is 4 * 5?", "What is 9 - 7?", "What is 8 / 2?", "What is 3 + 3?",
                "What is 6 * 2?"],
    "generated_solution": ["<think>\nAdd them.\n</think>\n\n5", "<think>\nMultiply.\n</think>\n\n20",
                           "<think>\nSubtract.\n</think>\n\n2", "<think>\nDivide.\n</think>\n\n4",
                           "<think>\nAdd them.\n</think>\n\n6", "<think>\nMultiply.\n</think>\n\n12"],
}
QWEN3_CHATS = [[{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}],
               [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."}]] * 2


def test_qwen3_moe_notebook(tiny_model_dir, tmp_path):
    model_dir = _with_template(tiny_model_dir("qwen3_moe"), tmp_path, "qwen-3")
    ns = _port_and_run(tmp_path, QWEN3_CELLS, {"MODEL_DIR": str(model_dir), "REASONING": QWEN3_REASONING,
                                                "CHATS": QWEN3_CHATS, "SAVE_DIR": str(tmp_path / "lora_model")})
    trainer, model = ns["trainer"], ns["model"]
    assert len(ns["combined_dataset"]) == 6 + 2  # 25% chat rows, as the notebook computes
    assert any("<think>\nAdd them.\n</think>" in t for t in ns["combined_dataset"]["text"])
    assert ns["no_thinking"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ns["text"].endswith("<|im_start|>assistant\n")
    assert sorted(model.peft_config["default"].target_parameters) == ["mlp.experts.down_proj",
                                                                     "mlp.experts.gate_up_proj"]
    _assert_learns(trainer)
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").stat().st_size > 0
