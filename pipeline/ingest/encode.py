"""Validate one raw input and encode it as the stored image, or say why it is quarantined.

Stored images are 8-bit grey (``L``) or ``RGB``. With ``image_format="auto"`` (the default) a PNG,
JPEG or WebP file is stored as it came, byte for byte with its own extension (no generational
loss, no growth), unless it needs a change: another mode (CMYK, palette, alpha, 1-bit...), an EXIF
orientation to apply, several frames, or a resize. Then it is decoded and re-encoded, in its own
format (JPEG at ``jpeg_quality``; WebP lossless when the source was, else lossy at ``jpeg_quality``)
or, for any other format (BMP, GIF, TIFF...), as PNG. Pixel arrays (digits, mnist5k, cifar,
synthetic) are stored as PNG. An explicit ``image_format`` (``png`` or ``jpg``) re-encodes every
input not already in that format. Every encoding is deterministic: the same input and options give
the same bytes.

Resizing (img2dataset's idea): ``max-side N`` downscales so the longer side is N (aspect kept,
never upscaled); ``center-crop N`` downscales so the shorter side is N, then keeps the centre N x N;
an image with a side under N is not upscaled: its centre, at most N x N, is kept (a 1x4000 strip
becomes 1xN). Resampling is Lanczos; a JPEG source is first decoded at 1/2, 1/4 or 1/8 scale by libjpeg
(``draft``) when that still leaves at least twice the target size (Pillow's ``thumbnail`` does the same,
``reducing_gap=2``): several times faster on large photos, as deterministic, and within a grey level or so
of a full-size decode.

Small images are encoded as uncompressed PNG (deflate level 0) by default: still a standard PNG
that any reader opens, at most a few KB, and about 4x faster to decode than a compressed one,
which is what bounds a loader's images/s when images are tiny.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.ingest.sources.base import Quarantine, Raw

IMAGE_FORMATS = ("auto", "png", "jpg")  # what --image-format accepts
RESIZE_MODES = ("none", "max-side", "center-crop")
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp"}  # PIL format -> stored extension
GREY_MODES = {"1", "L", "LA"}  # alpha is dropped: stored images are L or RGB
COLOUR_MODES = {"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # width and height swap when applied
SMALL_IMAGE_PIXELS = 64 * 64  # at or below this, PNGs are stored uncompressed by default
DEFAULT_PNG_LEVEL = 6
DRAFT_GAP = 2  # a JPEG draft leaves at least this many times the target size for Lanczos


@dataclass(frozen=True)
class EncodeOptions:
    image_format: str = "auto"
    jpeg_quality: int = 95  # re-encoded JPEG and lossy WebP
    max_pixels: int = 40_000_000
    png_level: int | None = None  # zlib level 0-9; None: 0 for small images, else 6
    resize_mode: str = "none"
    max_side: int | None = None

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {self.image_format!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.resize_mode == "none" and self.max_side is not None:
            raise ValueError("max_side is set but resize_mode is 'none'")
        if self.resize_mode != "none" and (self.max_side is None or self.max_side < 1):
            raise ValueError(f"resize_mode {self.resize_mode!r} needs max_side >= 1, not {self.max_side!r}")

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
    original_width: int  # the input's size, after EXIF orientation, before any resize
    original_height: int


@dataclass(frozen=True)
class Resize:
    """Cut ``box`` (left, top, right, bottom, in upright source pixels) and make it ``size``."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def resamples(self) -> bool:
        return self.size != (self.box[2] - self.box[0], self.box[3] - self.box[1])


def resize_plan(width: int, height: int, options: EncodeOptions) -> Resize | None:
    """What the resize options do to a ``width`` x ``height`` image; None: nothing (never upscaled)."""
    side = options.max_side
    if options.resize_mode == "max-side":
        longer = max(width, height)
        if longer <= side:
            return None
        size = (max(1, _round_ratio(width * side, longer)), max(1, _round_ratio(height * side, longer)))
        return Resize(size, (0, 0, width, height))
    if options.resize_mode == "center-crop":
        shorter = min(width, height)
        if shorter > side:  # the centre square, scaled to side x side
            left, top = (width - shorter) // 2, (height - shorter) // 2
            return Resize((side, side), (left, top, left + shorter, top + shorter))
        if width <= side and height <= side:
            return None
        crop = (min(width, side), min(height, side))  # a side shorter than N stays as it is
        left, top = (width - crop[0]) // 2, (height - crop[1]) // 2
        return Resize(crop, (left, top, left + crop[0], top + crop[1]))
    return None


