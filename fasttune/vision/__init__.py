"""Vision-language fine-tuning: ``FastVisionModel``, processor loading, selective LoRA, the image-text collator."""

from .collator import UnslothVisionDataCollator, VisionDataCollator, load_image
from .facade import FastVisionModel

__all__ = ["FastVisionModel", "UnslothVisionDataCollator", "VisionDataCollator", "load_image"]
