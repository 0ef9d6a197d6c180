"""Validate a GGUF file in llama.cpp (through ``llama-cpp-python``, an optional extra) against the HF model.

    report = validate_gguf("model.Q8_0.gguf", reference_model, tokenizer)

loads the file in llama.cpp, checks that llama.cpp tokenizes a prompt (with chat markers) into the same ids as the HF
tokenizer, runs the prompt, and compares the logits of every position with the reference model's:

    KL(p_hf || p_gguf) = sum_v p_hf(v) * (log p_hf(v) - log p_gguf(v))     mean over positions
    max |logit_hf - logit_gguf|

The low-level C API is used so that the model loads with ``use_extra_bufts=False``: llama.cpp's AMX weight-repacking
path segfaults on quantized models on some CPUs, and the high-level ``Llama`` class cannot turn it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. What is the capital of France? 42"


class GGUFValidationError(AssertionError):
    """llama.cpp disagrees with the HF model beyond the tolerance (tokens or logits)."""


@dataclass
class ValidationReport:
    """Outcome of one validation. ``kl`` is the mean KL over positions; ``top1`` the argmax agreement rate."""

    path: Path
    tokens_match: bool
    n_tokens: int
    max_abs_diff: float
    kl: float
    top1: float
    passed: bool


def _lib() -> Any:
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError("validate=True needs llama-cpp-python: pip install 'fasttune[llama]' "
                          "(it compiles llama.cpp, ~20 min on a small CPU)") from err
    return llama_cpp


_SILENT: list[Any] = []  # keeps the log callback alive for the life of the process


def _silence(lib: Any) -> None:
    if not _SILENT:
        def drop(level: int, text: bytes, user: Any) -> None:
            logger.debug("llama.cpp: %s", text.decode(errors="replace").rstrip())

        _SILENT.append(lib.llama_log_callback(drop))
        lib.llama_log_set(_SILENT[0], ctypes.c_void_p())
        lib.llama_backend_init()


class LlamaCppModel:
    """A GGUF model opened with the C API (``use_extra_bufts=False``). Use as a context manager."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, n_threads: int = 1, vocab_only: bool = False):
        self.lib = lib = _lib()
        _silence(lib)
        params = lib.llama_model_default_params()
        params.use_extra_bufts = False
        params.vocab_only = vocab_only
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path} (run with logging at DEBUG to see why)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.ctx = None
        if not vocab_only:
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = n_ctx
            cparams.n_ubatch = n_ctx
            cparams.n_threads = cparams.n_threads_batch = n_threads
            self.ctx = lib.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {path}")

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def n_vocab(self) -> int:
        return int(self.lib.llama_vocab_n_tokens(self.vocab))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self.lib.llama_token * cap)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama.cpp tokenize needs {-n} slots, had {cap}")
        return list(buf[:n])

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits ``(len(ids), n_vocab)`` of one fresh sequence."""
        if self.ctx is None:
            raise RuntimeError("logits: this model was opened with vocab_only=True")
        lib, n = self.lib, len(ids)
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(ids):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            vocab = self.n_vocab()
            return np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i), shape=(vocab,)).copy()
                             for i in range(n)])
        finally:
            lib.llama_batch_free(batch)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int] | frozenset[int] = frozenset()
               ) -> list[int]:
        """Greedy continuation of ``ids`` (KV cache kept between steps), stopping after a token in ``stop_ids``
        (not returned) or ``max_new_tokens`` tokens."""
        return list(self.stream_greedy(ids, max_new_tokens, stop_ids))

    def stream_greedy(self, ids: list[int], max_new_tokens: int,
                      stop_ids: set[int] | frozenset[int] = frozenset()) -> Iterator[int]:
        """:meth:`greedy`, one token at a time as it is decoded (the studio's GGUF chat streams them)."""
        if self.ctx is None:
            raise RuntimeError("greedy: this model was opened with vocab_only=True")
        lib, vocab = self.lib, self.n_vocab()
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch = lib.llama_batch_init(max(len(ids), 1), 0, 1)
        produced = 0
        try:
            feed, start = list(ids), 0
            while True:
                for i, tok in enumerate(feed):
                    batch.token[i] = tok
                    batch.pos[i] = start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = int(i == len(feed) - 1)
                batch.n_tokens = len(feed)
                status = lib.llama_decode(self.ctx, batch)
                if status != 0:
                    raise RuntimeError(f"llama_decode failed with status {status}")
                row = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, len(feed) - 1), shape=(vocab,))
                token = int(row.argmax())
                if token in stop_ids or produced == max_new_tokens:
                    return
                produced += 1
                yield token
                start += len(feed)
                feed = [token]
        finally:
            lib.llama_batch_free(batch)


