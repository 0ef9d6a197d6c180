"""Helpers of the vision tests: drawn images and conversations in Unsloth's layout."""

from __future__ import annotations

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def circle(colour: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((size // 8, size // 8, size - size // 8, size - size // 8), fill=COLOURS[colour])
    return image


def conversation(image, question: str = "What colour is the shape?", answer: str = "red") -> dict:
    """One example in Unsloth's layout: the image inside the user's content."""
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}
