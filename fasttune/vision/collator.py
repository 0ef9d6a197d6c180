"""The image-text data collator for vision-language SFT (``UnslothVisionDataCollator`` is the same class).

Each example is a conversation (``messages``, Unsloth's and TRL's layout) whose images are either entries inside the
content (``{"type": "image", "image": <PIL image | path | URL | {"bytes": ...}>}``) or, in TRL's layout, an
``images`` column whose images fill the content's ``{"type": "image"}`` placeholders in order. The collator:

1. loads every image (RGB), shrinking it to ``image_size`` (longest side, aspect kept) when given; an image
   of more than ``max_image_pixels`` pixels (64 M by default) is refused from its header, before decoding;
2. renders the conversation with the processor's chat template and runs the processor on the batch (padding to the
   longest row, never truncating: cutting a row would cut image tokens, so a row longer than ``max_seq_length`` is an
   error naming it);
3. builds labels: assistant answers only (``train_on_responses_only=True``, markers read from the chat template or
   given), and never an image placeholder, vision token or padding;
4. padding-free (``padding_free=None``: where the family allows it): the rows are packed into one row without
   padding, each conversation keeping its own positions (Qwen2-VL's 3-D rope positions computed per conversation,
   with the text positions transformers reads to find the segments) and segment bounds (``cu_seq_lens_q``) for
   fasttune's per-segment attention. Families whose image tokens attend bidirectionally (Gemma 3) or through cross
   attention (mllama) keep padded rows: packing would change what they compute.

Errors name the row (its index in the batch and, with datasets' indices, the example) and the problem: a missing or
unreadable image, more or fewer images than placeholders, message text that spells a control token (it could forge a
turn), images given to a text-only model.
"""

from __future__ import annotations

import io
import logging
import os
import urllib.request
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from fasttune.data.infer_template import infer_template
from fasttune.data.masking import IGNORE_INDEX, TokenTexts, response_mask
from fasttune.data.spec import ROLES
from fasttune.lora.unwrap import base_model
from fasttune.models import get_vision_family, vision_families
from fasttune.state import model_state

logger = logging.getLogger("fasttune")

_URL_TIMEOUT_S = 30


class VisionCollatorError(ValueError):
    """A row the collator cannot turn into model inputs; the message names the row and the fix."""


