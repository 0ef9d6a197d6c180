"""fasttune vision quickstart: teach a tiny vision-language model to name coloured shapes, offline, on a CPU.

Run:  python -m fasttune.quickstart.vision                (about a minute on 2 CPU cores)
      python -m fasttune.quickstart.vision --16bit --steps 60 --output-dir /tmp/qsv

The Unsloth vision-notebook flow, end to end: draw images with PIL (a circle, square or triangle in red, green, blue
or yellow, of random size and place, on white) -> conversations that ask "What colour is the shape?" or "What shape
is this?" -> build a tiny Qwen2-VL (random weights, a tokenizer trained offline on the answer words) -> load it in
4-bit with ``FastVisionModel`` -> LoRA on the vision and language towers, attention and MLP -> TRL ``SFTTrainer``
with ``UnslothVisionDataCollator`` (loss on the answers only) -> exact-match accuracy on held-out images (drawn from
another seed) before and after -> save the adapter. The model starts seeing nothing; what it answers right after
training it learned from the pictures (chance: 1 in 4 for colour, 1 in 3 for shape).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

# Offline by design: nothing below may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets.utils.logging import disable_progress_bar  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from fasttune import FastVisionModel, device_args  # noqa: E402
from fasttune.tiny.vision import build_tiny_vlm  # noqa: E402
from fasttune.trl import SFTConfig, SFTTrainer  # noqa: E402
from fasttune.vision import UnslothVisionDataCollator  # noqa: E402

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220),
                                            "yellow": (235, 200, 20)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTIONS: dict[str, str] = {"colour": "What colour is the shape?", "shape": "What shape is this?"}
IMAGE_SIZE = 112  # pixels a side: 8x8 patches of 14 -> 16 image tokens after Qwen2-VL's 2x2 merge


# ---- 1. data: drawn pictures and questions about them (nothing downloaded) --------------------------------------
def draw(shape: str, colour: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A ``shape`` filled with ``colour`` on white, its size (60-95% of the side) and place random."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    side = rng.randint(int(0.6 * size), int(0.95 * size))
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x, y, x + side - 1, y + side - 1)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=COLOURS[colour])
    return image


def conversation(image: Image.Image, question: str, answer: str | None = None) -> list[dict]:
    """Unsloth's vision-notebook layout: the image and the question in the user turn, the answer as the reply."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def make_rows(n_images: int, seed: int, tasks: tuple[str, ...], size: int = IMAGE_SIZE) -> list[dict]:
    """``n_images`` pictures drawn from ``seed``, each asked every question in ``tasks``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_images):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        image = draw(shape, colour, rng, size)
        for task in tasks:
            answer = colour if task == "colour" else shape
            rows.append({"task": task, "image": image, "answer": answer,
                         "messages": conversation(image, QUESTIONS[task], answer)})
    return rows


# ---- 2. exact-match accuracy on held-out pictures -------------------------------------------------------------
def ask(model, processor, rows: list[dict], batch_size: int = 16) -> list[str]:
    """Greedy answers to the rows' questions (batched, left-padded by ``for_inference``); new tokens only."""
    tokenizer = processor.tokenizer
    answers = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [processor.apply_chat_template(conversation(r["image"], QUESTIONS[r["task"]]), tokenize=False,
                                                 add_generation_prompt=True) for r in chunk]
        batch = processor(text=prompts, images=[[r["image"]] for r in chunk], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False,  # stops at <|im_end|> (its eos)
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return answers


def accuracy(model, processor, rows: list[dict]) -> dict[str, Any]:
    """Share of exact answers per task and overall, and the first few answers."""
    FastVisionModel.for_inference(model)
    answers = ask(model, processor, rows)
    FastVisionModel.for_training(model)
    right = [a == r["answer"] for a, r in zip(answers, rows)]
    scores = {task: sum(ok for ok, r in zip(right, rows) if r["task"] == task)
              / max(1, sum(r["task"] == task for r in rows)) for task in dict.fromkeys(r["task"] for r in rows)}
    scores["all"] = sum(right) / len(rows)
    scores["examples"] = answers[:4]
    return scores


# ---- 3. the notebook flow: build, load in 4-bit, LoRA, train, evaluate, save ------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole example; returns accuracies before/after, the logged training losses and timings."""
    out = Path(args.output_dir)
    start = time.perf_counter()
    tasks = ("colour", "shape") if args.task == "both" else (args.task,)
    train_rows = make_rows(args.train_images, seed=0, tasks=tasks, size=args.image_size)
    held_out = make_rows(args.eval_images, seed=1, tasks=tasks, size=args.image_size)  # other seed, other pictures

    print(f"[1/5] building a tiny Qwen2-VL offline in {out / 'base_model'}")
    words = list(QUESTIONS.values()) + list(COLOURS) + list(SHAPES)  # so each answer is one token
    # initializer_range 0.1 for the text tower (transformers' default is 0.02): the output head is tied to the random
    # embeddings, and with std 0.02 no logit can move far from the others, so no answer token could stand out
    base = build_tiny_vlm("qwen2_vl", out / "base_model", seed=0, extra_texts=words * 8, initializer_range=0.1)

    print(f"[2/5] loading it in {'16-bit' if args.sixteen_bit else '4-bit (NF4)'} and adding LoRA adapters")
    model, processor = FastVisionModel.from_pretrained(str(base), load_in_4bit=not args.sixteen_bit,
                                                       max_seq_length=256, use_gradient_checkpointing="unsloth")
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True,
                                           r=16, lora_alpha=16, lora_dropout=0, random_state=3407)

    print(f"[3/5] asking about {len(held_out)} held-out pictures before training")
    before = accuracy(model, processor, held_out)

    print(f"[4/5] training {args.steps} steps of 8 conversations (loss on the answers only)")
    FastVisionModel.for_training(model)
    trainer = SFTTrainer(
        model=model,
        processing_class=processor,  # the notebook's tokenizer=processor works too
        data_collator=UnslothVisionDataCollator(model, processor),
        train_dataset=[{"messages": r["messages"]} for r in train_rows],
        args=SFTConfig(
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            warmup_steps=5,
            max_steps=args.steps,
            learning_rate=args.learning_rate,
            logging_steps=max(1, min(10, args.steps // 4)),
            optim="adamw_torch",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir=str(out / "checkpoints"),
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            # as in Unsloth's vision notebook: the collator does all the data work
            remove_unused_columns=False,
            dataset_text_field="",
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=256,
            **device_args(),  # bf16/fp16 and use_cpu set right for this machine
        ),
    )
    train_start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_start
    after = accuracy(model, processor, held_out)

    print(f"[5/5] saving the LoRA adapter to {out / 'adapter'}")
    model.save_pretrained(out / "adapter")
    processor.save_pretrained(out / "adapter")
    return {"tasks": tasks, "before": before, "after": after, "held_out": held_out, "train_s": train_s,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "logging_steps": trainer.args.logging_steps, "total_s": time.perf_counter() - start,
            "adapter": out / "adapter"}


def report(result: dict[str, Any]) -> None:
    before, after, held_out, losses = result["before"], result["after"], result["held_out"], result["losses"]
    chance = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)}
    print(f"\nexact answers to {len(held_out)} questions about held-out pictures (drawn from another seed):\n")
    print("| question | chance | before | after |\n|---|---|---|---|")
    for task in result["tasks"]:
        print(f"| {QUESTIONS[task]} | {chance[task]:.0%} | {before[task]:.0%} | {after[task]:.0%} |")
    print(f"\ntraining loss (every {result['logging_steps']} steps): {' '.join(f'{x:.3f}' for x in losses)}")
    print(f"first answers: before {before['examples']}, after {after['examples']}, "
          f"expected {[r['answer'] for r in held_out[:4]]}")
    print(f"adapter in {result['adapter']}; training {result['train_s']:.0f} s, total {result['total_s']:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fasttune.quickstart.vision", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of batch 8 (default 200)")
    parser.add_argument("--learning-rate", type=float, default=4e-3, help="peak learning rate (default 4e-3)")
    parser.add_argument("--train-images", type=int, default=800,
                        help="training pictures (default 800: each seen about once)")
    parser.add_argument("--eval-images", type=int, default=48, help="held-out pictures (default 48)")
    parser.add_argument("--task", choices=["colour", "shape", "both"], default="both",
                        help="which question(s) to ask about each picture (default both)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"pixels a side (default {IMAGE_SIZE})")
    parser.add_argument("--16bit", dest="sixteen_bit", action="store_true",
                        help="load the model in 16-bit (bf16 where the CPU computes it natively, else fp32), not 4-bit")
    parser.add_argument("--output-dir", default="outputs/quickstart_vision", help="where the model and adapter go")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    for name in ("steps", "train_images", "eval_images"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: {getattr(args, name)} must be a positive integer")
    if args.image_size < 28:
        parser.error(f"--image-size: {args.image_size} is too small; Qwen2-VL needs at least 28 pixels a side")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    disable_progress_bar()
    report(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
