"""fasttune GRPO quickstart: reinforcement learning with verifiable rewards on a tiny model, offline, on a CPU.

Run:  python -m fasttune.quickstart.grpo                 (about 30 s on 2 CPU cores)
      python -m fasttune.quickstart.grpo --grpo-steps 80 --output-dir /tmp/grpo

The Unsloth GRPO notebook flow on the quickstart's tiny Llama: load in 4-bit -> LoRA -> a short SFT that teaches
only the answer *format* ("<answer>7</answer>", with random digits, so no sum is taught) -> GRPO on generated sums
("What is 1 + 2?", both numbers below 3) with a format reward and a correctness reward -> the mean reward and the share of right greedy
answers, before and after -> ``model.save_lora``. Whatever the model gets right after GRPO it learned from rewards.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from datasets.utils.logging import disable_progress_bar  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from fasttune import FastLanguageModel, PatchFastRL, SamplingParams, device_args  # noqa: E402
from fasttune.chat_templates import get_chat_template, train_on_responses_only  # noqa: E402
from fasttune.quickstart import FAMILY  # noqa: E402
from fasttune.rl import generate  # noqa: E402
from fasttune.tiny import build_tiny_model, build_tokenizer  # noqa: E402
from fasttune.trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

ANSWER = re.compile(r"^\s*<answer>(\d+)</answer>\s*$")


def sums(limit: int = 3) -> list[dict[str, str]]:
    """Every "What is a + b?" with a, b < limit, and its answer (generated, nothing downloaded)."""
    return [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(limit) for b in range(limit)]


def prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


# ---- rewards (TRL's reward-function signature: one float per completion) -------------------------------------
def format_reward(completions, **kwargs) -> list[float]:
    """0.2 for exactly ``<answer>digits</answer>``."""
    return [0.2 if ANSWER.match(c[0]["content"]) else 0.0 for c in completions]


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the number inside the tags is the sum."""
    found = [ANSWER.match(c[0]["content"]) for c in completions]
    return [1.0 if m and m.group(1) == a else 0.0 for m, a in zip(found, answer)]


def build_base(folder: Path, rows: list[dict[str, str]]) -> Path:
    corpus = [f"{r['question']} <answer>{r['answer']}</answer>" for r in rows] * 4
    tokenizer = build_tokenizer(FAMILY, extra_texts=corpus, vocab_size=512)
    # initializer_range 0.1 (transformers' default is 0.02): with a frozen random LM head of std 0.02 and a
    # normalised hidden state, no token can get more than ~0.25 probability, so sampling at temperature 1 would stay
    # near-uniform however well the LoRA layers learn; a real model's head has no such limit
    return build_tiny_model(FAMILY, folder, tokenizer=tokenizer, seed=0, initializer_range=0.1)


def greedy_accuracy(model, tokenizer, rows: list[dict[str, str]]) -> tuple[float, float]:
    """(share of well-formatted, share of right) greedy answers of the model as it is now (live adapter; the
    notebook-style ``model.fast_generate`` would need ``lora_request=model.load_lora(...)`` for that)."""
    texts = [tokenizer.apply_chat_template(prompt(r["question"]), tokenize=False, add_generation_prompt=True)
             for r in rows]
    outs = generate(model, tokenizer, texts, SamplingParams(temperature=0.0, max_tokens=12))
    found = [ANSWER.match(o.outputs[0].text) for o in outs]
    formatted = sum(m is not None for m in found) / len(rows)
    right = sum(bool(m) and m.group(1) == r["answer"] for m, r in zip(found, rows)) / len(rows)
    return formatted, right


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasttune.quickstart.grpo", description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=60, help="format warm-up steps (default 60)")
    parser.add_argument("--grpo-steps", type=int, default=60, help="GRPO steps (default 60)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="GRPO learning rate (default 1e-3)")
    parser.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (default 1.0)")
    parser.add_argument("--output-dir", default="outputs/grpo_quickstart", help="base model, adapter, logs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    for name in ("sft_steps", "grpo_steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: {getattr(args, name)} must be a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    disable_progress_bar()
    out = Path(args.output_dir)
    start = time.perf_counter()
    rows = sums()

    print(f"[1/6] building a tiny Llama-architecture model offline in {out / 'base_model'}")
    base = build_base(out / "base_model", rows)
    PatchFastRL("GRPO", FastLanguageModel)
    print("[2/6] loading it in 4-bit with LoRA (fast_inference: rollouts from fasttune's engine)")
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), max_seq_length=96, load_in_4bit=True,
                                                         fast_inference=True, max_lora_rank=16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=3407)
    # ChatML: its generation prompt ends in one newline; llama-3's ends in "\n\n", which this tiny byte-level BPE
    # splits differently at the end of a prompt than before an answer (the prompt then ends in a token SFT never saw)
    tokenizer = get_chat_template(tokenizer, chat_template="chatml")

    print(f"[3/6] {args.sft_steps} SFT steps on the answer format only (random digits: no sum is taught)")
    rng = random.Random(0)  # several random digits per question: the model learns the format, and no digit
    format_rows = [{"messages": prompt(r["question"]) + [{"role": "assistant",
                                                           "content": f"<answer>{rng.randint(0, 9)}</answer>"}]}
                   for r in rows for _ in range(8)]
    sft = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(format_rows),
                     args=SFTConfig(output_dir=str(out / "sft"), max_steps=args.sft_steps,
                                    per_device_train_batch_size=8, learning_rate=5e-3, logging_steps=10,
                                    save_strategy="no", report_to="none", seed=3407, **device_args()))
    sft = train_on_responses_only(sft)  # the answer's tokens only
    sft.train()
    before = greedy_accuracy(model, tokenizer, rows)

    print(f"[4/6] {args.grpo_steps} GRPO steps: 4 prompts x 8 completions per step, format + correctness rewards")
    dataset = Dataset.from_list([{"prompt": prompt(r["question"]), "answer": r["answer"]} for r in rows])
    config = GRPOConfig(output_dir=str(out / "grpo"), max_steps=args.grpo_steps, per_device_train_batch_size=32,
                        num_generations=8, max_completion_length=12, learning_rate=args.learning_rate,
                        temperature=args.temperature, beta=0.0, loss_type="grpo", logging_steps=1, save_strategy="no",
                        report_to="none", seed=3407, disable_tqdm=True, **device_args())
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[format_reward, correctness_reward],
                          args=config, train_dataset=dataset)
    trainer.train()
    after = greedy_accuracy(model, tokenizer, rows)

    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    tenth = max(1, len(rewards) // 5)
    first, last = sum(rewards[:tenth]) / tenth, sum(rewards[-tenth:]) / tenth
    print(f"[5/6] saving the LoRA adapter to {out / 'grpo_lora'}")
    model.save_lora(out / "grpo_lora", overwrite=True)
    print("[6/6] results")
    print(f"  mean reward per step (max 1.2): first {tenth} steps {first:.3f} -> last {tenth} steps {last:.3f}")
    print(f"  greedy answers of all {len(rows)} sums: well-formatted {before[0]:.0%} -> {after[0]:.0%}, "
          f"right {before[1]:.0%} -> {after[1]:.0%}")
    print(f"  took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
