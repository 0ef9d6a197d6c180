"""fasttune quickstart: teach a real model (SmolLM2-135M-Instruct) a fact table with QLoRA, offline, on a CPU.

Run:  python -m fasttune.quickstart            (or: fasttune quickstart)
      python -m fasttune.quickstart --tiny     (a tiny random model instead: a smoke run in half a minute)
      python -m fasttune.quickstart --steps 40 --output-dir /tmp/qs

The Unsloth notebook flow, end to end. By default on SmolLM2-135M-Instruct from the package index (see real.py):
4-bit + LoRA -> TRL SFTTrainer, loss on the answers only -> answers before and after, to the made-up facts of
fasttune/quickstart/facts.jsonl ("What is the capital of <planet>?") and to ordinary questions -> GGUF + Ollama
Modelfile -> the same questions through llama.cpp. With --tiny: a tiny Llama-architecture model built offline (random
weights, a tokenizer trained on the facts) -> 4-bit -> LoRA -> llama-3 template -> the same trainer -> answers
before/after -> the adapter.
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

from fasttune import FastLanguageModel, device_args  # noqa: E402
from fasttune.chat_templates import (  # noqa: E402
    encode_chat,
    get_chat_template,
    standardize_data_formats,
    train_on_responses_only,
)
from fasttune.quickstart import build_base, load_facts, real  # noqa: E402
from fasttune.quickstart.real import REAL_LEARNING_RATE, REAL_STEPS  # noqa: E402
from fasttune.trl import SFTConfig, SFTTrainer  # noqa: E402

GGUF_TYPES = ("f16", "q8_0", "q4_k_m")

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


# (steps, learning rate) by model: the tiny random model needs many steps at a high rate, SmolLM2 far fewer
DEFAULTS = {"tiny": (150, 3e-3), "real": (REAL_STEPS, REAL_LEARNING_RATE)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttune quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model built offline instead of SmolLM2-135M-Instruct (a smoke run)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default {DEFAULTS['real'][0]}; {DEFAULTS['tiny'][0]} with --tiny)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"peak learning rate (default {DEFAULTS['real'][1]:g}; {DEFAULTS['tiny'][1]:g} with "
                             "--tiny)")
    parser.add_argument("--output-dir", default="outputs/quickstart", help="where the adapter and exports go")
    parser.add_argument("--eval-questions", type=int, default=None,
                        help="ask only the first N fact questions before/after (default: all)")
    parser.add_argument("--gguf", default="q8_0", choices=GGUF_TYPES,
                        help="GGUF type of the export (real model only; default q8_0)")
    parser.add_argument("--no-replay", dest="replay", action="store_false",
                        help="train the facts alone (real model only; by default the base model's own answers to "
                             "other ordinary questions are trained beside them, so it keeps what it knew)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    steps, rate = DEFAULTS["tiny" if args.tiny else "real"]
    args.steps = steps if args.steps is None else args.steps
    args.learning_rate = rate if args.learning_rate is None else args.learning_rate
    if args.steps <= 0:
        parser.error(f"--steps: {args.steps} must be a positive integer")
    if args.eval_questions is not None and args.eval_questions <= 0:
        parser.error(f"--eval-questions: {args.eval_questions} must be a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    disable_progress_bar()
    facts = load_facts()
    if not args.tiny:
        real.run(args, facts)
        return 0
    return run_tiny(args, facts)


def run_tiny(args: argparse.Namespace, facts: list[dict[str, str]]) -> int:
    out = Path(args.output_dir)
    start = time.perf_counter()
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
