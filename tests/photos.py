"""Real photographs for the tests: crops of the two photos that ship with scikit-learn
(``load_sample_images``: a temple in China and a flower, 427x640), cut to many sizes and aspect ratios
and saved in the modes people's folders hold: RGB and grey JPEG, CMYK JPEG, EXIF-rotated JPEG, RGB,
RGBA, grey and palette PNG, and WebP."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("china", "flower")
EXIF_ORIENTATION = 0x0112
# (mode to save, format): cycled over the crops, so every folder holds each kind
KINDS = (("RGB", "JPEG"), ("RGB", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
         ("RGB", "JPEG-rotated"), ("L", "PNG"), ("RGB", "WEBP"))
EXTENSIONS = {"JPEG": "jpg", "JPEG-rotated": "jpg", "PNG": "png", "WEBP": "webp"}


def sample_photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    return dict(zip(CLASSES, load_sample_images().images))


def photo_bytes(pixels: np.ndarray, mode: str, kind: str) -> bytes:
    image = Image.fromarray(pixels)
    image = image.convert("RGBA").convert("P") if mode == "P" else image.convert(mode)
    buffer = io.BytesIO()
    if kind == "JPEG-rotated":  # stored sideways with the EXIF tag that says so (as phones do)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=90, exif=exif)
    elif kind == "JPEG":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format=kind)
    return buffer.getvalue()


def crops(count: int, rng: np.random.Generator, min_side: int, max_side: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) boxes inside a 427x640 photo, sides in [min_side, max_side], aspect
    ratios from 1:3 to 3:1."""
    boxes = []
    for _ in range(count):
        height = int(rng.integers(min_side, min(max_side, 427) + 1))
        ratio = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
        width = int(np.clip(round(height * ratio), min_side, min(max_side, 640)))
        boxes.append((int(rng.integers(0, 427 - height + 1)), int(rng.integers(0, 640 - width + 1)), height, width))
    return boxes


def photo_folder(root: Path, per_class: dict[str, int], *, min_side: int = 24, max_side: int = 400,
                 seed: int = 0) -> dict[str, bytes]:
    """``root/<split>/<class>/<name>`` with ``per_class[split]`` crops of each class's photo; returns
    {relative path: file bytes}. The same arguments always give the same files."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    written = {}
    for split, count in per_class.items():
        for name, photo in photos.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number, (top, left, height, width) in enumerate(crops(count, rng, min_side, max_side)):
                mode, kind = KINDS[number % len(KINDS)]
                data = photo_bytes(photo[top:top + height, left:left + width], mode, kind)
                path = folder / f"{name}-{number:03d}.{EXTENSIONS[kind]}"
                path.write_bytes(data)
                written[path.relative_to(root).as_posix()] = data
    return written
