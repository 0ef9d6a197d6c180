"""Vision-language fine-tuning: ``FastVisionModel``, processor loading, selective LoRA, the image-text collator."""

from .facade import FastVisionModel

__all__ = ["FastVisionModel"]
