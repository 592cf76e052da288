"""The images a page shows, read only through ``ImageSource`` (the vision stage's rules:
``allowed_roots``, ``s3.allowed_prefixes``, symlinks resolved, ``models.image_max_bytes``),
and their thumbnails, cached on disk per event_id. With no allowed folder or prefix
configured (nor ``--allow``) no image is read at all: a web server, unlike a stage, must
not read "anywhere" by default.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from imgflow.errors import BadInput
from imgflow.events import path_from_uri
from imgflow.images import BadImage, ImageSource, prepare_image
from imgflow.s3 import S3Error, parse_s3_uri

THUMB_SIZE = 256  # longest side of a thumbnail, pixels
THUMB_QUALITY = 82
# What a browser shows as it is; other formats Pillow reads are sent re-encoded as JPEG.
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
PLACEHOLDER_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="256" height="192" viewBox="0 0 256 192">'
    b'<rect width="256" height="192" fill="#e4e4e7"/>'
    b'<path d="M88 124l28-36 22 26 14-16 22 26z" fill="#a1a1aa"/><circle cx="160" cy="74" r="10" fill="#a1a1aa"/>'
    b'<text x="128" y="168" font-family="sans-serif" font-size="14" fill="#52525b" text-anchor="middle">'
    b"image not available</text></svg>"
)


class ImageUnavailable(Exception):
    """The row is there, its image cannot be shown (refused, missing, not an image, store down)."""


class ServedImages:
    """Reads images under the rules; makes and caches thumbnails in ``thumbs``."""

    def __init__(self, settings, thumbs: Path) -> None:
        self.settings = settings
        # A page must not hang for s3.outage_retry_s on a store that is down: a placeholder now.
        quick = settings.model_copy(deep=True)
        quick.s3.outage_retry_s = 0.0
        self.source = ImageSource(quick)
        self.allowed = bool(self.source.roots or self.source.prefixes)
        self.thumbs = thumbs

    def _read(self, uri: str) -> bytes:
        if not self.allowed:
            raise ImageUnavailable("no allowed folder or prefix (allowed_roots, s3.allowed_prefixes, --allow)")
        try:
            return self.source.read(uri)
        except (BadInput, S3Error) as exc:
            raise ImageUnavailable(str(exc)) from None

    def _may_read(self, uri: str) -> bool:
        """Whether the rules still allow ``uri`` (a cached thumbnail is not served past them)."""
        if not self.allowed:
            return False
        try:
            if uri.startswith("s3://"):
                loc = parse_s3_uri(uri)
                return self.source.allowed(loc.bucket, loc.key)
            resolved = path_from_uri(uri).resolve()
        except (ValueError, OSError, RuntimeError):
            return False
        return not self.source.roots or any(resolved.is_relative_to(r) for r in self.source.roots)

    def thumbnail(self, event_id: str, uri: str) -> bytes:
        cached = self.thumbs / f"{event_id}.jpg"
        if cached.exists() and self._may_read(uri):
            return cached.read_bytes()
        data = self._read(uri)
        try:
            prepared = prepare_image(data, THUMB_SIZE, self.settings.models.image_max_pixels)
        except BadImage as exc:
            raise ImageUnavailable(str(exc)) from None
        buf = io.BytesIO()
        prepared.image.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
        self.thumbs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.thumbs, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, cached)  # whole or not at all; made once per event_id (its content version)
        return buf.getvalue()

    def image(self, uri: str) -> tuple[bytes, str]:
        """The image as a browser shows it, and its media type."""
        from PIL import Image, UnidentifiedImageError

        data = self._read(uri)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageUnavailable(f"not an image: {exc}") from None
        if fmt in BROWSER_FORMATS:
            return data, BROWSER_FORMATS[fmt]
        try:
            prepared = prepare_image(data, 4096, self.settings.models.image_max_pixels)
        except BadImage as exc:
            raise ImageUnavailable(str(exc)) from None
        buf = io.BytesIO()
        prepared.image.save(buf, "JPEG", quality=90)
        return buf.getvalue(), "image/jpeg"
