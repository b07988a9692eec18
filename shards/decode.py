"""Image bytes to a uint8 CxHxW tensor.

OpenCV decodes small PNG/JPEG images about 1.6x faster than PIL (no per-image Python object
overhead) and, unlike torchvision's decoder, it reports corrupt data instead of crashing the
process (torchvision 0.29's decode_png segfaults on a corrupt IDAT chunk).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

cv2.setNumThreads(1)  # decoding runs in DataLoader workers; keep OpenCV from spawning more threads
_NO_ROTATION = cv2.IMREAD_IGNORE_ORIENTATION  # same pixels as PIL and webdataset see
READ_FLAGS = {
    None: cv2.IMREAD_ANYCOLOR | _NO_ROTATION,
    1: cv2.IMREAD_GRAYSCALE | _NO_ROTATION,
    3: cv2.IMREAD_COLOR | _NO_ROTATION,
}
TO_RGB = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}


class DecodeError(ValueError):
    """Bytes that are not a decodable image."""


def decode_image(data: bytes | bytearray | memoryview, channels: int | None = None) -> torch.Tensor:
    if channels not in READ_FLAGS:
        raise ValueError(f"channels must be 1, 3 or None, not {channels!r}")
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), READ_FLAGS[channels])
    if pixels is None:
        raise DecodeError(f"not a decodable image ({len(data)} bytes)")
    if pixels.ndim == 2:
        return torch.from_numpy(pixels).unsqueeze(0)
    return torch.from_numpy(cv2.cvtColor(pixels, TO_RGB[pixels.shape[2]])).permute(2, 0, 1)
