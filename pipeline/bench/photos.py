"""``onion bench data --photos``: the training loader on JPEG photos of mixed sizes, against torchvision.

Every arm turns the very same JPEG bytes into 224x224 uint8 batches of :data:`BATCH` with the same
DataLoader worker count, ``basic`` augmentation (RandomResizedCrop, scale 0.08-1, ratio 3/4-4/3,
bilinear, and a horizontal flip):

* ``onion``: :class:`ShardDataset` with ``image_transform=ImageTransform(224, "basic")``, batches
  stacked in the workers (the ``onion train`` path). The transform cuts the crop from the stored image
  in one ``Image.resize(box=...)`` and lets libjpeg decode at 1/2, 1/4 or 1/8 scale (PIL's ``draft``)
  when the crop allows.
* ``ImageFolder``: torchvision's ``ImageFolder`` with the transforms as people write them
  (``RandomResizedCrop`` with ``antialias=True``, ``RandomHorizontalFlip``, ``PILToTensor``): every
  photo decoded at full size, no draft; DataLoader collate.
* ``ImageFolder + draft``: the same files through ``ImageFolder`` with a loader that applies onion's
  own ``ImageTransform`` to each file's bytes: the same draft decode and crop, so the only difference
  to ``onion`` is the reader (files vs shards) and where the batch is stacked.

The photos are made deterministically from scikit-learn's two sample photos (427x640): random crops,
aspect ratios 1:2 to 2:1, resized so the long side is 300-1000 px, JPEG quality 90. Crops enlarged
past 427x640 are smoother than camera photos of that size, so they decode somewhat faster; every
arm decodes the same bytes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pipeline.bench.data import BATCH, interleaved, peak_rss_mib
from shards import ShardDataset, location, read_index
from shards.index import usable_train
from trainer.augment import ImageTransform

SIZE = 224
DEFAULT_COUNT = 2_000
MIN_SIDE, MAX_SIDE = 300, 1000  # the long side of a generated photo, in pixels
JPEG_QUALITY = 90
ONION, IMAGEFOLDER = "onion ShardDataset", "torchvision ImageFolder"
IMAGEFOLDER_DRAFT = "torchvision ImageFolder + draft"
# An outside reference, measured on other hardware: FFCV's ImageNet loader, 512 px JPEG, random resized
# crop to 224, 96 vCPUs (docs.ffcv.io, "ImageNet Benchmarks: Data loading").
FFCV_IMAGES_PER_S, FFCV_VCPUS = 31_278, 96


def write_photos(folder: Path, count: int, *, seed: int = 0) -> None:
    """``count`` JPEG photos in ImageFolder layout (``folder/<class>/<name>.jpg``); the same arguments
    always give the same files. Written beside ``folder`` and renamed, so a half-written set is never used."""
    from sklearn.datasets import load_sample_images

    photos = dict(zip(("china", "flower"), load_sample_images().images))
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        name = list(photos)[number % len(photos)]
        source = Image.fromarray(photos[name])
        long_side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        aspect = float(np.exp(rng.uniform(np.log(1 / 2), np.log(2))))  # width / height
        width, height = ((long_side, round(long_side / aspect)) if aspect >= 1
                         else (round(long_side * aspect), long_side))
        # a box of that aspect inside the source photo, 50-100% of the largest that fits, anywhere
        scale = min(source.width / width, source.height / height) * rng.uniform(0.5, 1.0)
        box_width, box_height = width * scale, height * scale
        left, top = rng.uniform(0, source.width - box_width), rng.uniform(0, source.height - box_height)
        image = source.resize((width, height), Image.BICUBIC, box=(left, top, left + box_width, top + box_height))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = partial / name / f"{name}-{number:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, format="JPEG", quality=JPEG_QUALITY)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def check_same_bytes(dataset: Path, folder: Path) -> dict:
    """Every photo is stored in the shards byte for byte (so both readers decode the same JPEGs); the
    photos' sizes."""
    rows = usable_train(read_index(location(str(dataset)))).to_pylist()
    files = {hashlib.sha256(path.read_bytes()).hexdigest(): path for path in folder.glob("*/*.jpg")}
    stored = {row["sha256"] for row in rows if row["image_ext"] == "jpg"}
    if len(rows) != len(files) or stored != set(files):
        raise RuntimeError(f"{dataset}: the shards do not hold the {len(files)} JPEG files of {folder} byte for byte")
    sides = [(row["width"], row["height"]) for row in rows]
    return {"min_long_side": min(max(s) for s in sides), "max_long_side": max(max(s) for s in sides),
            "mean_megapixels": statistics.fmean(w * h for w, h in sides) / 1e6,
            "mean_kib": statistics.fmean(path.stat().st_size for path in files.values()) / 1024}


