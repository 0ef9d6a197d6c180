"""Load a vision-language model's processor, with or without torchvision.

transformers 5 ships PIL image processors beside the torchvision ones, but a processor whose family also handles
video (Qwen2-VL, Qwen2.5-VL) insists on building its video processor, which needs torchvision, even to process a
single image; and no torchvision wheel matches the CPU torch build this project runs on. :func:`load_processor` uses
``AutoProcessor`` where it works and otherwise builds the same processor class without its video part: the image
processor (PIL backend) and tokenizer come from the folder as usual, and the processor saves to the same files, so
transformers loads the result where torchvision is installed. Videos are then refused with a clear error.

Notebooks written for a tokenizer use what ``FastModel`` returns as one, and for a multimodal checkpoint that is a
processor: Unsloth's Gemma 3 notebook decodes labels with ``tokenizer.pad_token_id`` / ``tokenizer.pad_token`` (which
transformers' processors lack) and calls ``tokenizer([text], return_tensors="pt")`` (which transformers 5 reads as
images: the first parameter of a processor's call is ``images``; transformers 4 swapped such arguments back). The
processors returned here read and write those names on their tokenizer and take text given first as text
(:func:`tokenizer_compatible`).
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin
from transformers.utils import cached_file, is_torchvision_available

VIDEO_ATTRIBUTE = "video_processor"


@functools.cache
def image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` without its video processor (same name, so its saved files name the original class)."""
    if VIDEO_ATTRIBUTE not in processor_class.get_attributes():
        return processor_class

    def get_attributes(cls) -> list[str]:
        return [a for a in processor_class.get_attributes() if a != VIDEO_ATTRIBUTE]

    def call(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(f"videos: {type(self).__name__} was built without a video processor (torchvision is not "
                             "installed); pass images, or install torchvision to train on videos")
        return processor_class.__call__(self, images=images, text=text, **kwargs)

    namespace = {"get_attributes": classmethod(get_attributes), "__call__": call,
                 "__module__": processor_class.__module__, "__qualname__": processor_class.__qualname__,
                 "fasttune_image_only": True}
    return type(processor_class.__name__, (processor_class,), namespace)


def _on_tokenizer(name: str) -> property:
    def get(self: ProcessorMixin) -> Any:
        return getattr(self.tokenizer, name)

    def set_(self: ProcessorMixin, value: Any) -> None:
        setattr(self.tokenizer, name, value)

    return property(get, set_, doc=f"The tokenizer's ``{name}``.")


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                      and all(isinstance(v, str) for v in value))


@functools.cache
def tokenizer_compatible(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` usable where a notebook expects its tokenizer (see the module docstring): the special-token
    names (``pad_token``, ``pad_token_id``, ``eos_token``, ...; those the class does not define itself) are its
    tokenizer's, and text passed as the first argument with no ``text=`` is text. Same name, so its saved files name
    the original class; it pickles as the original class plus these names."""
    names = [n for token in PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES for n in (token, f"{token}_id")
             if not hasattr(processor_class, n)]

    def call(self, images=None, text=None, *args, **kwargs):
        if text is None and _is_text(images):  # processor([text]) as written for a tokenizer
            images, text = None, images
        return processor_class.__call__(self, images, text, *args, **kwargs)

    namespace: dict[str, Any] = {n: _on_tokenizer(n) for n in names}
    if list(inspect.signature(processor_class.__call__).parameters)[1:3] == ["images", "text"]:
        namespace["__call__"] = call
    namespace.update(__reduce__=_reduce, __module__=processor_class.__module__,
                     __qualname__=processor_class.__qualname__)
    return type(processor_class.__name__, (processor_class,), namespace)


def _reduce(processor: ProcessorMixin) -> tuple:
    """Pickle as transformers' class (importable by name) plus whether it was image-only; see :func:`_rebuild`."""
    original = next(c for c in type(processor).__mro__ if c.__dict__.get("__reduce__") is not _reduce
                    and "fasttune_image_only" not in c.__dict__)
    image = any("fasttune_image_only" in c.__dict__ for c in type(processor).__mro__)
    return _rebuild, (original, image, processor.__dict__)


def _rebuild(original: type[ProcessorMixin], image: bool, state: dict[str, Any]) -> ProcessorMixin:
    cls = tokenizer_compatible(image_only(original) if image else original)
    processor = cls.__new__(cls)
    processor.__dict__.update(state)
    return processor


def _read(path: str, filename: str, hub: dict[str, Any]) -> str | None:
    """Text of ``filename`` in a folder or Hub repo, or None when it has no such file."""
    local = cached_file(path, filename, token=hub.get("token"), revision=hub.get("revision"),
                        _raise_exceptions_for_missing_entries=False)
    if local is None:
        return None
    with open(local, encoding="utf-8") as f:
        return f.read()


def processor_class_name(path: str, **hub: Any) -> str | None:
    """The ``processor_class`` that ``path``'s processor or preprocessor config names (None: not a processor)."""
    for filename in ("processor_config.json", "preprocessor_config.json"):
        text = _read(path, filename, hub)
        if text is not None and json.loads(text).get("processor_class"):
            return json.loads(text)["processor_class"]
    return None


def load_processor(path: str, token: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> ProcessorMixin:
    """The processor of the vision-language model at ``path`` (a folder or Hub id); see the module docstring."""
    hub = dict(token=token, revision=revision)
    name = processor_class_name(path, **hub)
    if name is None:
        raise ValueError(f"model_name: {path!r} has no processor config (processor_config.json or "
                         "preprocessor_config.json naming a processor_class), so it is not a vision-language model "
                         "folder; load text models with FastLanguageModel")
    cls = getattr(transformers, name, None)
    if cls is None or is_torchvision_available() or VIDEO_ATTRIBUTE not in cls.get_attributes():
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
        processor.__class__ = tokenizer_compatible(type(processor))  # this instance only
        return processor
    image_processor = AutoImageProcessor.from_pretrained(path, **hub)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    kwargs: dict[str, Any] = {}
    template = _read(path, "chat_template.jinja", hub)
    if template is None and (saved := _read(path, "chat_template.json", hub)) is not None:
        template = json.loads(saved)["chat_template"]
    if template is not None:
        kwargs["chat_template"] = template
    return tokenizer_compatible(image_only(cls))(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
