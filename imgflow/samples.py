"""The sample folder `imgflow run` processes when no input is given: real photographs from
scikit-image's data set plus images with rendered text (for the OCR path)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PHOTOS = {"chelsea_cat.png": "chelsea", "coffee.jpg": "coffee", "astronaut.jpg": "astronaut", "rocket.jpg": "rocket"}
TEXTS = {"harbor_ticket.png": ["HARBOR TICKET 2041"], "open_sign.png": ["OPEN 24 HOURS", "FRESH BREAD"]}


def render_text_image(lines: list[str], size: tuple[int, int] = (640, 240)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=40)
    for i, line in enumerate(lines):
        draw.text((30, 40 + 70 * i), line, fill="black", font=font)
    return img


def write_samples(folder: Path) -> Path:
    """Create the sample folder once; existing files are left alone (rewriting them would
    change their mtime and so make them new events)."""
    from skimage import data  # imported here: only the sample folder needs scikit-image

    folder.mkdir(parents=True, exist_ok=True)
    for name, attr in PHOTOS.items():
        target = folder / name
        if not target.exists():
            _atomic_save(Image.fromarray(getattr(data, attr)()), target)
    for name, lines in TEXTS.items():
        target = folder / name
        if not target.exists():
            _atomic_save(render_text_image(lines), target)
    return folder


def _atomic_save(img: Image.Image, target: Path) -> None:
    tmp = target.with_name("." + target.name + ".tmp")  # hidden: the watcher skips it
    img.save(tmp, format=target.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    tmp.replace(target)
