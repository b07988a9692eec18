"""Per-example image transforms, run in the loader workers: stored images of any size and shape to
fixed-size uint8 arrays, so batches stack as the equal-size fast path does.

Policies (``--augment``):

* ``none``: no randomness. Equal-size images are decoded as stored and resized on the device (the fast
  path); images of mixed sizes get the evaluation transform.
* ``basic``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, bilinear.
* ``deit``: DeiT's recipe through timm's transform factory: the same crop (bicubic) and flip, then
  RandAugment ``rand-m9-mstd0.5-inc1``; random erasing (0.25, pixel mode) runs on the device, on the
  normalised batch, as timm's prefetching loader does (:func:`device_augmentation`).

Evaluation resizes the short side to ``size / 0.875`` and takes the centre ``size`` square. Every crop
is cut from the stored image before it is resized (one ``Image.resize`` with a box), so a strip or a
huge photo never makes a huge intermediate, and a JPEG is decoded at a reduced scale (PIL's
``draft``: 1/2, 1/4 or 1/8) when the crop still has at least ``size`` pixels a side at that scale.

Randomness is seeded per example from (seed, epoch, key): the same crops whatever the worker, rank or
order, so a run resumed mid-epoch draws exactly what it would have drawn.
"""
from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from shards.decode import DecodeError
from trainer.curriculum import side_of

AUGMENT_POLICIES = ("none", "basic", "deit")
EVAL_CROP_FRACTION = 0.875  # timm's and DeiT's crop_pct: the centre 87.5% of the short side
DEIT_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
DEIT_ERASE_PROBABILITY = 0.25
# timm's increasing posterize keeps 4 - int(0.4 * m) bits: at magnitude 10 (m9 with std 0.5 reaches it on
# about 2% of draws) that is 0 bits, which Pillow 11+ refuses (old Pillow made the image black). The
# magnitude is capped just below 10: such a draw keeps 1 bit; every other op is unchanged to 0.01%.
DEIT_MAGNITUDE_MAX = 9.999
INTERPOLATION = {"none": Image.BILINEAR, "basic": Image.BILINEAR, "deit": Image.BICUBIC}


def example_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed for one example's draws in one epoch."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()[:8], "little") >> 1


@contextmanager
def seeded(seed: int, *, numpy: bool) -> Iterator[None]:
    """Python's and torch's CPU generators (and numpy's when ``numpy``) seeded for a block, then restored:
    timm's crop draws from ``random``, torchvision's flip from torch, RandAugment also from ``numpy``;
    restoring keeps a loader running in the training process (``--loader-workers 0``) from moving the
    training's own draws. Only the CPU generator is touched: ``torch.manual_seed`` would also queue a
    seed for every accelerator (with a stack trace each time, 70 us), and numpy's reseed costs as much,
    so it is done only where a policy draws from numpy."""
    generator = torch.default_generator
    python_state, torch_state = random.getstate(), generator.get_state()
    numpy_state = np.random.get_state() if numpy else None
    random.seed(seed)
    generator.manual_seed(seed)
    if numpy:
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(python_state)
        generator.set_state(torch_state)
        if numpy_state is not None:
            np.random.set_state(numpy_state)


def open_image(data: bytes | memoryview) -> Image.Image:
    """The stored image, opened lazily (its header read: size and format known, pixels not decoded)."""
    try:
        return Image.open(io.BytesIO(bytes(data)))
    except Exception as error:  # noqa: BLE001 - PIL raises many types; all mean "corrupt"
        raise DecodeError(f"not a decodable image ({len(data)} bytes): {error}") from None


def centre_box(width: int, height: int, fraction: float = EVAL_CROP_FRACTION) -> tuple[float, float, float, float]:
    """(top, left, height, width) of the centre square whose side is ``fraction`` of the short side: what
    resizing the short side to ``size / fraction`` and cropping the centre ``size`` square keeps."""
    side = fraction * min(width, height)
    return (height - side) / 2, (width - side) / 2, side, side


