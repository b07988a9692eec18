"""``onion bench data``: our shard reader against torchvision's ImageFolder on the same images.

Decoded uint8 images/s with 1 and 2 DataLoader workers, interleaved repeats, medians; and the peak
RSS of one epoch read in a fresh process. ImageFolder reads the very PNG bytes stored in the shards.
The photo mode (``--photos``: JPEG photos, 224 px training crops) is :mod:`pipeline.bench.photos`.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import PILToTensor

from shards import ShardDataset, location, read_index
from shards.index import usable_train
from shards.manifest import shard_location

BATCH = 256
T = TypeVar("T")


def export_image_folder(dataset: Path, folder: Path) -> None:
    """The same train images, as PNG files in torchvision's class-per-folder layout."""
    data = shard_location(location(str(dataset)))
    for row in usable_train(read_index(data)).to_pylist():
        target = folder / row["class_name"] / f"{row['key']}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.read_range(row["shard"], row["image_offset"], row["image_offset"] + row["image_size"]))


def images_per_second(loader: DataLoader) -> float:
    start, count = time.perf_counter(), 0
    for images, _labels, *_ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def reader_loaders(dataset: Path, folder: Path, workers: int) -> dict[str, DataLoader]:
    return {
        "onion ShardDataset (batched in worker)": DataLoader(
            ShardDataset(str(dataset), batch_size=BATCH, buffer_size=1000), batch_size=None, num_workers=workers),
        "onion ShardDataset (DataLoader collate)": DataLoader(
            ShardDataset(str(dataset), buffer_size=1000), batch_size=BATCH, num_workers=workers),
        "torchvision ImageFolder": DataLoader(
            ImageFolder(str(folder), transform=PILToTensor()), batch_size=BATCH, shuffle=True, num_workers=workers),
    }


def interleaved(loaders: dict[str, DataLoader], repeats: int, measure: Callable[[DataLoader], T]) -> dict[str, list[T]]:
    """``measure`` of each loader ``repeats`` times, the loaders taking turns, so drift favours none;
    one untimed round first warms the page cache and the workers' imports."""
    for loader in loaders.values():
        measure(loader)
    results: dict[str, list[T]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            results[name].append(measure(loader))
    return results


def measure_readers(dataset: Path, folder: Path, repeats: int, worker_counts: tuple[int, ...] = (1, 2)) -> list[dict]:
    results = []
    for workers in worker_counts:
        timings = interleaved(reader_loaders(dataset, folder, workers), repeats, images_per_second)
        baseline = statistics.median(timings["torchvision ImageFolder"])
        for name, values in timings.items():
            results.append({"reader": name, "workers": workers, "images_per_s": statistics.median(values),
                            "vs_imagefolder": statistics.median(values) / baseline})
    return results


# (imports, expression that iterates one epoch) of each reader, for a fresh process
READERS = {
    "onion ShardDataset": ("from shards import ShardDataset", "ShardDataset(sys.argv[1], batch_size=256)"),
    "torchvision ImageFolder": (
        "from torch.utils.data import DataLoader\nfrom torchvision.datasets import ImageFolder\n"
        "from torchvision.transforms import PILToTensor",
        "DataLoader(ImageFolder(sys.argv[1], transform=PILToTensor()), batch_size=256)",
    ),
    # the photo mode's (pipeline/bench/photos.py): 224 px training crops, ``basic`` augmentation
    "onion ShardDataset (photos)": (
        # timm: ImageTransform's crop parameters (imported on first use; a training process has it anyway)
        "from shards import ShardDataset\nfrom trainer.augment import ImageTransform\nimport timm.data",
        "ShardDataset(sys.argv[1], batch_size=256, channels=3, image_transform=ImageTransform(224, 'basic'))",
    ),
    "torchvision ImageFolder (photos)": (
        "from torch.utils.data import DataLoader\nfrom torchvision.datasets import ImageFolder\n"
        "from torchvision.transforms import Compose, InterpolationMode, PILToTensor, RandomHorizontalFlip, "
        "RandomResizedCrop",
        "DataLoader(ImageFolder(sys.argv[1], transform=Compose([RandomResizedCrop(224, scale=(0.08, 1.0), "
        "ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BILINEAR, antialias=True), RandomHorizontalFlip(), "
        "PILToTensor()])), batch_size=256)",
    ),
}


def peak_rss_mib(path: Path, reader: str = "onion ShardDataset") -> dict[str, float]:
    """Peak RSS of a fresh process reading one whole epoch in its main process: after imports, at the end."""
    imports, epoch = READERS[reader]
    # VmHWM, not ru_maxrss: after fork+exec, ru_maxrss still counts the parent's peak.
    code = (f"import re, sys\n{imports}\n"
            "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024\n"
            f"imported = peak()\nn = sum(1 for _ in {epoch})\nprint(imported, peak())\n")
    output = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    imported, peak = map(float, output.stdout.strip().splitlines()[-1].split())
    return {"after_imports": imported, "peak": peak}


def bench_data(out: Path, count: int, repeats: int, workers: tuple[int, ...] = (1, 2)) -> dict:
    """Ingest ``count`` synthetic 32x32 images, export them as PNG files, race the two readers."""
    from pipeline.ingest.job import IngestOptions, ingest
    from pipeline.ingest.sources import SourceOptions, open_source

    dataset, folder = out / "data" / "synthetic", out / "data" / "imagefolder"
    ingest(open_source("synthetic", SourceOptions(count=count, image_size=32, val_fraction=0.0001)), str(dataset),
           IngestOptions(shard_size=5000), ["onion", "bench", "data"], progress=False)
    if not folder.exists():
        export_image_folder(dataset, folder)
    return {"images": count, "speed": measure_readers(dataset, folder, repeats, workers),
            "peak_rss_mib": {"onion ShardDataset": peak_rss_mib(dataset, "onion ShardDataset"),
                             "torchvision ImageFolder": peak_rss_mib(folder, "torchvision ImageFolder")}}


def render(report: dict) -> str:
    lines = [f"Readers on the same {report['images']:,} 32x32 PNG images, decoded uint8 tensors, batches of {BATCH}:",
             "", "| reader | DataLoader workers | images/s | vs ImageFolder |", "|---|---|---|---|"]
    lines += [f"| {r['reader']} | {r['workers']} | {r['images_per_s']:,.0f} | {r['vs_imagefolder']:.2f}x |"
              for r in report["speed"]]
    lines += ["", "| reader | RSS after imports | peak RSS over one epoch |", "|---|---|---|"]
    lines += [f"| {name} | {r['after_imports']:.0f} MiB | {r['peak']:.0f} MiB |"
              for name, r in report["peak_rss_mib"].items()]
    return "\n".join(lines) + "\n"
