"""Unsloth's Qwen2-VL vision notebook (LaTeX OCR), ported by `fasttune port` and run as written on a tiny model.

Only the model path, the in-memory dataset (drawn images of short formulas instead of unsloth/LaTeX_OCR), step
counts, the device ("cpu" for "cuda") and the fp32/optimizer switches differ from the published notebook.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from datasets import Dataset
from PIL import Image, ImageDraw

from fasttune import FastVisionModel
from fasttune.port import port_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
from tests.trl.test_notebook import _notebook, _run  # noqa: E402

CELLS = [
    "%%capture\n!pip install unsloth",
    """from unsloth import FastVisionModel # FastLanguageModel for LLMs
import torch
model, tokenizer = FastVisionModel.from_pretrained(
    MODEL_DIR,
    load_in_4bit = True, # Use 4bit to reduce memory use. False for 16bit LoRA.
    use_gradient_checkpointing = "unsloth", # True or "unsloth" for long context
)""",
    """model = FastVisionModel.get_peft_model(
    model,
    finetune_vision_layers     = True, # False if not finetuning vision layers
    finetune_language_layers   = True, # False if not finetuning language layers
    finetune_attention_modules = True, # False if not finetuning attention layers
    finetune_mlp_modules       = True, # False if not finetuning MLP layers
    r = 16,           # The larger, the more accurate, but might overfit
    lora_alpha = 16,  # Recommended alpha == r at least
    lora_dropout = 0,
    bias = "none",
    random_state = 3407,
    use_rslora = False,  # We support rank stabilized LoRA
    loftq_config = None, # And LoftQ
    # target_modules = "all-linear", # Optional now! Can specify a list if needed
)""",
    """dataset = DATASET
instruction = "Write the LaTeX representation for this image."

def convert_to_conversation(sample):
    conversation = [
        { "role": "user",
          "content" : [
            {"type" : "text",  "text"  : instruction},
            {"type" : "image", "image" : sample["image"]} ]
        },
        { "role" : "assistant",
          "content" : [
            {"type" : "text",  "text"  : sample["text"]} ]
        },
    ]
    return { "messages" : conversation }
pass
converted_dataset = [convert_to_conversation(sample) for sample in dataset]""",
    """FastVisionModel.for_inference(model) # Enable for inference!

image = dataset[2]["image"]
instruction = "Write the LaTeX representation for this image."

messages = [
    {"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": instruction}
    ]}
]
input_text = tokenizer.apply_chat_template(messages, add_generation_prompt = True)
inputs = tokenizer(
    image,
    input_text,
    add_special_tokens = False,
    return_tensors = "pt",
).to("cpu")

from transformers import TextStreamer
text_streamer = TextStreamer(tokenizer, skip_prompt = True)
_ = model.generate(**inputs, streamer = text_streamer, max_new_tokens = 8,
                   use_cache = True, temperature = 1.5, min_p = 0.1)""",
    """from unsloth import is_bf16_supported
from unsloth.trainer import UnslothVisionDataCollator
from trl import SFTTrainer, SFTConfig

FastVisionModel.for_training(model) # Enable for training!

trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    data_collator = UnslothVisionDataCollator(model, tokenizer), # Must use!
    train_dataset = converted_dataset,
    args = SFTConfig(
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 2,
        warmup_steps = 0,
        max_steps = MAX_STEPS,
        # num_train_epochs = 1, # Set this instead of max_steps for full training runs
        learning_rate = 2e-3,
        fp16 = False, bf16 = False, use_cpu = True,
        logging_steps = 1,
        optim = "adamw_torch",
        weight_decay = 0.01,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = OUTPUT_DIR,
        report_to = "none",     # For Weights and Biases

        # You MUST put the below items for vision finetuning:
        remove_unused_columns = False,
        dataset_text_field = "",
        dataset_kwargs = {"skip_prepare_dataset": True},
        dataset_num_proc = 1,
        max_seq_length = 2048,
        disable_tqdm = True,
    ),
)""",
    "trainer_stats = trainer.train()",
    """model.save_pretrained(SAVE_DIR) # Local saving
tokenizer.save_pretrained(SAVE_DIR)""",
]

FORMULAS = ["x^2", "a+b", "\\\\frac{1}{2}", "y=mx", "e^x", "\\\\sqrt{2}", "a_1", "n!"]


def _formula_image(text: str) -> Image.Image:
    image = Image.new("RGB", (96, 48), (255, 255, 255))
    ImageDraw.Draw(image).text((8, 16), text, fill=(0, 0, 0))
    return image


def test_ported_vision_notebook_runs_as_written(tiny_vlm_dir, tmp_path):
    path = tmp_path / "Qwen2_VL_(7B)-Vision.ipynb"
    path.write_text(json.dumps(_notebook(CELLS)), encoding="utf-8")
    output, changes, _ = port_file(path)
    cells = ["".join(c["source"]) for c in json.loads(output.read_text(encoding="utf-8"))["cells"]]
    code = "\n".join(cells)
    assert len(changes) == 4 and not re.search(r"^\s*(from|import)\s+(unsloth|trl)\b", code, re.M), code
    dataset = Dataset.from_dict({"image": [_formula_image(f) for f in FORMULAS], "text": FORMULAS})
    ns = _run(cells, {"MODEL_DIR": str(tiny_vlm_dir("qwen2_vl")), "DATASET": dataset, "MAX_STEPS": 6,
                      "OUTPUT_DIR": str(tmp_path / "outputs"), "SAVE_DIR": str(tmp_path / "lora_model")})
    trainer = ns["trainer"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert trainer.fasttune_fast_loss and ns["model"].is_loaded_in_4bit
    reloaded, processor = FastVisionModel.from_pretrained(str(tmp_path / "lora_model"), load_in_4bit=True)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    trained = {n: p for n, p in ns["model"].named_parameters() if "lora_B" in n}
    again = dict(reloaded.named_parameters())
    assert trained and all(torch.equal(p.detach(), again[n].detach()) for n, p in trained.items())
    assert any(p.abs().sum() > 0 for p in trained.values())
