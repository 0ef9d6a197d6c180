"""fasttune quickstart: teach a tiny model a fact table with QLoRA, offline, in a minute or two on a CPU.

Run:  python -m fasttune.quickstart            (or: fasttune quickstart)
      python -m fasttune.quickstart --steps 40 --output-dir /tmp/qs

The Unsloth notebook flow, end to end: build a tiny Llama-architecture model (random weights, a tokenizer trained
offline) -> load it in 4-bit -> add LoRA -> chat template + standardised data -> TRL SFTTrainer with loss on the
answers only -> generate before/after -> save the adapter. The model starts knowing nothing; after training it
answers "What is the capital of <planet>?" from the bundled table (fasttune/quickstart/facts.jsonl).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Offline by design: nothing below may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from datasets.utils.logging import disable_progress_bar  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from fasttune import FastLanguageModel, device_args  # noqa: E402
from fasttune.chat_templates import (  # noqa: E402
    encode_chat,
    get_chat_template,
    standardize_data_formats,
    train_on_responses_only,
)
from fasttune.quickstart import build_base, load_facts  # noqa: E402

# ---- 1. a tiny model of a real architecture, built offline: build_base (fasttune/quickstart/__init__.py) --------


# ---- 2. answers and loss, before and after -----------------------------------------------------------------------
def answer(model, tokenizer, question: str) -> str:
    # encode_chat: text such as "<|eot_id|>" in a question stays text (no forged turns)
    ids = encode_chat(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate(model, tokenizer, trainer: SFTTrainer, facts: list[dict[str, str]]) -> dict:
    FastLanguageModel.for_inference(model)
    answers = [answer(model, tokenizer, row["instruction"]) for row in facts]
    loss = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    FastLanguageModel.for_training(model)
    correct = sum(a == row["output"] for a, row in zip(answers, facts))
    return {"loss": loss, "correct": correct, "answers": answers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttune quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--output-dir", default="outputs/quickstart", help="where the base model and adapter go")
    parser.add_argument("--eval-questions", type=int, default=None,
                        help="ask only the first N questions before/after (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error(f"--steps: {args.steps} must be a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    disable_progress_bar()
    out = Path(args.output_dir)
    start = time.perf_counter()
    facts = load_facts()
    asked = facts[: args.eval_questions] if args.eval_questions else facts

    print(f"[1/5] building a tiny Llama-architecture model offline in {out / 'base_model'}")
    base = build_base(out / "base_model", facts)

    print("[2/5] loading it in 4-bit (NF4) and adding LoRA adapters")
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), max_seq_length=128, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=3407)
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3")

    # ---- 3. data: Alpaca rows -> conversations; SFTTrainer renders them with the chat template -----------
    dataset = standardize_data_formats(Dataset.from_list(facts), output_column="messages")
    config = SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=5,
        logging_steps=10,
        max_length=128,
        save_strategy="no",
        report_to="none",
        seed=3407,
        **device_args(),  # bf16/fp16 and use_cpu set right for this machine
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=config)
    trainer = train_on_responses_only(trainer)  # loss on the assistant's answers only

    print("[3/5] answers before training")
    before = evaluate(model, tokenizer, trainer, asked)
    print(f"[4/5] training {args.steps} steps (QLoRA, loss on answers only)")
    trainer.train()
    after = evaluate(model, tokenizer, trainer, asked)

    print(f"[5/5] saving the LoRA adapter to {out / 'adapter'}")
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")

    question = facts[0]["instruction"]
    rows = [("", "loss", f"exact answers (of {len(asked)})", f"answer to {question!r}"),
            ("before", f"{before['loss']:.3f}", str(before["correct"]), repr(before["answers"][0])),
            ("after", f"{after['loss']:.3f}", str(after["correct"]), repr(after["answers"][0]))]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    print(f"\nexpected answer: {facts[0]['output']!r}")
    print(f"outputs: base model {out / 'base_model'}, adapter {out / 'adapter'}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
