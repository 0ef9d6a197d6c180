"""``FastVisionModel``: the vision-language facade (not implemented yet; the name exists so imports port)."""

from __future__ import annotations

from typing import Any

_MESSAGE = (
    "FastVisionModel.{name}: vision-language fine-tuning is not implemented in this version of fasttune; "
    "use FastLanguageModel for text models"
)


class FastVisionModel:
    """Placeholder for the vision workflow: every call raises NotImplementedError with the reason."""

    @staticmethod
    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_MESSAGE.format(name="from_pretrained"))

    @staticmethod
    def get_peft_model(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_MESSAGE.format(name="get_peft_model"))

    @staticmethod
    def for_inference(model: Any) -> Any:
        raise NotImplementedError(_MESSAGE.format(name="for_inference"))

    @staticmethod
    def for_training(model: Any) -> Any:
        raise NotImplementedError(_MESSAGE.format(name="for_training"))