def torchvision_transform():  # noqa: ANN201 - torchvision's Compose
    """RandomResizedCrop + flip + PILToTensor, as people write it (the full-size decode, no draft)."""
    from torchvision.transforms import Compose, InterpolationMode, PILToTensor, RandomHorizontalFlip, RandomResizedCrop

    return Compose([RandomResizedCrop(SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                      interpolation=InterpolationMode.BILINEAR, antialias=True),
                    RandomHorizontalFlip(), PILToTensor()])


class DraftLoader:
    """An ImageFolder ``loader``: the file's bytes through onion's ``ImageTransform`` (draft decode, crop
    cut in one resize), as a CxHxW uint8 tensor like ``PILToTensor``'s."""

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def __call__(self, path: str) -> torch.Tensor:
        with open(path, "rb") as handle:
            data = handle.read()
        # a writable copy, as PILToTensor makes (np.array(image, copy=True))
        return torch.from_numpy(self.transform(data, os.path.basename(path), 0).copy()).permute(2, 0, 1)


def photo_loaders(dataset: Path, folder: Path, workers: int) -> dict[str, DataLoader]:
    transform = ImageTransform(SIZE, "basic", seed=0)
    # Once here, so the forked workers inherit its imports (timm) instead of paying for them every epoch.
    transform(next(folder.glob("*/*.jpg")).read_bytes(), "warm-up", 0)
    return {
        ONION: DataLoader(ShardDataset(str(dataset), batch_size=BATCH, channels=3, image_transform=transform),
                          batch_size=None, num_workers=workers),
        IMAGEFOLDER: DataLoader(ImageFolder(str(folder), transform=torchvision_transform()),
                                batch_size=BATCH, shuffle=True, num_workers=workers),
        IMAGEFOLDER_DRAFT: DataLoader(ImageFolder(str(folder), loader=DraftLoader(transform)),
                                      batch_size=BATCH, shuffle=True, num_workers=workers),
    }


def run_epoch(loader: DataLoader) -> dict:
    """One epoch: images, wall seconds, CPU seconds (this process, and the workers, which are reaped when
    the epoch ends) and the images' (channels, height, width, dtype)."""
    children = os.times()
    start, cpu, count, shapes = time.perf_counter(), time.process_time(), 0, set()
    for images, _labels, *_ in loader:
        count += len(images)
        shapes.add((*images.shape[1:], str(images.dtype).removeprefix("torch.")))
    seconds, main_cpu = time.perf_counter() - start, time.process_time() - cpu
    after = os.times()
    worker_cpu = (after.children_user - children.children_user) + (after.children_system - children.children_system)
    return {"images": count, "seconds": seconds, "main_cpu": main_cpu, "worker_cpu": worker_cpu,
            "shapes": sorted(shapes)}


def measure_photos(dataset: Path, folder: Path, repeats: int, workers: tuple[int, ...] = (1, 2)) -> list[dict]:
    results = []
    for count in workers:
        epochs = interleaved(photo_loaders(dataset, folder, count), repeats, run_epoch)
        rows = {}
        for name, runs in epochs.items():
            rate = statistics.median(run["images"] / run["seconds"] for run in runs)
            rows[name] = {
                "reader": name, "workers": count, "images_per_s": rate,
                "images_per_s_per_core": rate / max(count, 1),
                "images_per_cpu_s": statistics.median(run["images"] / (run["main_cpu"] + run["worker_cpu"])
                                                      for run in runs),
                "main_process_cpu_share": statistics.median(run["main_cpu"] / run["seconds"] for run in runs),
                "images_per_epoch": sorted({run["images"] for run in runs}),
                "image_shapes": sorted({shape for run in runs for shape in run["shapes"]}),
            }
        for row in rows.values():
            row["vs_imagefolder"] = row["images_per_s"] / rows[IMAGEFOLDER]["images_per_s"]
            row["vs_imagefolder_draft"] = row["images_per_s"] / rows[IMAGEFOLDER_DRAFT]["images_per_s"]
        results += rows.values()
    return results


