"""Image preparation, done once per image: decode, upright (EXIF), RGB, bounded size."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from imgflow.errors import BadInput

# Pillow refuses images over 2x this many pixels and warns above it; we make both an
# error (a decompression bomb is bad input, not something to decode).
DEFAULT_MAX_PIXELS = 20_000 * 20_000


class BadImage(BadInput):
    """The input is not a usable image. Permanent: retrying will not help."""


@dataclass(frozen=True)
class PreparedImage:
    image: Image.Image  # RGB, upright, longest side <= max_size
    original_size: tuple[int, int]
    format: str


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")  # CMYK, L, 1, YCbCr, F ...
    return img


def prepare_image(data: bytes, max_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode ``data`` into an upright RGB image whose longest side is at most ``max_size``,
    keeping the aspect ratio. Raises BadImage with a message that says what is wrong."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard, at our limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"image too large: {width}x{height} pixels (limit {max_pixels} pixels)")
            fmt = img.format or "unknown"
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated: the first frame stands for the image
            # JPEG can decode at 1/2, 1/4, 1/8 scale: huge photos stay cheap.
            if fmt == "JPEG":
                img.draft("RGB", (max_size * 2, max_size * 2))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"image too large, decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage(f"not an image or unsupported format ({len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from exc
    if max(img.size) > max_size:
        img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    if min(img.size) < 1:
        raise BadImage("image has no pixels")
    return PreparedImage(image=img, original_size=(width, height), format=fmt)
