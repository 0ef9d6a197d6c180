"""Helpers of the fasttune.trl tests: tiny fasttune models, small text datasets, CPU fp32 trainer options."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from fasttune import FastLanguageModel

WORDS = ["alpha", "delta", "omega", "sigma", "kappa", "theta"]
TEXTS = [f"Item {i}: the code for {w} is {w[::-1]}." + " again" * (i % 4) for i, w in enumerate(WORDS * 3)]


def text_dataset(texts: list[str] = TEXTS) -> Dataset:
    return Dataset.from_dict({"text": texts})


def fast_model(model_dir: Any, max_seq_length: int = 64, checkpointing: bool | str = False, fast_path: bool = True,
               load_in_4bit: bool = False):
    """``FastLanguageModel`` flow in fp32: from_pretrained -> get_peft_model (seeded adapters)."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=max_seq_length,
                                                         load_in_4bit=load_in_4bit, dtype="float32",
                                                         fast_path=fast_path)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=checkpointing,
                                             random_state=7)
    return model, tokenizer


def cpu_args(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Trainer options that keep a run small, fp32, on CPU and quiet."""
    args = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                lr_scheduler_type="constant", use_cpu=True, bf16=False, logging_steps=1, report_to=[],
                save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    args.update(overrides)
    return args


def logged(trainer: Any, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]
