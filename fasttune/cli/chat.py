"""``fasttune chat RUN|MODEL``: a streaming chat on stdin with the model's own chat template.

Each stdin line is a user turn; the answer streams to stdout token by token (transformers' ``TextStreamer``).
``/exit`` (or end of input) quits, ``/reset`` starts a new conversation. The prompt is tokenized with
``fasttune.chat_templates.encode_chat``, so text that spells a control token stays text.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from fasttune import FastLanguageModel
from fasttune.chat_templates import encode_chat

from .export import LOADS, load_for_use
from .recipe import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run folder (fasttune train), an adapter folder or a model folder")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="shortest answer in tokens (default 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling temperature")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--load", choices=LOADS, default="auto",
                   help="how to load the base: auto = as the run trained it (16bit outside a run folder)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the run's, else auto)")


def _check(args: argparse.Namespace) -> None:
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens: {args.max_new_tokens} is not allowed; allowed: an integer >= 1")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        problems.append(f"--min-new-tokens: {args.min_new_tokens} is not allowed; allowed: 0 to --max-new-tokens")
    if not args.temperature >= 0:
        problems.append(f"--temperature: {args.temperature} is not allowed; allowed: a number >= 0")
    if problems:
        from .recipe import RecipeError

        raise RecipeError(problems, "fasttune chat")


def reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], args: argparse.Namespace,
          out: TextIO, streamer: Any = None) -> tuple[str, int]:
    """Stream one answer to ``out`` (or to ``streamer``, a transformers streamer); returns (answer text, tokens
    generated)."""
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
    batch = {"input_ids": torch.tensor([ids], device=model.device),
             "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=model.device)}
    streamer = streamer or TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        generated = model.generate(**batch, streamer=streamer, max_new_tokens=args.max_new_tokens,
                                   min_new_tokens=args.min_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, **sampling)
    new = generated[0, len(ids):]
    out.flush()
    return tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel())


def chat_command(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    _check(args)
    model, tokenizer, _, _ = load_for_use(args.source, args.load, args.dtype)
    if not getattr(tokenizer, "chat_template", None):
        from fasttune.config import ConfigError

        raise ConfigError(f"source: {args.source!r} has a tokenizer without a chat template; train with "
                          "data.chat_template set, or chat with a folder whose tokenizer has one")
    FastLanguageModel.for_inference(model)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("chat: type a message and press Enter; /reset starts over, /exit quits", file=out, flush=True)
    while True:
        print("you> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            print("", file=out, flush=True)
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        print("assistant> ", end="", file=out, flush=True)
        begin = time.perf_counter()
        text, tokens = reply(model, tokenizer, messages, args, out)
        seconds = time.perf_counter() - begin
        print(f"[{tokens} tokens, {tokens / seconds:.1f} tok/s]", file=out, flush=True)
        messages.append({"role": "assistant", "content": text})
