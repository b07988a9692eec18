"""What the model is fed: the dataset's image sizes and the defaults they decide (input side,
augmentation), the per-example transforms for the reader, and the batch on the device."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from shards import STATUS_OK, read_index, read_manifest
from shards.urls import Location
from trainer.augment import ImageTransform
from trainer.config import TrainConfig

PHOTO_SIDE = 224  # the input side for images of mixed sizes, as for ImageNet
SMALL_SIDE = 128  # equal-size images below this side train as stored, without augmentation, by default
HALF = (0.5, 0.5, 0.5)  # onion's own models' normalisation: pixels to [-1, 1]


@dataclass(frozen=True)
class DataInfo:
    stored_side: int  # the largest side of any usable image
    uniform: bool  # every usable image has the same width and height
    num_classes: int

    @property
    def img_size(self) -> int:
        """The default input side: the stored one when every image has it (digits, MNIST, CIFAR), else 224."""
        return self.stored_side if self.uniform else PHOTO_SIDE


def data_info(dataset: Location) -> DataInfo:
    manifest = read_manifest(dataset)
    index = read_index(dataset, columns=["width", "height", "status"])
    ok = index.filter(pc.equal(index["status"], STATUS_OK))
    widths, heights = (np.unique(ok[name].to_numpy()) for name in ("width", "height"))
    side = int(max(widths.max(initial=0), heights.max(initial=0)))
    return DataInfo(stored_side=side, uniform=len(widths) <= 1 and len(heights) <= 1,
                    num_classes=len(manifest["class_names"]))


def input_side(config: TrainConfig, info: DataInfo) -> int:
    return config.img_size or info.img_size


def augment_policy(config: TrainConfig, info: DataInfo) -> str:
    """--augment, with auto decided by the data: none for equal-size small images, basic otherwise."""
    if config.augment != "auto":
        return config.augment
    return "none" if info.uniform and info.stored_side < SMALL_SIDE else "basic"


def reader_transforms(policy: str, info: DataInfo, side: int, seed: int,
                      sides: tuple[int, ...] = ()) -> tuple[ImageTransform | None, ImageTransform | None]:
    """The reader's (train, evaluation) per-example transforms; (None, None) for the fast path: equal-size
    images without augmentation are decoded as stored, stacked, and resized on the device. ``sides``: a
    resolution curriculum's train side per epoch (evaluation keeps ``side``)."""
    if policy == "none" and info.uniform:
        return None, None
    evaluation = ImageTransform(side, policy, train=False, seed=seed)
    return ImageTransform(side, policy, train=policy != "none", seed=seed, sides=sides), evaluation


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation on a 0-1 scale: ``(x / 255 - mean) / std``."""

    mean: tuple[float, ...] = HALF
    std: tuple[float, ...] = HALF

    @classmethod
    def of(cls, config: TrainConfig) -> Normalization:
        """A run's: --mean/--std as given or as a named model's pretrained config set them, else onion's 0.5."""
        return cls(tuple(config.mean or HALF), tuple(config.std or HALF))

    @classmethod
    def recorded(cls, built: dict) -> Normalization:
        """From a run's model.json (runs written before it recorded them used 0.5)."""
        return cls(tuple(built.get("mean") or HALF), tuple(built.get("std") or HALF))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixels in 0-255 to model inputs, in place."""
        if self.mean == HALF and self.std == HALF:
            return x.div_(127.5).sub_(1.0)  # onion's own models' arithmetic, as it always was
        mean = torch.tensor(self.mean, device=x.device).mul_(255.0).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).mul_(255.0).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)


def prepare(images: torch.Tensor, img_size: int, device: torch.device,
            normalization: Normalization = Normalization()) -> torch.Tensor:
    """uint8 NCHW to normalised float on the device, resized when the model wants another size."""
    x = normalization.apply(images.to(device, non_blocking=True).float())
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return x
