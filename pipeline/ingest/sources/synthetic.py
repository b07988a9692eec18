"""Procedural images with planted redundancy, for measuring pruning against ground truth.

Every class is an oriented, tinted grating with a random phase, a random blob and noise, so the
task is learnable but not trivial. Into the train split we plant, at given rates:

* ``dup-of:<key>``       an exact copy of a clean train example (same pixels, same label);
* ``near-dup-of:<key>``  a small augmentation of one (shift, brightness, noise);
* ``label-flip``         a clean image whose label was changed to another class.

Plans are drawn in bulk from one seeded generator; pixels are generated per example from
``(seed, index)`` inside the Ray task, so 100k+ examples never sit in the driver's memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.ingest.sources.base import Record, Source, SourceError, hash_split

CLEAN, DUPLICATE, NEAR_DUPLICATE, LABEL_FLIP = "clean", "dup", "near-dup", "flip"


@dataclass(frozen=True)
class SyntheticPlan:
    index: int
    kind: str
    origin: int  # the example whose pixels are used (itself unless a duplicate)
    true_label: int
    label: int  # as stored: differs from true_label for label flips


class SyntheticSource(Source):
    def __init__(
        self,
        *,
        count: int = 10_000,
        image_size: int = 32,
        classes: int = 10,
        dup_rate: float = 0.05,
        near_dup_rate: float = 0.05,
        flip_rate: float = 0.05,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if dup_rate + near_dup_rate + flip_rate > 0.9:
            raise SourceError("synthetic: planted rates add up to more than 0.9")
        if classes < 2 or image_size < 4 or count < 1:
            raise SourceError("synthetic: needs at least 2 classes, 4x4 pixels and 1 example")
        self.spec = "synthetic"
        self.count, self.image_size, self.classes = count, image_size, classes
        self.rates = (dup_rate, near_dup_rate, flip_rate)
        self.val_fraction, self.seed = val_fraction, seed
        self.class_names = [f"class{c}" for c in range(classes)]
        self.parameters = {"count": count, "image_size": image_size, "classes": classes, "dup_rate": dup_rate,
                           "near_dup_rate": near_dup_rate, "flip_rate": flip_rate, "val_fraction": val_fraction,
                           "seed": seed}

    def key(self, index: int) -> str:
        return f"synthetic-{index:07d}"

    def plans(self) -> list[SyntheticPlan]:
        rng = np.random.default_rng([self.seed, 0])
        labels = rng.integers(self.classes, size=self.count)
        draws = rng.random(self.count)
        flip_offsets = rng.integers(1, self.classes, size=self.count)
        origin_draws = rng.random(self.count)
        in_train = np.array([hash_split(self.key(i), self.val_fraction) == "train" for i in range(self.count)])
        dup, near, flip = self.rates
        kinds = np.full(self.count, CLEAN, dtype=object)
        kinds[in_train & (draws < dup)] = DUPLICATE
        kinds[in_train & (draws >= dup) & (draws < dup + near)] = NEAR_DUPLICATE
        kinds[in_train & (draws >= dup + near) & (draws < dup + near + flip)] = LABEL_FLIP
        origins = np.flatnonzero(in_train & (kinds == CLEAN))
        if len(origins) == 0:
            origins = np.arange(self.count)
        plans = []
        for i in range(self.count):
            kind = str(kinds[i])
            copies = kind in (DUPLICATE, NEAR_DUPLICATE)
            origin = int(origins[int(origin_draws[i] * len(origins))]) if copies else i
            true_label = int(labels[origin])
            label = (true_label + int(flip_offsets[i])) % self.classes if kind == LABEL_FLIP else true_label
            plans.append(SyntheticPlan(i, kind, origin, true_label, label))
        return plans

    def records(self) -> list[Record]:
        est = self.image_size * self.image_size * 3 + 1024
        records = []
        for plan in self.plans():
            key = self.key(plan.index)
            planted = {
                DUPLICATE: f"dup-of:{self.key(plan.origin)}",
                NEAR_DUPLICATE: f"near-dup-of:{self.key(plan.origin)}",
                LABEL_FLIP: "label-flip",
            }.get(plan.kind)
            records.append(Record(
                key=key, split=hash_split(key, self.val_fraction), label=plan.label,
                source_ref=f"synthetic[seed={self.seed},index={plan.index}]", est_bytes=est,
                locator=plan, planted=planted, extra={"clean_label": plan.true_label},
            ))
        return records

    def load(self, record: Record) -> np.ndarray:
        plan: SyntheticPlan = record.locator
        pixels = self.base_pixels(plan.origin, plan.true_label)
        if plan.kind == NEAR_DUPLICATE:
            pixels = self.perturb(pixels, np.random.default_rng([self.seed, 3, plan.index]))
        return pixels

    def base_pixels(self, index: int, label: int) -> np.ndarray:
        """The clean image of example ``index``: a class-specific grating plus random parts."""
        rng = np.random.default_rng([self.seed, 1, index])
        size = self.image_size
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        angle = np.pi * label / self.classes
        frequency = 2.0 + (label % 3)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
        tint = np.array([(label * 37) % 100, (label * 59) % 100, (label * 83) % 100], dtype=np.float32) / 100
        image = 128 + 70 * wave[..., None] * (0.5 + tint) + 60 * blob[..., None]
        image += rng.normal(0, 18, size=image.shape)
        return np.clip(image, 0, 255).astype(np.uint8)

    @staticmethod
    def perturb(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A near-duplicate: shift by up to 2 pixels, scale brightness by up to 10%, add noise."""
        shifted = np.roll(pixels, shift=tuple(rng.integers(-2, 3, size=2)), axis=(0, 1)).astype(np.float32)
        shifted = shifted * rng.uniform(0.9, 1.1) + rng.normal(0, 4, size=pixels.shape)
        return np.clip(shifted, 0, 255).astype(np.uint8)
