"""The chat page: a run's fine-tuned model, its base model and its GGUF files answer the same prompt, token by token.

The fine-tuned model is loaded as ``fasttune chat RUN`` loads it (``fasttune.cli.export.load_for_use``: the adapter,
merged weights or last checkpoint) and answers through ``fasttune.cli.chat.reply``. The base model is the same
model with its LoRA adapter switched off (peft's ``disable_adapter``: the exact base weights, no second copy); a run
without an adapter (full fine-tuning, merged only) loads its recipe's base model beside it. A GGUF file answers
through llama.cpp (``llama-cpp-python``, where it is installed) with the chat template stored in the file.
One model answers at a time (a lock); the last run loaded stays in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fasttune.cli.chat import reply
from fasttune.cli.export import load_for_use
from fasttune.cli.train import model_path

SOURCES: tuple[str, ...] = ("tuned", "base", "gguf")


class ChatError(ValueError):
    """A chat request that cannot be answered (named source missing, no chat template, llama.cpp absent)."""


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class Chats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: Path | None = None
        self._models: dict[str, Any] = {}

    def _load(self, run: Path) -> None:
        if self._run == run:
            return
        self._models = {}
        model, tokenizer, _, recipe = load_for_use(str(run), "auto", None)
        if not getattr(tokenizer, "chat_template", None):
            raise ChatError(f"run {run.name!r}: its tokenizer has no chat template (set data.chat_template)")
        from fasttune import FastLanguageModel

        FastLanguageModel.for_inference(model)
        self._models = {"tuned": (model, tokenizer), "recipe": recipe}
        self._run = run

    def _base(self, run: Path) -> tuple[Any, Any, contextlib.AbstractContextManager]:
        model, tokenizer = self._models["tuned"]
        if hasattr(model, "disable_adapter"):
            return model, tokenizer, model.disable_adapter()
        if "base" not in self._models:
            recipe = self._models["recipe"]
            if recipe is None:
                raise ChatError(f"run {run.name!r}: no recipe.yaml, so its base model is unknown")
            base, _ = self._plain_base(recipe, run)
            self._models["base"] = base
        return self._models["base"], tokenizer, contextlib.nullcontext()

    @staticmethod
    def _plain_base(recipe: Any, run: Path) -> tuple[Any, Any]:
        from fasttune import FastLanguageModel

        q = recipe.model.quantization
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_path(recipe, run), max_seq_length=recipe.model.max_seq_length, load_in_4bit=q == "4bit",
            load_in_8bit=q == "8bit", load_in_16bit=q in ("16bit", "full"))
        FastLanguageModel.for_inference(model)
        return model, tokenizer

    def stream(self, run: Path, source: str, messages: list[dict[str, str]], max_new_tokens: int,
               temperature: float) -> Iterator[str]:
        """The answer's text pieces as they are generated."""
        if source not in SOURCES:
            raise ChatError(f"source: {source!r} is not allowed; allowed: {', '.join(SOURCES)}")
        if not 1 <= max_new_tokens <= 4096:
            raise ChatError(f"max_new_tokens: {max_new_tokens} is not allowed; allowed: 1 to 4096")
        if not temperature >= 0:
            raise ChatError(f"temperature: {temperature} is not allowed; allowed: a number >= 0")
        if source == "gguf":
            yield from self._gguf(run, messages, max_new_tokens, temperature)
            return
        from transformers import TextIteratorStreamer

        with self._lock:
            self._load(run)
            if source == "tuned":
                model, tokenizer = self._models["tuned"]
                context = contextlib.nullcontext()
            else:
                model, tokenizer, context = self._base(run)
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
            args = argparse.Namespace(max_new_tokens=max_new_tokens, min_new_tokens=0, temperature=temperature)
            failure: list[BaseException] = []

            def generate() -> None:
                try:
                    with context:
                        reply(model, tokenizer, messages, args, out=_Null(), streamer=streamer)
                except BaseException as error:  # handed to the request thread, which raises it
                    failure.append(error)
                    streamer.end()

            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            yield from streamer
            worker.join()
            if failure:
                raise failure[0]

    def _gguf(self, run: Path, messages: list[dict[str, str]], max_new_tokens: int,
              temperature: float) -> Iterator[str]:
        """The run's GGUF file answering through llama.cpp; greedy whatever ``temperature`` says (said on the page's
        GGUF column: fasttune's llama.cpp wrapper decodes greedily)."""
        files = sorted((run / "gguf").glob("*.gguf")) if (run / "gguf").is_dir() else []
        if not files:
            raise ChatError(f"run {run.name!r} has no GGUF file; export one on the Export page first")
        if not llama_cpp_available():
            raise ChatError("chatting with a GGUF file needs llama.cpp: pip install llama-cpp-python (fasttune[llama])")
        from fasttune.export.llama_cpp import LlamaCppModel

        # llama.cpp through fasttune's C-API wrapper (use_extra_bufts=False: its AMX repacking crashes on quantized
        # files), greedy, the prompt rendered by the run's own tokenizer and chat template, as training saw it
        with self._lock:
            self._load(run)  # the run's tokenizer and chat template; its generation config's end tokens
        model, tokenizer = self._models["tuned"]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop = {t for t in ([ends] if isinstance(ends, int) else list(ends or [])) + [tokenizer.eos_token_id]
                if isinstance(t, int)}
        with self._lock, LlamaCppModel(files[0], n_ctx=2048, n_threads=torch.get_num_threads()) as lm:
            new: list[int] = []
            shown = ""
            for token in lm.stream_greedy(list(ids), max_new_tokens, stop):
                new.append(token)
                text = tokenizer.decode(new, skip_special_tokens=True)
                if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
                    yield text[len(shown):]
                    shown = text


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