def compare_logits(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(max |diff|, mean KL(ref || got), top-1 agreement) of two ``(seq, vocab)`` logit arrays."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    log_p = ref64 - np.logaddexp.reduce(ref64, axis=-1, keepdims=True)
    log_q = got64 - np.logaddexp.reduce(got64, axis=-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    return float(np.abs(ref64 - got64).max()), kl, top1


def hf_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0]
    return out.float().cpu().numpy()


def validate_gguf(path: str | os.PathLike, reference: torch.nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT,
                  max_kl: float = 1e-3, max_abs: float | None = None, n_threads: int = 1,
                  raise_on_failure: bool = True) -> ValidationReport:
    """Compare llama.cpp's tokenization and logits for ``prompt`` with ``tokenizer`` and ``reference`` (an HF model
    holding the weights the file should hold: the fp32 merge for f16 files, the file's dequantized weights for
    quantized ones). Fails (``GGUFValidationError``) when tokens differ, mean KL > ``max_kl`` or, if given, the worst
    logit difference > ``max_abs``."""
    marker = next((t for t in ("<|im_start|>", "<|eot_id|>", "<start_of_turn>", "<|end|>")
                   if tokenizer.convert_tokens_to_ids(t) not in (None, tokenizer.unk_token_id)), None)
    text = f"{marker}{prompt}" if marker else prompt
    hf_ids = tokenizer(text).input_ids
    with LlamaCppModel(path, n_ctx=max(64, len(hf_ids) + 8), n_threads=n_threads) as lm:
        cpp_ids = lm.tokenize(text)
        got = lm.logits(hf_ids)
    ref = hf_logits(reference, hf_ids)
    worst, kl, top1 = compare_logits(ref, got[:, : ref.shape[-1]])
    ok = cpp_ids == hf_ids and kl <= max_kl and (max_abs is None or worst <= max_abs)
    report = ValidationReport(Path(path), cpp_ids == hf_ids, len(hf_ids), worst, kl, top1, ok)
    logger.info("validate %s: tokens %s, max|diff| %.2e, KL %.2e, top-1 %.2f", Path(path).name,
                "match" if report.tokens_match else "DIFFER", worst, kl, top1)
    if not ok and raise_on_failure:
        raise GGUFValidationError(
            f"{path}: llama.cpp disagrees with the HF model: tokens {'match' if report.tokens_match else 'differ'} "
            f"(hf {hf_ids[:12]}..., llama.cpp {cpp_ids[:12]}...), max |logit diff| {worst:.3e}, "
            f"mean KL {kl:.3e} (limit {max_kl:.1e}), top-1 agreement {top1:.2f}"
        )
    return report


@dataclass
class MMProjReport:
    """Outcome of :func:`validate_mmproj`: llama.cpp's image embeddings against transformers' for one image."""

    path: Path
    n_tokens: int
    max_abs_diff: float
    rel_diff: float
    passed: bool


def llama_cpp_image_embeddings(text_gguf: str | os.PathLike, mmproj_gguf: str | os.PathLike, image: Any,
                               n_threads: int = 1, image_tokens: int | None = None) -> np.ndarray:
    """``(n_image_tokens, n_embd)``: the embeddings llama.cpp's mtmd computes for ``image`` (a PIL image).

    ``image_tokens`` pins the token count of families whose images keep their size (Qwen2-VL): mtmd otherwise picks
    its own pixel budget and resizes."""
    from llama_cpp import mtmd_cpp

    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    with LlamaCppModel(text_gguf, n_ctx=64, n_threads=n_threads) as lm:
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = n_threads
        params.warmup = False
        if image_tokens is not None:
            params.image_min_tokens = params.image_max_tokens = image_tokens
        ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_gguf).encode(), lm.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp (mtmd) could not load the projector {mmproj_gguf}")
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd_cpp.mtmd_bitmap_init(width, height, data)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            status = mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if status != 0:
                raise RuntimeError(f"mtmd_tokenize failed with status {status}")
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                if mtmd_cpp.mtmd_encode_chunk(ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                n_embd = lm.lib.llama_model_n_embd(lm.model)
                out = mtmd_cpp.mtmd_get_output_embd(ctx)
                return np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()
            raise RuntimeError("mtmd_tokenize produced no image chunk")
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)
            mtmd_cpp.mtmd_free(ctx)


def validate_mmproj(text_gguf: str | os.PathLike, mmproj_gguf: str | os.PathLike, model: torch.nn.Module,
                    processor: Any, image: Any, max_rel: float = 1e-2, n_threads: int = 1,
                    raise_on_failure: bool = True) -> MMProjReport:
    """Compare llama.cpp's embeddings of ``image`` (projector output, what enters the language model) with
    transformers' ``model.get_image_features`` on the processor's pixels. ``rel_diff`` is
    ``max |diff| / max |reference|``; give an image already at the processor's size so both resize nothing."""
    from fasttune.lora.unwrap import base_model

    inputs = processor.image_processor(images=[image], return_tensors="pt")
    extra = {k: inputs[k] for k in ("image_grid_thw",) if k in inputs}  # Qwen2-VL: the patch grid of each image
    base = base_model(model)
    with torch.no_grad():
        features = base.get_image_features(pixel_values=inputs["pixel_values"].to(base.dtype), **extra)
    features = getattr(features, "pooler_output", features)
    ref = torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features
    ref = ref.reshape(-1, ref.shape[-1]).float().cpu().numpy()
    pinned = ref.shape[0] if "image_grid_thw" in extra else None
    got = llama_cpp_image_embeddings(text_gguf, mmproj_gguf, image, n_threads, image_tokens=pinned)
    if ref.shape != got.shape:
        raise GGUFValidationError(f"{mmproj_gguf}: llama.cpp made {got.shape[0]} image tokens of width "
                                  f"{got.shape[1]}, transformers {ref.shape[0]} of width {ref.shape[1]}")
    if not np.abs(ref).max() > 0:
        raise GGUFValidationError(f"{mmproj_gguf}: transformers' image embeddings are all zero (an untrained "
                                  "projector?), so the comparison would prove nothing")
    worst = float(np.abs(ref - got).max())
    rel = worst / float(np.abs(ref).max())
    report = MMProjReport(Path(mmproj_gguf), got.shape[0], worst, rel, rel <= max_rel)
    logger.info("validate %s: %d image tokens, max|diff| %.2e (relative %.2e)", Path(mmproj_gguf).name,
                got.shape[0], worst, rel)
    if not report.passed and raise_on_failure:
        raise GGUFValidationError(f"{mmproj_gguf}: llama.cpp's image embeddings differ from transformers': "
                                  f"max |diff| {worst:.3e}, relative {rel:.3e} (limit {max_rel:.1e})")
    return report
