"""The RGB image every model's preprocessing expects."""

from __future__ import annotations

from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")
