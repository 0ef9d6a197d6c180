"""``save_pretrained_gguf``: merge a LoRA model and write one GGUF file per requested type, optionally validated.

    paths = save_pretrained_gguf(model, "out", tokenizer, quantization_method=["q4_k_m", "q8_0"], validate=True)

The merge is streamed in float32, one tensor at a time, into each file (see ``writer.write_gguf``). Files are named
``<file_stem>.<TYPE>.gguf`` (``model.Q4_K_M.gguf``) and each is written to a scratch file and renamed into place, so
each file is the old or the new one at every instant (a killed multi-type save may leave some types new, some old);
the folder's other files are never touched, and scratch files of killed saves are deleted by the next save.
With ``validate=True`` every file is loaded in llama.cpp and compared with an HF reference: the float32 merge for
f32/f16/bf16 files, the model holding the file's own dequantized weights for quantized ones.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as Q

from ...distributed import one_writer
from ...lora.unwrap import base_model
from ...state import model_state
from ..atomic import check_writable, recover_interrupted
from ..hub import split_push_kwargs, upload_folder
from ..merge import iter_merged_tensors, merged_state_dict, tied_output_key
from .mixes import FTYPES, FileType
from .mmproj import LANGUAGE_PATHS, image_side, language_tensors, mmproj_map, write_mmproj
from .quants import resolve_methods
from .writer import GGUFReport, write_gguf

logger = logging.getLogger(__name__)

_UNQUANTIZED = ("f32", "f16", "bf16")
# Mean KL(hf || llama.cpp) allowed by validate=True; the reference holds the file's own weights (f16/bf16: the merge
# rounded to that type; quantized types: the file dequantized), so what is left is llama.cpp's arithmetic: its CPU
# matmuls convert activations to f16 for f16 weights and to 8-bit blocks for quantized ones, which real models, whose
# activations have outliers, feel. Measured 2026-12-07 (fasttune.real_models, 20-token prompt):
#   f16: 3.6e-6 (Gemma-3-270M), 6.2e-6 (SmolLM2-135M), 2.2e-5 (SmolLM2 after a fact fine-tune: sharper logits);
#   tiny random models ~1e-7.
#   SmolLM2 base: fasttune's q4_0 1.3e-2, q4_k_m 2.1e-2; the same f16 file quantized by llama.cpp's own quantizer:
#   q8_0 1.1e-2, q4_0 1.2e-2, q4_k_m 3.5e-2; the published Q4_1 / Q4_K_M files 8.7e-3 / 1.2e-2; SmolLM2 after a
#   fact fine-tune (sharper logits), fasttune's q4_k_m 9.9e-2. Tiny random models ~1e-5.
# Layout or metadata bugs (a wrong q/k permutation, norm offset, rope base) give KL of several nats on a real model
# (~1e-4 on a tiny random one: the tests of tiny models pass tighter bounds); the defaults only have to separate those.
MAX_KL_UNQUANTIZED = 1e-4
MAX_KL_QUANTIZED = 0.25
_KEYWORDS = ("file_stem", "pre_tokenizer", "validate_prompt", "max_kl", "write_modelfile", "push_to_hub", "token",
             "private", "commit_message")


def gguf_filename(file_stem: str, ftype: str) -> str:
    return f"{file_stem}.{ftype.upper()}.gguf"


def _validate(path: Path, ftype: str, model: torch.nn.Module, tokenizer: Any, prompt: str | None,
              max_kl: float, report: GGUFReport) -> None:
    from transformers import AutoModelForCausalLM

    from ..llama_cpp import DEFAULT_PROMPT, validate_gguf
    from .reader import reference_model
    from .tensor_maps import get_tensor_map, gguf_name, gguf_names
    from .writer import reference_text_config, text_config

    config = reference_text_config(base_model(model).config)
    if ftype in _UNQUANTIZED:
        reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = merged_state_dict(model, dtype=torch.float32)
        if getattr(base_model(model).config, "vision_config", None) is not None:
            state = dict(language_tensors(state.items()))
        stored = {"f16": torch.float16, "bf16": torch.bfloat16}.get(ftype)
        if stored is not None:  # the file holds its matrices rounded to f16/bf16; norms, biases (and routers) f32
            tmap = get_tensor_map(text_config(base_model(model).config).model_type)  # the map the file was written by
            kept = {name for name, qtype in report.tensor_types.items() if qtype == "F32"}
            state = {k: v.to(stored).float() if v.ndim >= 2 and not set(gguf_names(gguf_name(tmap, k)[1])) <= kept
                     else v for k, v in state.items()}
        reference.load_state_dict(state, strict=False)
        reference.tie_weights()
        reference.eval()
    else:
        reference = reference_model(path, config)
    validate_gguf(path, reference, tokenizer, prompt or DEFAULT_PROMPT, max_kl=max_kl)


def _validate_mmproj(text_path: Path, path: Path, model: torch.nn.Module, processor: Any) -> None:
    """llama.cpp's embeddings of a drawn image (at the processor's size, so neither side resizes) vs transformers'."""
    from PIL import Image, ImageDraw

    from ..llama_cpp import validate_mmproj

    side = image_side(base_model(model).config, processor)
    image = Image.new("RGB", (side, side), (250, 250, 250))
    ImageDraw.Draw(image).ellipse((side // 8, side // 4, side - side // 8, side - side // 4), fill=(200, 40, 30))
    validate_mmproj(text_path, path, model, processor, image)


@one_writer
def save_pretrained_gguf(
    model: torch.nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    quantization_method: str | list[str] = "fast_quantized",
    validate: bool = False,
    **kw: Any,
) -> list[Path]:
    """Write ``model`` (peft LoRA or plain transformers; bf16/fp32 or bitsandbytes 4-bit base) as GGUF file(s).

    quantization_method: one name or a list, Unsloth's names and aliases: ``not_quantized`` (f16), ``fast_quantized``
    (q8_0), ``quantized`` (q4_k_m), f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s/m/l, q4_k_s/m,
    q5_k_s/m, q6_k, mxfp4_moe (alias mxfp4: a mixture of experts' expert tensors in MXFP4, every other matrix Q8_0,
    as llama.cpp's gpt-oss files). validate: check each file in llama.cpp (needs llama-cpp-python). Keywords: ``file_stem``
    (default "model"), ``pre_tokenizer`` (llama.cpp pre-tokenizer name, when it cannot be derived),
    ``validate_prompt``, ``max_kl`` (default 1e-4 for f32/f16/bf16, 0.25 for quantized types: see MAX_KL_QUANTIZED),
    ``write_modelfile`` (default True: an Ollama Modelfile beside the first file when the tokenizer's chat template
    maps to one), ``push_to_hub`` / ``token`` / ``private`` /
    ``commit_message`` (then the folder is also uploaded to the Hub repo named ``save_directory``). Returns the paths
    written, in the order asked. A vision-language model (pass its processor as ``tokenizer``) gets its language
    model in each type plus one ``mmproj-<file_stem>.F16.gguf`` (vision tower and projector), last in the list.
    """
    unknown = sorted(set(kw) - set(_KEYWORDS))
    if unknown:
        raise TypeError(f"save_pretrained_gguf: unexpected keyword(s) {unknown}; accepted: {list(_KEYWORDS)}")
    if tokenizer is None:
        raise ValueError("tokenizer: a GGUF file needs the tokenizer (llama.cpp reads the vocabulary from the file); "
                         "pass the tokenizer used for training")
    ftypes = resolve_methods(quantization_method)  # resolved and checked here, once
    _note_qat_scheme(model, ftypes)
    folder = Path(save_directory)
    check_writable(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _save_files(model, folder, tokenizer, ftypes, validate, kw, save_directory)
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # nothing of this save is left behind, not even the folder it made
        raise


def _note_qat_scheme(model: Any, ftypes: list[FileType]) -> None:
    """A model trained with QAT for one GGUF type and exported to another quantized type: say so (the file is valid,
    but it is not the model the training saw)."""
    state = model_state(model)
    scheme = state.qat_scheme if state is not None else None
    if scheme is None or scheme not in FTYPES:
        return
    others = [f.name for f in ftypes if f.name != scheme and f.qtype not in (Q.F32, Q.F16, Q.BF16)]
    if others:
        logger.warning("gguf: this model was trained with qat_scheme=%r; the %s file(s) round its weights another "
                       "way than the training did (export %r for the trained model)", scheme, others, scheme)


def _save_files(model: Any, folder: Path, tokenizer: Any, ftypes: list[FileType], validate: bool, kw: dict[str, Any],
                save_directory: Any) -> list[Path]:
    recover_interrupted(folder)
    base = base_model(model)
    tied = tied_output_key(base) is not None or base.get_output_embeddings() is None
    processor = tokenizer if hasattr(tokenizer, "image_processor") else None
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a VLM's processor wraps its tokenizer
    vision = getattr(base.config, "vision_config", None) is not None
    template = getattr(tokenizer, "fasttune_template", None)
    stem = kw.get("file_stem", "model")
    paths: list[Path] = []
    reports: list[GGUFReport] = []
    mmap = mmproj_map(base.config) if vision else None  # an unsupported family fails before anything is written
    if vision:
        if processor is None:
            raise ValueError("tokenizer: pass the model's processor (it holds the image mean/std the mmproj file "
                             "needs), not only its tokenizer")
    for ftype in ftypes:
        path = folder / gguf_filename(stem, ftype.name)
        # The merge is streamed: one dense float32 tensor at a time, re-done per file type (cheap next to quantizing).
        if vision:  # the language tower only: the vision part goes to the mmproj file
            tensors = language_tensors(iter_merged_tensors(model, torch.float32, within=LANGUAGE_PATHS))
        else:
            tensors = iter_merged_tensors(model, dtype=torch.float32)
        reports.append(write_gguf(path, tensors, base.config, tokenizer, ftype, template, kw.get("pre_tokenizer"),
                                  name=stem, tied=tied))
        if validate:
            max_kl = kw.get("max_kl") or (MAX_KL_UNQUANTIZED if ftype.name in _UNQUANTIZED else MAX_KL_QUANTIZED)
            _validate(path, ftype.name, model, tokenizer, kw.get("validate_prompt"), max_kl, reports[-1])
        paths.append(path)
    if mmap is not None:  # llama.cpp runs a VLM from the language file plus this projector file
        path = folder / f"mmproj-{stem}.F16.gguf"
        write_mmproj(path, iter_merged_tensors(model, torch.float32, within=mmap.module_paths), base.config, processor,
                     "f16", name=stem, mmap=mmap)
        if validate:
            _validate_mmproj(paths[0], path, model, processor)
        paths.append(path)
    if kw.get("write_modelfile", True):
        _maybe_modelfile(folder, paths[0], tokenizer)
    if kw.get("push_to_hub"):
        upload_folder(folder, str(save_directory), token=kw.get("token"), private=kw.get("private"),
                      commit_message=kw.get("commit_message"))
    return paths


def _maybe_modelfile(folder: Path, gguf_path: Path, tokenizer: Any) -> None:
    from ..ollama import OllamaTemplateError, write_ollama_modelfile

    try:
        write_ollama_modelfile(folder / "Modelfile", gguf_path, tokenizer)
    except OllamaTemplateError as err:
        logger.warning("gguf: no Ollama Modelfile written: %s", err)


@one_writer
def push_to_hub_gguf(model: torch.nn.Module, repo_id: str, tokenizer: Any = None,
                     quantization_method: str | list[str] = "fast_quantized", token: str | None = None,
                     **kw: Any) -> str:
    """``save_pretrained_gguf`` into a temporary folder (GGUF files + Modelfile), then upload it to ``repo_id``.

    Extra keywords: ``private``, ``endpoint``, ``commit_message``, ``revision`` and those of ``save_pretrained_gguf``.
    """
    private = kw.pop("private", None)
    push, save_kw = split_push_kwargs(dict(kw))
    with tempfile.TemporaryDirectory() as scratch:
        save_pretrained_gguf(model, scratch, tokenizer, quantization_method=quantization_method, **save_kw)
        return upload_folder(scratch, repo_id, token=token, private=private, **push)
