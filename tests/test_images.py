"""Image preparation: decode once, upright, RGB, longest side <= IMAGE_MAX_SIZE."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imgflow.images import BadImage, prepare_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_rotated_jpeg_comes_out_upright():
    img = Image.new("RGB", (200, 100), "blue")
    img.paste((255, 0, 0), (0, 0, 100, 100))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    prepared = prepare_image(encode(img, "JPEG", exif=exif, quality=95), 384)
    assert prepared.image.size == (100, 200)
    top, bottom = prepared.image.getpixel((50, 20)), prepared.image.getpixel((50, 180))
    assert top[0] > 200 and top[2] < 60, top  # the red half is on top now
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize("size,expected", [((4000, 3000), (384, 288)), ((300, 1200), (96, 384)), ((100, 50), (100, 50)), ((1, 1), (1, 1))])
def test_longest_side_bounded_aspect_kept(size, expected):
    prepared = prepare_image(encode(Image.new("RGB", size, "green"), "PNG"), 384)
    assert prepared.image.size == expected and prepared.image.mode == "RGB"
    assert prepared.original_size == size


def test_huge_jpeg_is_decoded_cheaply_and_bounded():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (6000, 8000, 3), dtype=np.uint8))
    prepared = prepare_image(encode(big, "JPEG", quality=70), 384)
    assert max(prepared.image.size) == 384 and prepared.original_size == (8000, 6000)


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused():
    with pytest.raises(BadImage, match="too large"):
        prepare_image(png_header_only(100_000, 100_000), 384)


@pytest.mark.parametrize("data,message", [(b"", "empty"), (b"hello, I am text" * 10, "not an image"), (None, "truncated")])
def test_bad_bytes(data, message):
    if data is None:
        data = encode(Image.new("RGB", (300, 300), "red"), "JPEG")[:400]
    with pytest.raises(BadImage, match=message):
        prepare_image(data, 384)


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("I;16", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "GIF"), ("L", "JPEG"), ("1", "PNG")])
def test_modes_become_rgb(mode, fmt):
    img = Image.new(mode, (64, 48))
    prepared = prepare_image(encode(img, fmt), 384)
    assert prepared.image.mode == "RGB" and prepared.image.size == (64, 48)


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.full((10, 10), 32768, dtype=np.uint16)  # mid grey in 16 bits
    prepared = prepare_image(encode(Image.fromarray(arr), "PNG"), 384)
    assert 120 <= prepared.image.getpixel((5, 5))[0] <= 135


def test_transparent_png_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert prepare_image(encode(img, "PNG"), 384).image.getpixel((5, 5)) == (255, 255, 255)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue", "green")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    pixel = prepare_image(buf.getvalue(), 384).image.getpixel((10, 10))
    assert pixel[0] > 200 and pixel[2] < 50


def _decode_batch(kind: str, count: int) -> dict:
    """The vision stage reading a batch of ``count`` large files, in a process of its own."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tests.decode_memory", kind, str(count)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_48_kb_png_of_400_megapixels_is_an_error_row_without_being_decoded():
    """20,000 x 20,000 one-bit pixels (48 KB): decoding it took 1.9 GB. It is refused from
    its header by models.image_max_pixels, the whole batch of them costing next to nothing."""
    result = _decode_batch("bomb", 4)
    assert len(result["errors"]) == 4
    for error in result["errors"]:
        assert "image too large: 20000x20000 pixels" in error and "models.image_max_pixels" in error
    assert result["peak_above_start_mb"] < 50  # one decode would be 400 MB


def test_a_batch_of_large_corrupt_images_costs_one_image_of_memory():
    """Each 64 MP PNG is allocated in full, then fails half-way: a batch must not keep the
    failed decodes (in their exceptions' frames) alive, so four cost what one does."""
    one, four = _decode_batch("truncated", 1), _decode_batch("truncated", 4)
    assert all("truncated" in e for e in one["errors"] + four["errors"]) and len(four["errors"]) == 4
    assert one["peak_above_start_mb"] > 10  # the decode did allocate
    assert four["peak_above_start_mb"] < 1.5 * one["peak_above_start_mb"]


def test_the_pixel_limit_is_a_setting_and_a_jpeg_counts_at_its_decoded_scale():
    from imgflow.settings import Settings

    assert Settings().models.image_max_pixels == 120_000_000
    png = encode(Image.new("RGB", (1000, 1000), "green"), "PNG")
    with pytest.raises(BadImage, match=r"1000x1000 pixels \(limit 999999 pixels, models.image_max_pixels\)"):
        prepare_image(png, 384, max_pixels=999_999)
    assert prepare_image(png, 384, max_pixels=1_000_000).original_size == (1000, 1000)
    # A JPEG decodes at 1/8 for 32 px (125 x 125): its 1 MP is not what it costs; at 1/2 for
    # 250 px (500 x 500): 250,000 pixels to decode.
    jpeg = encode(Image.new("RGB", (1000, 1000), "green"), "JPEG")
    assert prepare_image(jpeg, 32, max_pixels=20_000).original_size == (1000, 1000)
    assert prepare_image(jpeg, 250, max_pixels=250_000).image.size == (250, 250)
    with pytest.raises(BadImage, match="500x500 at the smallest scale it decodes at"):
        prepare_image(jpeg, 250, max_pixels=200_000)
