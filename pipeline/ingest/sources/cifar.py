"""CIFAR-10 and CIFAR-100, in the python (pickled) or binary batch format.

Pickled batches are opened with a restricted unpickler that builds only plain containers and
numpy arrays: a crafted file cannot run code, it is quarantined instead.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass

import numpy as np

from pipeline.ingest.sources.base import Quarantine, Record, Source, SourceError, safe_key_part

IMAGE_BYTES = 32 * 32 * 3
# (file name, split, label bytes per record: CIFAR-10 has 1, CIFAR-100 has coarse + fine)
PYTHON_BATCHES = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "val"), ("train", "train"),
                                                                        ("test", "val")]
BINARY_BATCHES = [(f"data_batch_{i}.bin", "train", 1) for i in range(1, 6)] + [("test_batch.bin", "val", 1),
                                                                               ("train.bin", "train", 2),
                                                                               ("test.bin", "val", 2)]
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global except the few numpy constructors that CIFAR batches use."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


def safe_unpickle(data: bytes) -> object:
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


@dataclass(frozen=True)
class Batch:
    path: str
    split: str
    images: np.ndarray | None  # N x 32 x 32 x 3, None when the file is refused
    labels: np.ndarray | None
    problem: str | None = None


class CifarSource(Source):
    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise SourceError(f"cifar: {root!r} is not a directory")
        self.spec = f"cifar:{root}"
        self.root = os.path.abspath(root)
        files = self._find_files()
        if not files:
            raise SourceError(f"cifar: no CIFAR batch files (data_batch_N, test_batch, train, test, *.bin) "
                              f"under {root!r}")
        self.class_names = self._class_names(files)
        self.batches = [self._read_batch(*spec) for spec in files]

    def _find_files(self) -> list[tuple[str, str, int]]:
        """(path, split, label bytes; 0 for python batches) for every batch file, sorted."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            names = set(filenames)
            found += [(os.path.join(dirpath, n), s, 0) for n, s in PYTHON_BATCHES if n in names]
            found += [(os.path.join(dirpath, n), s, b) for n, s, b in BINARY_BATCHES if n in names]
        return sorted(found)

    def _class_names(self, files: list[tuple[str, str, int]]) -> list[str]:
        folder = os.path.dirname(files[0][0])
        fine = files[0][2] == 2 or os.path.basename(files[0][0]) in ("train", "test")
        for meta_name, field in (("batches.meta", b"label_names"), ("meta", b"fine_label_names")):
            path = os.path.join(folder, meta_name)
            if os.path.exists(path):
                try:
                    with open(path, "rb") as handle:
                        return [n.decode() for n in safe_unpickle(handle.read())[field]]
                except (pickle.UnpicklingError, KeyError, TypeError, EOFError, ValueError) as error:
                    raise SourceError(f"cifar: {path}: unusable label names ({error})") from error
        for text_name in ("batches.meta.txt", "fine_label_names.txt"):
            path = os.path.join(folder, text_name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    return [line.strip() for line in handle if line.strip()]
        return [str(i) for i in range(100 if fine else 10)]

    def _read_batch(self, path: str, split: str, label_bytes: int) -> Batch:
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            if label_bytes:
                images, labels = parse_binary_batch(data, label_bytes)
            else:
                images, labels = parse_python_batch(data)
        except (pickle.UnpicklingError, ValueError, KeyError, TypeError, EOFError, IndexError) as error:
            return Batch(path, split, None, None, problem=f"not a usable CIFAR batch: {error}")
        return Batch(path, split, images, labels)

    def records(self) -> list[Record]:
        records = []
        for b, batch in enumerate(self.batches):
            relative = os.path.relpath(batch.path, self.root)
            prefix = f"cifar-{safe_key_part(relative, 50)}"
            if batch.images is None:
                records.append(Record(key=prefix, split=batch.split, label=None, source_ref=relative,
                                      est_bytes=0, quarantine=batch.problem))
                continue
            for i, label in enumerate(batch.labels.tolist()):
                records.append(Record(key=f"{prefix}-{i:05d}", split=batch.split, label=label,
                                      source_ref=f"{relative}[{i}]", est_bytes=IMAGE_BYTES + 1024, locator=(b, i)))
        return records

    def load(self, record: Record) -> np.ndarray:
        b, i = record.locator
        label = self.batches[b].labels[i]
        if not 0 <= label < len(self.class_names):
            raise Quarantine(f"label {label} outside the {len(self.class_names)} classes")
        return self.batches[b].images[i]


def parse_python_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(data)
    if not isinstance(batch, dict):
        raise ValueError("the pickle does not hold a dict")
    pixels = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = batch.get(b"labels", batch.get(b"fine_labels"))
    if labels is None:
        raise KeyError("no labels or fine_labels")
    return to_hwc(pixels), np.asarray(labels, dtype=np.int64)


def parse_binary_batch(data: bytes, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    record = label_bytes + IMAGE_BYTES
    if len(data) == 0 or len(data) % record:
        raise ValueError(f"{len(data)} bytes is not a whole number of {record}-byte records")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return to_hwc(rows[:, label_bytes:]), rows[:, label_bytes - 1].astype(np.int64)


def to_hwc(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim != 2 or pixels.shape[1] != IMAGE_BYTES:
        raise ValueError(f"pixel array of shape {pixels.shape}, expected (N, {IMAGE_BYTES})")
    return np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