def _checked_message(message: Any, where: str) -> str | list:
    """The content of one message, after the checks the text path makes (:data:`fasttune.data.spec.ROLES` only: a role
    is written into the prompt as is, so any other string could forge a turn) plus the vision shapes: a string, or a
    list of parts. An assistant string must hold text (else only the end-of-turn marker would be trained)."""
    if not isinstance(message, dict):
        raise VisionCollatorError(f"{where}: {type(message).__name__} {message!r} is not a message; use "
                                  "{'role': ..., 'content': ...}")
    role = message.get("role")
    if role not in ROLES:
        raise VisionCollatorError(f"{where}: role {role!r} is not allowed; allowed roles are {list(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        if role == "assistant" and not content.strip():
            raise VisionCollatorError(f"{where}: the assistant answer is empty, so only the end-of-turn marker would "
                                      "be trained; give it an answer or drop the row")
        return content
    if not isinstance(content, (list, tuple)) or not content:
        raise VisionCollatorError(f"{where}: content must be a string or a non-empty list of parts "
                                  f"({{'type': 'text', 'text': ...}} or {{'type': 'image'}}), got {content!r}")
    return content


def _image_token_ids(processor: Any, model_config: Any) -> set[int]:
    """Every token id that stands for (part of) an image: placeholders, soft tokens, begin/end markers."""
    tokenizer = processor.tokenizer
    ids: set[int] = set()
    for holder in (processor, model_config):
        for attr in ("image_token_id", "image_token_index", "boi_token_index", "eoi_token_index",
                     "vision_start_token_id", "vision_end_token_id", "video_token_id", "boi_token_id",
                     "eoi_token_id"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and value >= 0:
                ids.add(value)
    for attr in ("image_token", "boi_token", "eoi_token"):
        token = getattr(tokenizer, attr, None) or getattr(processor, attr, None)
        if isinstance(token, str):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    return ids


# The most pixels an image may have before it is decoded (the collator's max_image_pixels default): 64 megapixels,
# 192 MiB as RGB. A 97 KB PNG can declare 10000 x 10000 pixels (1.9 GB decoded, 6 s) only to be shrunk afterwards.
MAX_IMAGE_PIXELS = 64_000_000


def load_image(value: Any, where: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, an http(s) URL or datasets' ``{"bytes", "path"}`` dict; one of more
    than ``max_pixels`` pixels (None: no limit) is refused from its header, before it is decoded."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)) and str(value).startswith(("http://", "https://")):
            with urllib.request.urlopen(str(value), timeout=_URL_TIMEOUT_S) as response:  # noqa: S310 (http(s) only)
                image = Image.open(io.BytesIO(response.read()))
        elif isinstance(value, (str, os.PathLike)):
            if os.path.isdir(value):
                raise VisionCollatorError(f"{where}: image path {str(value)!r} is a folder, not an image file")
            if not os.path.isfile(value):
                raise VisionCollatorError(f"{where}: image file {str(value)!r} does not exist")
            image = Image.open(value)
        else:
            raise VisionCollatorError(f"{where}: {type(value).__name__} is not an image; give a PIL image, a file "
                                      "path, an http(s) URL or a {'bytes': ...} dict")
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise VisionCollatorError(f"{where}: the image is {image.width} x {image.height} pixels, more than the "
                                      f"max_image_pixels={max_pixels} budget (it would be decoded whole before being "
                                      "shrunk); shrink it, or raise max_image_pixels on the collator")
        image.load()
    except Image.DecompressionBombError as error:  # not an OSError: PIL refused it in Image.open
        raise VisionCollatorError(f"{where}: the image is too large to decode safely ({error}); shrink it") from error
    except (UnidentifiedImageError, OSError) as error:
        raise VisionCollatorError(f"{where}: the image cannot be read ({error})") from error
    return image.convert("RGB") if image.mode != "RGB" else image


def _resized(image: Image.Image, size: int | None) -> Image.Image:
    if size is None or max(image.size) <= size:
        return image
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _packing_kind(config: Any, padding_free: bool | None) -> str | None:
    """How this model's rows are packed (its family's ``VisionSpec.packing``), or None for padded rows."""
    model_type = getattr(config, "model_type", None)
    vision = get_vision_family(model_type)
    kind = vision.packing if vision is not None else None
    if padding_free and kind is None:
        packable = sorted(v.model_type for v in vision_families() if v.packing is not None)
        raise ValueError(f"padding_free=True: {model_type!r} rows cannot be packed exactly (its image tokens attend "
                         f"bidirectionally or through cross-attention); packable families: {packable}. "
                         "Leave padding_free=None to pack where possible")
    return kind if padding_free is not False else None


class VisionDataCollator:
    """Batches image-text conversations for a vision-language model (see the module docstring).

    ``model`` is read for its config (image token ids) and ``max_seq_length``; ``processor`` is the model's
    processor. ``image_size``: shrink images so their longest side is at most this many pixels (None: as given;
    the processor's own resizing still applies). ``train_on_responses_only``: labels only on assistant answers,
    with markers from the chat template unless ``instruction_part`` / ``response_part`` are given.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        max_seq_length: int | None = None,
        train_on_responses_only: bool = True,
        instruction_part: str | None = None,
        response_part: str | None = None,
        end_parts: Sequence[str] | None = None,
        image_size: int | None = None,
        formatting_func: Any = None,
        messages_field: str = "messages",
        images_field: str = "images",
        padding_free: bool | None = None,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        if not hasattr(processor, "image_processor"):
            raise VisionCollatorError(f"processor: a {type(processor).__name__} has no image processor, so this is a "
                                      "text-only model; images cannot be trained on it (use a vision-language model "
                                      "loaded with FastVisionModel, or drop the images)")
        if max_image_pixels is not None and (not isinstance(max_image_pixels, int) or max_image_pixels < 1):
            raise ValueError(f"max_image_pixels: {max_image_pixels!r} must be a positive int (width x height), or None "
                             "for no limit")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
            raise ValueError(f"image_size: {image_size!r} must be an int of at least 8 pixels (the longest side), "
                             "or None")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        config = getattr(model, "config", None)
        self.packing = _packing_kind(config, padding_free)
        self._rope_index = base_model(model).model.get_rope_index if self.packing == "mrope" else None
        state = model_state(model)
        self.max_seq_length = max_seq_length or (state.max_seq_length if state is not None else None)
        self.image_size = image_size
        self.max_image_pixels = max_image_pixels
        self.formatting_func = formatting_func
        self.messages_field = messages_field
        self.images_field = images_field
        self.image_ids = _image_token_ids(processor, config)
        self.texts = TokenTexts(self.tokenizer)
        self.special_tokens = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
        self.markers: tuple[str, str, tuple[str, ...]] | None = None
        if train_on_responses_only:
            self.markers = self._markers(instruction_part, response_part, end_parts)

    def set_response_markers(self, instruction_part: str | None = None, response_part: str | None = None,
                             end_parts: Sequence[str] | None = None) -> None:
        """Train on assistant answers only from now on (``train_on_responses_only(trainer, ...)`` calls this)."""
        self.markers = self._markers(instruction_part, response_part, end_parts)

    def _markers(self, instruction_part, response_part, end_parts) -> tuple[str, str, tuple[str, ...]]:
        if (instruction_part is None) != (response_part is None):
            raise ValueError("instruction_part / response_part: give both or neither (neither: read from the "
                             "processor's chat template)")
        if response_part is not None:
            return instruction_part, response_part, tuple(end_parts or ())
        jinja = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not isinstance(jinja, str):
            raise ValueError("train_on_responses_only: the processor has no chat template to read the turn markers "
                             "from; pass instruction_part=... and response_part=...")
        template = infer_template(jinja, self.tokenizer.eos_token or "", self.tokenizer.bos_token)
        parts = end_parts if end_parts is not None else template.end_parts
        return template.instruction_part, template.response_part, tuple(parts)

    # -- one row ------------------------------------------------------------------------------------------------
    def _row(self, example: dict, row: int) -> tuple[list[dict], list[Image.Image]]:
        """The conversation with bare image placeholders, and its images in order, checked."""
        where = f"row {row}"
        if self.formatting_func is not None:
            example = self.formatting_func(example)
        messages = example.get(self.messages_field) if isinstance(example, dict) else None
        if not isinstance(messages, list) or not messages:
            keys = sorted(example) if isinstance(example, dict) else type(example).__name__
            raise VisionCollatorError(f"{where}: no {self.messages_field!r} list of messages (found {keys}); give "
                                      "each example a 'messages' column of {'role', 'content'} dicts")
        column = example.get(self.images_field)
        column = [] if column is None else list(column) if isinstance(column, (list, tuple)) else [column]
        images: list[Image.Image] = []
        rendered: list[dict] = []
        placeholders = 0
        for m, message in enumerate(messages):
            content = _checked_message(message, f"{where}, message {m}")
            if isinstance(content, str):
                self._check_text(content, f"{where}, message {m}")
                rendered.append({"role": message["role"], "content": content})
                continue
            parts = []
            for p, part in enumerate(content):
                if not isinstance(part, dict):
                    raise VisionCollatorError(f"{where}, message {m}, part {p}: {type(part).__name__} {part!r} is not "
                                              "a content part; use {'type': 'text', 'text': ...} or {'type': 'image'}")
                kind = part.get("type")
                if kind == "image":
                    value = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                    if value is None:
                        if placeholders >= len(column):
                            raise VisionCollatorError(
                                f"{where}, message {m}: an image placeholder with no image: the content has more "
                                f"{{'type': 'image'}} entries than the {len(column)} image(s) in "
                                f"{self.images_field!r}")
                        value = column[placeholders]
                        placeholders += 1
                    images.append(_resized(load_image(value, f"{where}, message {m}, part {p}", self.max_image_pixels),
                                          self.image_size))
                    parts.append({"type": "image"})
                elif kind == "text":
                    text = part.get("text") or ""  # a dataset's table fills absent keys with None
                    self._check_text(text, f"{where}, message {m}")
                    parts.append({"type": "text", "text": text})
                else:
                    raise VisionCollatorError(f"{where}, message {m}, part {p}: type {kind!r} is not supported; "
                                              "use 'text' or 'image'")
            if message["role"] == "assistant" and not any(q.get("text", "").strip() for q in parts):
                raise VisionCollatorError(f"{where}, message {m}: the assistant answer has no text, so only the "
                                          "end-of-turn marker would be trained; give it an answer or drop the row")
            rendered.append({"role": message["role"], "content": parts})
        if placeholders < len(column):
            raise VisionCollatorError(f"{where}: {len(column)} image(s) in {self.images_field!r} but only "
                                      f"{placeholders} {{'type': 'image'}} placeholder(s) in the messages")
        return rendered, images

    def _check_text(self, text: Any, where: str) -> None:
        if not isinstance(text, str):
            raise VisionCollatorError(f"{where}: text {text!r} is not a string")
        for token in self.special_tokens:
            if token in text:
                raise VisionCollatorError(f"{where}: the message text contains the control token {token!r}, which "
                                          "would be read as a turn or image marker; remove or rewrite it")

    # -- the batch ----------------------------------------------------------------------------------------------
    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        conversations, images = [], []
        for row, example in enumerate(examples):
            messages, row_images = self._row(example, row)
            conversations.append(self.processor.apply_chat_template(messages, tokenize=False))
            images.append(row_images)
        has_images = any(images)
        if has_images and not all(images):
            # processors batch images per row; a row without one still needs an entry, which they do not accept
            missing = [i for i, imgs in enumerate(images) if not imgs]
            raise VisionCollatorError(f"rows {missing}: no image, while other rows of the batch have images; give "
                                      "every row at least one image, or batch text-only rows separately")
        batch = self.processor(text=conversations, images=images if has_images else None, padding=True,
                               return_tensors="pt")
        input_ids = batch["input_ids"]
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        if self.max_seq_length is not None:
            long = [(i, n) for i, n in enumerate(lengths) if n > self.max_seq_length]
            if long:
                raise VisionCollatorError(
                    f"{', '.join(f'row {i}: {n} tokens' for i, n in long)} (image tokens included), more than "
                    f"max_seq_length={self.max_seq_length}; rows are not truncated (that would cut image tokens): "
                    "shorten them, set image_size smaller, or raise max_seq_length")
        labels = input_ids.clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        if self.image_ids:
            labels[torch.isin(input_ids, torch.tensor(sorted(self.image_ids)))] = IGNORE_INDEX
        if self.markers is not None:
            instruction, response, end_parts = self.markers
            for i, ids in enumerate(input_ids.tolist()):
                mask = torch.tensor(response_mask(ids, self.texts, instruction, response, end_parts), dtype=torch.bool)
                if not mask.any():
                    raise VisionCollatorError(f"row {i}: no assistant answer found (response marker {response!r}); "
                                              "every row needs an assistant message to train on")
                labels[i][~mask] = IGNORE_INDEX
        batch["labels"] = labels
        return self._pack(batch, lengths) if self.packing is not None else batch

    def _pack(self, batch: Any, lengths: list[int]) -> dict[str, torch.Tensor]:
        """One row of the batch's conversations without padding (see the module docstring, point 4)."""
        mask = batch["attention_mask"].bool()
        packed: dict[str, torch.Tensor] = {k: v for k, v in batch.items()
                                           if k not in ("input_ids", "attention_mask", "labels", "mm_token_type_ids",
                                                        "token_type_ids")}
        for key in ("input_ids", "labels", "mm_token_type_ids"):
            if key in batch:
                packed[key] = batch[key][mask].unsqueeze(0)
        text_positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        if self.packing == "mrope":  # the model's own 3-D positions of each (right-padded) row
            positions, _ = self._rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                            image_grid_thw=batch.get("image_grid_thw"),
                                            attention_mask=batch["attention_mask"])
            spatial = torch.cat([positions[:, i, :n] for i, n in enumerate(lengths)], dim=1).unsqueeze(1)
            packed["position_ids"] = torch.cat([text_positions.unsqueeze(0), spatial], dim=0)  # (4, 1, total)
        else:
            packed["position_ids"] = text_positions
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        packed["cu_seq_lens_q"] = packed["cu_seq_lens_k"] = bounds
        packed["max_length_q"] = packed["max_length_k"] = max(lengths)
        return packed


UnslothVisionDataCollator = VisionDataCollator
