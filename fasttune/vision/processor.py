"""Load a vision-language model's processor, with or without torchvision.

transformers 5 ships PIL image processors beside the torchvision ones, but a processor whose family also handles
video (Qwen2-VL, Qwen2.5-VL) insists on building its video processor, which needs torchvision, even to process a
single image; and no torchvision wheel matches the CPU torch build this project runs on. :func:`load_processor` uses
``AutoProcessor`` where it works and otherwise builds the same processor class without its video part: the image
processor (PIL backend) and tokenizer come from the folder as usual, and the processor saves to the same files, so
transformers loads the result where torchvision is installed. Videos are then refused with a clear error.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
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
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    image_processor = AutoImageProcessor.from_pretrained(path, **hub)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    kwargs: dict[str, Any] = {}
    template = _read(path, "chat_template.jinja", hub)
    if template is None and (saved := _read(path, "chat_template.json", hub)) is not None:
        template = json.loads(saved)["chat_template"]
    if template is not None:
        kwargs["chat_template"] = template
    return image_only(cls)(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
