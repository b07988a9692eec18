"""Turning the reader's uint8 batches into model inputs (shared by training and scoring)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare(images: torch.Tensor, img_size: int, device: torch.device) -> torch.Tensor:
    """uint8 NCHW to normalised float on the device, resized when the model wants another size."""
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return x
