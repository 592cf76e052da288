"""Image preparation, done once per image: decode, upright (EXIF), RGB, bounded size."""

from __future__ import annotations

import io
import logging
import posixpath
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imgflow.errors import BadInput
from imgflow.settings import ModelSettings

log = logging.getLogger(__name__)

# models.image_max_pixels' default (imgflow/settings.py says why 120 MP).
DEFAULT_MAX_PIXELS = ModelSettings.model_fields["image_max_pixels"].default
# A JPEG is decoded at down to 1/8 of its size (draft), so one may have up to 64x the limit
# in its header; Pillow's own bomb check (a warning above, an error above twice this) is
# set there and both are refused.
_JPEG_DRAFT_SCALE = 8


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


def _shrink(img: Image.Image, max_size: int) -> Image.Image:
    """The decoded image reduced to at most ``max_size`` a side in its own mode, before any
    copy (upright, RGB) is made: a large image costs its decoded size once, not three times."""
    if max(img.size) <= max_size:
        return img
    if img.mode == "1":
        img = img.convert("L")  # same bytes per pixel; "1" resizes only by nearest neighbour
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    try:
        img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    except ValueError:  # a mode Pillow cannot resample (16-bit ...): reduced once RGB below
        pass
    return img


def prepare_image(data: bytes, max_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode ``data`` into an upright RGB image whose longest side is at most ``max_size``,
    keeping the aspect ratio. An image with more than ``max_pixels`` to decode
    (models.image_max_pixels) is refused from its header. Raises BadImage with a message
    that says what is wrong."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels * _JPEG_DRAFT_SCALE**2  # Pillow's own guard, above ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            fmt = img.format or "unknown"
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated: the first frame stands for the image
            # JPEG can decode at 1/2, 1/4, 1/8 scale: huge photos stay cheap.
            if fmt == "JPEG":
                img.draft("RGB", (max_size * 2, max_size * 2))
            decoded = img.size[0] * img.size[1]
            if decoded > max_pixels:
                scaled = f", {img.size[0]}x{img.size[1]} at the smallest scale it decodes at" if img.size != (width, height) else ""
                raise BadImage(f"image too large: {width}x{height} pixels{scaled} (limit {max_pixels} pixels, models.image_max_pixels): refused undecoded")
            img.load()
            upright = ImageOps.exif_transpose(_shrink(img, max_size))
            rgb = _to_rgb(upright)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"image too large, decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage(f"not an image or unsupported format ({len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from exc
    if max(rgb.size) > max_size:
        rgb.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    if min(rgb.size) < 1:
        raise BadImage("image has no pixels")
    return PreparedImage(image=rgb, original_size=(width, height), format=fmt)


class ImageSource:
    """Reads the bytes of an event's image, local or S3, under the same rules: only below
    ``allowed_roots`` (folders) / ``s3.allowed_prefixes`` (s3://BUCKET/PREFIX), at most
    ``models.image_max_bytes``. Problems with the input itself raise BadImage (an error row,
    no retry); a store that is down raises S3Error (retried by the stage loop)."""

    def __init__(self, settings) -> None:
        from imgflow.s3 import parse_s3_uri

        self.settings = settings
        self.max_bytes = settings.models.image_max_bytes
        self.roots = [Path(r).resolve() for r in settings.allowed_roots]
        try:
            self.prefixes = [parse_s3_uri(p) for p in settings.s3.allowed_prefixes]
        except ValueError as exc:
            from imgflow.errors import StageConfigError

            raise StageConfigError(f"s3.allowed_prefixes (IMGFLOW_S3__ALLOWED_PREFIXES): {exc}") from None
        self._client = None

    def check(self) -> None:
        """At start-up: a prefix that cannot be read for a reason a retry will not fix (wrong
        credentials, missing bucket) stops the stage with the setting to fix, instead of every
        image becoming an error row; a store that is down is only a warning."""
        from imgflow.errors import StageConfigError
        from imgflow.s3 import S3Error, check_location, s3_client

        for prefix in self.prefixes:
            try:
                if self._client is None:
                    self._client = s3_client(self.settings)
                check_location(self._client, prefix)
            except S3Error as exc:
                if not exc.retriable:
                    raise StageConfigError(f"s3.allowed_prefixes: {exc}") from None
                log.warning("%s (images there are retried when read)", exc)

    def read(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            return self.read_s3(uri)
        if uri.startswith("file://"):
            return self.read_file(uri)
        raise BadImage(f"unsupported image URI {uri!r}")

    def read_file(self, uri: str) -> bytes:
        from imgflow.events import path_from_uri

        try:
            path = path_from_uri(uri)
            resolved = path.resolve()
        except ValueError as exc:
            raise BadImage(f"unsupported image URI {uri!r}") from exc
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            raise BadImage(f"cannot resolve {uri}: {exc}") from exc
        if self.roots and not any(resolved.is_relative_to(root) for root in self.roots):
            roots = [str(r) for r in self.roots]
            if resolved != path.absolute():
                what = "is a symbolic link to" if path.is_symlink() else "leads through a symbolic link to"
                raise BadImage(
                    f"refused: {path} {what} {resolved}, which is outside the allowed roots {roots} "
                    f"(a link in a watched folder must not make a file outside it readable)"
                )
            raise BadImage(f"refused: {path} is outside the allowed roots {roots}")
        try:
            st = resolved.stat()
            if not stat.S_ISREG(st.st_mode):
                raise BadImage(f"not a regular file: {path}")
            if st.st_size > self.max_bytes:
                raise BadImage(f"file too large: {st.st_size} bytes (limit models.image_max_bytes = {self.max_bytes})")
            with open(resolved, "rb") as f:
                return f.read(self.max_bytes + 1)
        except FileNotFoundError as exc:
            raise BadImage(f"file not found: {path}") from exc
        except PermissionError as exc:
            raise BadImage(f"permission denied reading {path}") from exc
        except OSError as exc:
            raise BadImage(f"cannot read {path}: {exc.strerror or exc}") from exc

    def allowed(self, bucket: str, key: str) -> bool:
        # A key is a name, not a path: "a/../b" is its own object on S3. It is still refused when
        # read as a path it would leave the prefix, so no store that normalises paths can be
        # made to serve another object.
        normalised = posixpath.normpath("/" + key).lstrip("/")
        return not self.prefixes or any(bucket == p.bucket and key.startswith(p.key) and normalised.startswith(p.key) for p in self.prefixes)

    def read_s3(self, uri: str) -> bytes:
        from imgflow.s3 import parse_s3_uri, read_object

        loc = parse_s3_uri(uri)
        if not self.allowed(loc.bucket, loc.key):
            raise BadImage(f"refused: {uri} is outside the allowed S3 prefixes {[p.uri for p in self.prefixes]} (s3.allowed_prefixes)")
        if self._client is None:
            from imgflow.s3 import s3_client

            self._client = s3_client(self.settings)
        from imgflow.s3 import S3Error

        deadline = time.monotonic() + self.settings.s3.outage_retry_s
        delay = 0.5
        while True:
            try:
                return read_object(self._client, loc.bucket, loc.key, self.max_bytes)
            except S3Error as exc:
                # A store that is down or restarting: wait for it (s3.outage_retry_s) rather
                # than fail images that are fine.
                if not exc.retriable or time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