def bench_photos(out: Path, count: int = DEFAULT_COUNT, repeats: int = 3, workers: tuple[int, ...] = (1, 2)) -> dict:
    """Write ``count`` JPEG photos as an ImageFolder, ingest them (stored byte for byte), race the arms."""
    import ray

    from pipeline.ingest.job import IngestOptions, ingest
    from pipeline.ingest.sources import SourceOptions, open_source

    folder, dataset = out / "data" / f"photos-{count}", out / "data" / f"photos-{count}-shards"
    if not folder.exists():
        write_photos(folder, count)
    ray_before = ray.is_initialized()
    ingest(open_source(f"imagefolder:{folder}", SourceOptions(val_fraction=0.0)), str(dataset), IngestOptions(),
           ["onion", "bench", "data", "--photos"], progress=False)
    if not ray_before and ray.is_initialized():  # an idle Ray would share the cores with the loaders
        ray.shutdown()
    photos = check_same_bytes(dataset, folder)
    return {"mode": "photos", "images": count, "size": SIZE, "batch": BATCH, "photos": photos,
            "speed": measure_photos(dataset, folder, repeats, workers),
            "peak_rss_mib": {ONION: peak_rss_mib(dataset, "onion ShardDataset (photos)"),
                             IMAGEFOLDER: peak_rss_mib(folder, "torchvision ImageFolder (photos)")}}


def render(report: dict) -> str:
    photos = report["photos"]
    lines = [f"Loaders on the same {report['images']:,} JPEG photos (long side {photos['min_long_side']}-"
             f"{photos['max_long_side']} px, mean {photos['mean_megapixels']:.2f} MP, {photos['mean_kib']:.0f} KiB), "
             f"`basic` augmentation (RandomResizedCrop to {report['size']}, flip), {report['size']}x{report['size']} "
             f"uint8 batches of {report['batch']}; medians, interleaved repeats. Per core: images/s divided by the "
             "DataLoader workers (the main process only receives finished batches; its CPU share is shown). "
             "Per CPU-second: workers' and main process's CPU time together.",
             "", "| reader | DataLoader workers | images/s | images/s per core | images per CPU-s | main process CPU "
                 "| vs ImageFolder | vs ImageFolder + draft |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['reader']} | {r['workers']} | {r['images_per_s']:,.0f} | {r['images_per_s_per_core']:,.0f} "
              f"| {r['images_per_cpu_s']:,.0f} | {100 * r['main_process_cpu_share']:.0f}% | {r['vs_imagefolder']:.2f}x "
              f"| {r['vs_imagefolder_draft']:.2f}x |" for r in report["speed"]]
    lines += ["", "ImageFolder: torchvision's transforms, full-size decode (no draft). ImageFolder + draft: the same "
                  "files with onion's ImageTransform as the loader (draft decode, one-resize crop): the reader is the "
                  "only difference to onion.",
              "", f"Outside reference, other hardware: FFCV publishes {FFCV_IMAGES_PER_S:,} images/s on {FFCV_VCPUS} "
                  f"vCPUs for 512 px JPEG with random resized crop to 224: about "
                  f"{FFCV_IMAGES_PER_S / FFCV_VCPUS:.0f} images/s per vCPU.",
              "", "| reader | RSS after imports | peak RSS over one epoch (one process) |", "|---|---|---|"]
    lines += [f"| {name} | {r['after_imports']:.0f} MiB | {r['peak']:.0f} MiB |"
              for name, r in report["peak_rss_mib"].items()]
    lines += ["", "onion's imports include timm (ImageTransform's crop parameters; a training process has it for the "
                  "model anyway)."]
    return "\n".join(lines) + "\n"