def _round_ratio(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, in integers (no float ties)."""
    return (2 * numerator + denominator) // (2 * denominator)


def encode_example(raw: Raw, options: EncodeOptions) -> Encoded:
    if isinstance(raw, np.ndarray):
        return _encode_pixels(raw, options)
    return _encode_file(raw, options)


def _encode_pixels(pixels: np.ndarray, options: EncodeOptions) -> Encoded:
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise Quarantine(f"pixel array of dtype {pixels.dtype} and shape {pixels.shape} (need uint8 HxW or HxWx3)")
    image = Image.fromarray(pixels)
    original = image.size
    plan = resize_plan(*original, options)
    if plan is not None:
        image = _resize(image, plan, original)
    ext = "png" if options.image_format == "auto" else options.image_format
    return _save(image, ext, options, original)


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
    source_format = image.format
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)  # reading a PNG's EXIF loads it
        rotated = orientation in range(2, 9)
        upright = image.size[::-1] if orientation in TRANSPOSED_ORIENTATIONS else image.size
        plan = resize_plan(*upright, options)
        if plan is not None and plan.resamples and source_format in ("JPEG", "MPO"):
            _draft(image, plan, upright, transposed=orientation in TRANSPOSED_ORIENTATIONS)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise Quarantine(f"truncated or corrupt image data: {error}") from None
    own_ext = KEPT_FORMATS.get(source_format)
    ext = (own_ext or "png") if options.image_format == "auto" else options.image_format
    single_frame = getattr(image, "n_frames", 1) == 1 or source_format == "MPO"  # MPO: a JPEG plus previews
    if ext == own_ext and image.mode in ("L", "RGB") and not rotated and plan is None and single_frame:
        return Encoded(data, ext, image.width, image.height, *upright)
    if rotated:
        image = ImageOps.exif_transpose(image)
    if plan is not None:
        image = _resize(image, plan, upright)
    lossless = source_format == "WEBP" and _webp_is_lossless(data)
    return _save(image, ext, options, upright, lossless_webp=lossless)


def _draft(image: Image.Image, plan: Resize, upright: tuple[int, int], *, transposed: bool) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the box still comes out at least ``DRAFT_GAP``
    times ``plan.size`` (decoding right down to the target size is faster still but visibly softer)."""
    box_width, box_height = plan.box[2] - plan.box[0], plan.box[3] - plan.box[1]
    wanted = (math.ceil(upright[0] * plan.size[0] * DRAFT_GAP / box_width),
              math.ceil(upright[1] * plan.size[1] * DRAFT_GAP / box_height))
    image.draft(None, wanted[::-1] if transposed else wanted)


def _resize(image: Image.Image, plan: Resize, upright: tuple[int, int]) -> Image.Image:
    """Apply ``plan`` (made for an ``upright``-sized image) to ``image``, which a JPEG draft may have shrunk."""
    image = _canonical(image)
    if not plan.resamples:
        return image.crop(plan.box)
    scale_x, scale_y = image.width / upright[0], image.height / upright[1]
    left, top, right, bottom = plan.box
    box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return image.resize(plan.size, Image.Resampling.LANCZOS, box=box, reducing_gap=None)


def _canonical(image: Image.Image) -> Image.Image:
    mode = "L" if image.mode in GREY_MODES else "RGB"
    if image.mode in ("P", "PA"):  # the same colours; through RGBA Pillow does not warn about transparency
        image = image.convert("RGBA")
    return image if image.mode == mode else image.convert(mode)


def _webp_is_lossless(data: bytes) -> bool:
    """Whether a WebP file's image is a lossless (``VP8L``) bitstream, by walking its RIFF chunks."""
    position = 12
    while position + 8 <= len(data):
        chunk, size = data[position:position + 4], int.from_bytes(data[position + 4:position + 8], "little")
        if chunk in (b"VP8L", b"VP8 "):
            return chunk == b"VP8L"
        position += 8 + size + (size & 1)
    return False


def _save(image: Image.Image, ext: str, options: EncodeOptions, original: tuple[int, int], *,
          lossless_webp: bool = False) -> Encoded:
    image = _canonical(image)
    buffer = io.BytesIO()
    if ext == "png":
        image.save(buffer, format="PNG", compress_level=options.png_level_for(image.width, image.height))
    elif ext == "jpg":
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    elif lossless_webp:
        image.save(buffer, format="WEBP", lossless=True)
    else:
        image.save(buffer, format="WEBP", quality=options.jpeg_quality)
    return Encoded(buffer.getvalue(), ext, image.width, image.height, *original)
