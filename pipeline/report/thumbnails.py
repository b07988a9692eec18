"""Thumbnails for the page: a bounded, deterministic sample of examples, read from the shards by
byte range through the index (never extracted), checked against the index's sha256, made in a
thread pool.

Which examples get one, in order until the count limit: quarantined inputs that have stored bytes,
then the first gallery pages of every shown selection (both ends of the score order, kept and
dropped, all classes and each class), the listed duplicate groups, then every other example in an
order fixed by a hash of its key (a deterministic random sample). The byte limit then cuts that
list where the bytes run out. The same inputs always give the same thumbnails, byte for byte.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.report.gather import Examples, Version
from shards import DatasetDamaged
from shards.decode import DecodeError, decode_pixels
from shards.urls import Location

GALLERY_PAGE = 60  # cards per gallery page in the page's default view (keep in step with report.js)


@dataclass(frozen=True)
class ThumbnailLimits:
    count: int = 6000  # thumbnails at most
    bytes: int = 24 << 20  # their total size at most
    side: int = 64  # longest side in pixels; smaller images are kept as they are (the page upscales them)


def gallery_heads(examples: Examples, version: Version, page: int = GALLERY_PAGE) -> Iterable[np.ndarray]:
    """The examples on the first gallery page of ``version`` in each view a person starts from."""
    labels = [None, *np.unique(examples.labels[examples.labels >= 0]).tolist()]
    missing = np.isnan(version.score)
    for label in labels:
        in_class = np.ones(len(examples), bool) if label is None else examples.labels == label
        for state in (version.kept, version.dropped):
            chosen = np.flatnonzero(state & in_class)
            score = version.score[chosen]
            for sign in (-1.0, 1.0):  # highest scores first, then lowest; unscored last; ties by key
                key = np.where(missing[chosen], np.inf, sign * score)
                yield chosen[np.lexsort((chosen, key))][:page]


def sample(examples: Examples, priorities: Iterable[np.ndarray], limit: int) -> np.ndarray:
    """Positions of examples with stored images, in priority order, at most ``limit``, no repeats."""
    stored = examples.shard_code >= 0
    taken = np.zeros(len(examples), bool)
    order: list[np.ndarray] = []
    count = 0
    hashed = (int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") for key in examples.keys.to_pylist())
    for tier in [*priorities, None]:
        if tier is None:  # the rest, in an order fixed by a hash of the key
            tier = np.argsort(np.fromiter(hashed, dtype=np.uint64, count=len(examples)), kind="stable")
        tier = tier[stored[tier] & ~taken[tier]]
        tier = tier[np.sort(np.unique(tier, return_index=True)[1])][: limit - count]
        taken[tier] = True
        order.append(tier)
        count += len(tier)
        if count >= limit:
            break
    return np.concatenate(order) if order else np.zeros(0, np.int64)


def thumbnail_png(pixels: np.ndarray, side: int) -> bytes:
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    if max(image.size) > side:
        image.thumbnail((side, side), Image.Resampling.LANCZOS)  # deterministic, keeps the aspect ratio
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def shard_thumbnails(dataset: Location, examples: Examples, shard: str, positions: np.ndarray,
                     side: int) -> list[tuple[int, bytes]]:
    """One shard's thumbnails: its members read by byte range, in file order."""
    positions = positions[np.argsort(examples.offsets[positions], kind="stable")]
    ranges = [(shard, int(examples.offsets[p]), int(examples.offsets[p] + examples.sizes[p])) for p in positions]
    made = []
    for position, data in zip(positions.tolist(), dataset.read_ranges(ranges)):
        key = examples.keys[position].as_py()
        if len(data) != examples.sizes[position] or hashlib.sha256(data).hexdigest() != examples.sha256[position]:
            raise DatasetDamaged(f"{dataset.url}/{shard}: member {key} does not match the index's sha256 "
                                 "(the shard is damaged; onion verify lists every problem)")
        try:
            made.append((position, thumbnail_png(decode_pixels(data), side)))
        except DecodeError as error:
            raise DatasetDamaged(f"{dataset.url}/{shard}: member {key}: {error}") from error
    return made


def make_thumbnails(dataset: Location, examples: Examples, chosen: np.ndarray, limits: ThumbnailLimits,
                    workers: int | None = None, progress: bool = True) -> dict[int, bytes]:
    """Thumbnails of ``chosen`` (priority order) cut at the byte limit: position -> PNG bytes."""
    by_shard: dict[int, list[int]] = {}
    for position in chosen.tolist():
        by_shard.setdefault(int(examples.shard_code[position]), []).append(position)
    made: dict[int, bytes] = {}
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(chosen), unit="img", desc="thumbnails", disable=not progress) as bar:
        jobs = [pool.submit(shard_thumbnails, dataset, examples, examples.shards[code], np.array(positions),
                            limits.side) for code, positions in sorted(by_shard.items())]
        try:
            for job in jobs:
                for position, png in job.result():
                    made[position] = png
                    bar.update(1)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a damaged shard: stop, do not read the rest
            raise
    kept: dict[int, bytes] = {}
    total = 0
    for position in chosen.tolist():  # priority order, so the byte limit drops the least wanted
        if total + len(made[position]) > limits.bytes:
            break
        total += len(made[position])
        kept[position] = made[position]
    return kept