def crop_resized(image: Image.Image, box: tuple[float, float, float, float], size: int, resample: int) -> Image.Image:
    """The ``box`` (top, left, height, width) of the stored image, resized to ``size`` x ``size``; a JPEG is
    decoded at the smallest scale that keeps the box at least ``size`` pixels a side."""
    top, left, height, width = box
    if image.format == "JPEG":
        full_width, full_height = image.size
        image.draft(image.mode, (math.ceil(full_width * size / width), math.ceil(full_height * size / height)))
        x_scale, y_scale = image.size[0] / full_width, image.size[1] / full_height
        top, left, height, width = top * y_scale, left * x_scale, height * y_scale, width * x_scale
    try:
        return image.resize((size, size), resample, box=(left, top, left + width, top + height))
    except Exception as error:  # noqa: BLE001 - a truncated or corrupt image fails here, at decode time
        raise DecodeError(f"does not decode: {error}") from None


@dataclass(frozen=True)
class ImageTransform:
    """Stored image bytes to a ``size`` x ``size`` HxWxC uint8 array (pickled into every loader worker)."""

    size: int
    policy: str = "basic"
    train: bool = True
    seed: int = 0
    channels: int = 3
    sides: tuple[int, ...] = ()  # a resolution curriculum's side per epoch (trainer/curriculum.py); (): size always

    def side(self, epoch: int) -> int:
        return side_of(self.sides, epoch, self.size)

    def __post_init__(self) -> None:
        if self.policy not in AUGMENT_POLICIES:
            raise ValueError(f"augmentation policy must be one of {AUGMENT_POLICIES}, not {self.policy!r}")

    @cached_property
    def _random_parts(self) -> tuple:
        """timm's own pieces for this policy, built once per process: the crop (its parameters), the flip,
        RandAugment (deit)."""
        from timm.data import create_transform

        primary, secondary, _ = create_transform(
            self.size, is_training=True, separate=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
            interpolation="bicubic" if self.policy == "deit" else "bilinear",
            auto_augment=DEIT_RAND_AUGMENT if self.policy == "deit" else None)
        crop, flip = primary.transforms
        if self.policy != "deit":
            return crop, flip, None
        for op in secondary.transforms[0].ops:
            op.magnitude_max = DEIT_MAGNITUDE_MAX
        return crop, flip, secondary

    def __call__(self, data: bytes | memoryview, key: str, epoch: int) -> np.ndarray:
        image = open_image(data)
        resample = INTERPOLATION[self.policy]
        if self.train and self.policy != "none":
            crop, flip, rand_augment = self._random_parts
            with seeded(example_seed(self.seed, epoch, key), numpy=rand_augment is not None):
                box = crop.get_params(image, crop.scale, crop.ratio)
                # the flip's own draw (torchvision's: torch.rand(1) < p); the mirror is a view of the pixels
                mirrored = bool(torch.rand(1) < flip.p)
                image = crop_resized(image, box, self.side(epoch), resample)
                if rand_augment is not None:
                    image = rand_augment(image.convert("RGB").transpose(Image.FLIP_LEFT_RIGHT) if mirrored else
                                         image.convert("RGB"))
                    mirrored = False
        else:
            image, mirrored = crop_resized(image, centre_box(*image.size), self.side(epoch), resample), False
        mode = "L" if self.channels == 1 else "RGB"
        pixels = np.asarray(image if image.mode == mode else image.convert(mode))
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        return pixels[:, ::-1] if mirrored else pixels


def device_augmentation(policy: str, device: torch.device) -> torch.nn.Module | None:
    """What runs on the normalised batch on the device: DeiT's random erasing (timm's, per sample)."""
    if policy != "deit":
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(DEIT_ERASE_PROBABILITY, mode="pixel", device=str(device))
