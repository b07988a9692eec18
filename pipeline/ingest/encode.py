"""Validate one raw input and encode it as the stored image, or say why it is quarantined.

Stored images are 8-bit grey (``L``) or ``RGB``. Files already in the target format and mode,
with no EXIF rotation to apply, are stored byte for byte (no generational loss); everything
else is decoded and re-encoded deterministically.

Small images are encoded as uncompressed PNG (deflate level 0) by default: still a standard PNG
that any reader opens, at most a few KB, and about 4x faster to decode than a compressed one,
which is what bounds a loader's images/s when images are tiny.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.ingest.sources.base import Quarantine, Raw

FORMATS = {"png": "PNG", "jpg": "JPEG"}
GREY_MODES = {"1", "L", "LA"}  # alpha is dropped: stored images are L or RGB
COLOUR_MODES = {"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
EXIF_ORIENTATION = 0x0112
SMALL_IMAGE_PIXELS = 64 * 64  # at or below this, "auto" stores PNG uncompressed
DEFAULT_PNG_LEVEL = 6


@dataclass(frozen=True)
class EncodeOptions:
    image_format: str = "png"
    jpeg_quality: int = 95
    max_pixels: int = 40_000_000
    png_level: int | None = None  # zlib level 0-9; None: 0 for small images, else 6

    def png_level_for(self, width: int, height: int) -> int:
        if self.png_level is not None:
            return self.png_level
        return 0 if width * height <= SMALL_IMAGE_PIXELS else DEFAULT_PNG_LEVEL


@dataclass(frozen=True)
class Encoded:
    data: bytes
    ext: str
    width: int
    height: int


def encode_example(raw: Raw, options: EncodeOptions) -> Encoded:
    if isinstance(raw, np.ndarray):
        return _encode_pixels(raw, options)
    return _encode_file(raw, options)


def _encode_pixels(pixels: np.ndarray, options: EncodeOptions) -> Encoded:
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise Quarantine(f"pixel array of dtype {pixels.dtype} and shape {pixels.shape} (need uint8 HxW or HxWx3)")
    return _save(Image.fromarray(pixels), options)


def _encode_file(data: bytes, options: EncodeOptions) -> Encoded:
    if not data:
        raise Quarantine("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Quarantine("not an image (no known image format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Quarantine(f"decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise Quarantine(f"unreadable image header: {error}") from None
    pixels = image.width * image.height
    if pixels > options.max_pixels:
        raise Quarantine(
            f"decompression bomb: {image.width}x{image.height} = {pixels} pixels exceeds "
            f"--max-pixels {options.max_pixels}"
        )
    if image.mode not in GREY_MODES | COLOUR_MODES:
        raise Quarantine(f"unsupported image mode {image.mode}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise Quarantine(f"truncated or corrupt image data: {error}") from None
    rotated = image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    canonical = image.mode in ("L", "RGB")
    if image.format == FORMATS[options.image_format] and canonical and not rotated:
        return Encoded(data, options.image_format, image.width, image.height)
    return _save(ImageOps.exif_transpose(image) if rotated else image, options)


def _save(image: Image.Image, options: EncodeOptions) -> Encoded:
    image = image.convert("L" if image.mode in GREY_MODES else "RGB")
    buffer = io.BytesIO()
    if options.image_format == "png":
        image.save(buffer, format="PNG", compress_level=options.png_level_for(image.width, image.height))
    else:
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return Encoded(buffer.getvalue(), options.image_format, image.width, image.height)
