"""Streaming and random-access reading of an onion dataset.

:class:`ShardDataset` is a ``torch.utils.data.IterableDataset`` that yields decoded
``(image, label, key)``. It reads members by byte range through the index instead of parsing
tar headers, in bounded sequential chunks (memory stays flat however large the dataset), and
splits work across DataLoader workers and distributed ranks by the rule in
:mod:`shards.partition`, so each example is read exactly once per epoch in total.

A *selection* (a stored version like ``v0003``, a set of keys, or a table with ``key`` and a
boolean ``kept``) narrows the split to those examples before the split is cut among ranks and
workers: survivors are read straight from the source shards, neighbouring members in one ranged
read (unselected members in between are read and skipped when the gap is small: one request
costs more than a few KiB on any storage), so curation needs no survivor shards.
"""
from __future__ import annotations

import hashlib
import io
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice, repeat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from shards.decode import DecodeError, decode_pixels
from shards.errors import DatasetDamaged, DatasetError, UnknownKey
from shards.index import MEMBER_NAME, STATUS_OK, read_index
from shards.manifest import read_manifest, shard_location
from shards.partition import Segment, epoch_segments, rank_size
from shards.selections import kept_keys
from shards.urls import Location, location

READ_CHUNK_BYTES = 4 << 20  # one ranged read covers at most this many bytes
READ_AHEAD = 2  # ranged reads in flight ahead of decoding (hides object-store latency)
# Unselected bytes a ranged read may span rather than start a new read: a local read costs about
# as much as copying 64 KiB; an object-store request (tens of ms) as much as fetching ~1 MiB.
READ_GAP_BYTES = {"local": 64 << 10, "remote": 1 << 20}
TAR_HEADER = 512  # bytes of the tar header in front of every member's data
# member_name: only in the index of shards indexed in place (absent from that of copied shards)
UNLABELLED = -1  # the label the reader gives an example of an unlabelled dataset (its index label is null)
READ_COLUMNS = ["key", "label", "shard", "image_offset", "image_size", "sha256", MEMBER_NAME]
VERIFY_MODES = ("members", "shards", "none")

Sample = tuple[torch.Tensor, int, str]
Selection = str | pa.Table | pa.Array | pa.ChunkedArray | np.ndarray | Iterable[str]


@dataclass
class ShardRows:
    """The rows of one shard in stored order, as arrays (no per-row Python objects)."""

    keys: pa.Array
    labels: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    sha256: pa.Array
    member_names: pa.Array | None = None  # the name each image's tar header holds, for shards indexed in place


def distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """Decoded ``(image uint8 CxHxW, label, key)`` from one split of an onion dataset.

    Args:
        url: dataset location (local path or fsspec URL) holding ``manifest.json``.
        split: which split to read (``train``, ``val``, ...).
        shuffle: shuffle shard order per epoch and samples through a buffer.
        seed: base seed; the order of an epoch depends only on (seed, epoch, ranks, workers).
        buffer_size: shuffle buffer, in encoded samples (decoding happens on the way out).
        batch_size: when set, yield ``(images BxCxHxW, labels B, keys)`` batches made by the
            worker itself (use ``DataLoader(batch_size=None)``); the last batch may be short.
        channels: 1 or 3 to convert, ``None`` to keep what is stored.
        transform: applied to each decoded image tensor.
        image_transform: instead of decoding as stored, ``image_transform(bytes, key, epoch)`` makes each
            stored image a HxWxC uint8 array (a training crop, an evaluation resize): images of any size
            become one size in the workers and batches stack as on the fast path. Seeding it from
            (epoch, key) keeps an epoch's draws independent of workers, ranks and order.
        verify: ``members`` (default) checks each image's sha256 against the index as it is read
            (about 10% of decode time; the PNG decoder does not check CRCs, so this is what
            catches a flipped byte); ``shards`` checks each whole shard against the manifest
            before use (reads whole shards); ``none`` trusts the storage.
        rank, world_size: override the ``torch.distributed`` values (tests, custom launchers).
        shards: read only these shards (scoring jobs hand one shard to each task).
        selection: read only these examples of the split: a selection version of this dataset
            (``"v0003"``: its kept keys), keys (a set, list or array), or a table with ``key`` and a
            boolean ``kept`` column. Ranks and workers split the selected examples exactly once per
            epoch; a key that is not an example of the split is an error naming it.
        index: the index rows to read from (at least ``READ_COLUMNS``, ``split`` and ``status``),
            when the caller already has them: a driver that reads the index once and hands each
            task its shard's rows spares every task reading the whole index (at a million
            examples in 100 shards, that was most of the scoring time).
    """

    def __init__(
        self,
        url: str,
        split: str = "train",
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_size: int = 1000,
        batch_size: int | None = None,
        channels: int | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_transform: Callable[[memoryview, str, int], np.ndarray] | None = None,
        verify: str = "members",
        rank: int | None = None,
        world_size: int | None = None,
        shards: list[str] | None = None,
        selection: Selection | None = None,
        index: pa.Table | None = None,
    ) -> None:
        super().__init__()
        self.dataset = location(url)
        self.manifest = read_manifest(self.dataset)
        self.shards_at = shard_location(self.dataset, self.manifest)  # elsewhere for shards indexed in place
        self.split = split
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_size = max(1, buffer_size)
        self.batch_size = batch_size
        self.channels = channels
        self.transform = transform
        self.image_transform = image_transform
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self.verify = verify
        default_rank, default_world = distributed_rank_and_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        # (epoch, start_batch, restriction generation) in shared memory: persistent DataLoader workers
        # see set_epoch's and restrict's values when the next epoch's iteration starts, without being
        # re-created (re-creating them costs a fraction of a second per epoch: 20% of a short one).
        self._position = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.shard_sha256 = {s["name"]: s["sha256"] for s in self.manifest["shards"]}
        self.max_gap = READ_GAP_BYTES["local" if self.shards_at.is_local else "remote"]
        self.all_rows = self._load_rows(selection, index)
        if shards is not None:
            unknown = set(shards) - set(self.all_rows)
            if unknown:
                raise DatasetError(f"{self.dataset.url}: no shard {sorted(unknown)[0]!r} in split {split!r}")
            self.all_rows = {name: self.all_rows[name] for name in shards}
        # restrict()'s choice: one flag per example of all_rows, in keys() order
        self._restriction = torch.ones(sum(len(rows.labels) for rows in self.all_rows.values()),
                                       dtype=torch.bool).share_memory_()
        self._restricted: tuple[int, dict[str, ShardRows]] = (0, self.all_rows)  # (generation, rows), per process

    def _load_rows(self, selection: Selection | None, index: pa.Table | None) -> dict[str, ShardRows]:
        if index is None:
            index = read_index(self.dataset, columns=READ_COLUMNS + ["split", "status"])
        mask = pc.and_(pc.equal(index["split"], self.split), pc.equal(index["status"], STATUS_OK))
        table = index.filter(mask).select([name for name in READ_COLUMNS if name in index.column_names])
        if len(table) == 0 and self.split not in self.manifest["counts"]["by_split"]:
            known = ", ".join(self.manifest["counts"]["by_split"]) or "none"
            raise DatasetError(f"{self.dataset.url}: no split {self.split!r} (splits: {known})")
        if selection is not None:
            table = table.filter(pc.is_in(table["key"], value_set=self._selected_keys(selection, table["key"])))
        table = table.sort_by([("shard", "ascending"), ("image_offset", "ascending")])
        rows: dict[str, ShardRows] = {}
        shard_column = table["shard"].to_numpy(zero_copy_only=False)
        boundaries = np.flatnonzero(shard_column[1:] != shard_column[:-1]) + 1
        for start, stop in zip(np.r_[0, boundaries], np.r_[boundaries, len(table)]):
            if start == stop:
                continue
            part = table.slice(start, stop - start)
            rows[str(shard_column[start])] = ShardRows(
                keys=part["key"].combine_chunks(),
                labels=part["label"].fill_null(UNLABELLED).to_numpy(),
                offsets=part["image_offset"].to_numpy(),
                sizes=part["image_size"].to_numpy(),
                sha256=part["sha256"].combine_chunks(),
                member_names=part[MEMBER_NAME].combine_chunks() if MEMBER_NAME in part.column_names else None,
            )
        return rows

    def _selected_keys(self, selection: Selection, split_keys: pa.ChunkedArray) -> pa.Array:
        """The selection as unique keys, each one checked to be a usable example of this split."""
        if isinstance(selection, str):
            keys = kept_keys(self.dataset, selection)
        elif isinstance(selection, pa.Table):
            if not {"key", "kept"} <= set(selection.column_names):
                raise DatasetError(f"a selection table needs columns key and kept, not {selection.column_names}")
            keys = selection.filter(selection["kept"])["key"]
        elif isinstance(selection, (pa.Array, pa.ChunkedArray)):
            keys = selection
        else:
            keys = pa.array(list(selection) if not isinstance(selection, np.ndarray) else selection, type=pa.string())
        keys = pc.unique(keys.cast(pa.string()))
        unknown = keys.filter(pc.invert(pc.is_in(keys, value_set=split_keys)))
        if len(unknown):
            raise DatasetError(f"{self.dataset.url}: the selection names {len(unknown)} key(s) that are not usable "
                               f"examples of split {self.split!r} (first: {unknown[0].as_py()!r})")
        return keys

    def restrict(self, selection: Selection | None) -> None:
        """Read only these of the dataset's examples from the next epoch on (``None``: all of them again).

        The order of an epoch is exactly that of a new dataset made with ``selection=`` the same keys,
        but persistent DataLoader workers keep running: the choice reaches them through shared memory.
        ``selection`` takes the forms the constructor's does; every key must be one of ``keys()``.
        """
        every = pa.array(self.keys(), pa.string())
        if selection is None:
            chosen = np.ones(len(every), dtype=bool)
        else:
            chosen = pc.is_in(every, value_set=self._selected_keys(selection, every)).to_numpy(zero_copy_only=False)
        self._restriction.copy_(torch.from_numpy(chosen))
        self._position[2] += 1

    @property
    def shard_rows(self) -> dict[str, ShardRows]:
        """The rows an epoch reads, by shard: ``all_rows`` less what ``restrict`` left out (empty shards dropped)."""
        generation = int(self._position[2])
        if self._restricted[0] != generation:
            chosen, rows, start = self._restriction.numpy(), {}, 0
            for name, part in self.all_rows.items():
                stop = start + len(part.labels)
                keep = chosen[start:stop]
                start = stop
                if keep.all():
                    rows[name] = part
                elif keep.any():
                    at = pa.array(np.flatnonzero(keep))
                    rows[name] = ShardRows(keys=part.keys.take(at), labels=part.labels[keep],
                                           offsets=part.offsets[keep], sizes=part.sizes[keep],
                                           sha256=part.sha256.take(at),
                                           member_names=None if part.member_names is None
                                           else part.member_names.take(at))
            self._restricted = (generation, rows)
        return self._restricted[1]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch whose order to produce (call before iterating, as with DistributedSampler).

        ``start_batch`` resumes mid-epoch: the first ``start_batch`` batches this rank's DataLoader
        would yield are skipped without being decoded (batch mode only). DataLoader workers
        deliver batches round-robin; each skips those of its own that fall before the restart.
        """
        if start_batch and not self.batch_size:
            raise ValueError("resuming mid-epoch needs batch_size (batches made by the reader)")
        self._position[0], self._position[1] = epoch, start_batch

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def start_batch(self) -> int:
        return int(self._position[1])

    @property
    def total_examples(self) -> int:
        """Examples an epoch reads (the split, selection and restriction), over all ranks."""
        return sum(len(rows.labels) for rows in self.shard_rows.values())

    def keys(self) -> np.ndarray:
        """Every key the split (or selection) holds, over all ranks, in stored order (``restrict`` aside)."""
        parts = [rows.keys.to_numpy(zero_copy_only=False) for rows in self.all_rows.values()]
        return np.concatenate(parts) if parts else np.array([], dtype=object)

    def __len__(self) -> int:
        """Examples this rank yields per epoch (not batches)."""
        return rank_size(self.total_examples, self.rank, self.world_size)

    def segments(self, worker: int = 0, num_workers: int = 1) -> list[Segment]:
        counts = {name: len(rows.labels) for name, rows in self.shard_rows.items()}
        return epoch_segments(
            counts, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, rank=self.rank,
            world_size=self.world_size, worker=worker, num_workers=num_workers,
        )

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # A resumed DataLoader asks worker 0 first, so worker 0 takes the part whose batch is next.
        part = (worker + self.start_batch) % num_workers
        encoded = self._encoded(self.segments(part, num_workers))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, part])
            encoded = shuffle_buffer(encoded, self.buffer_size, rng)
        if self.start_batch:
            skipped = len(range(part, self.start_batch, num_workers)) * self.batch_size
            encoded = islice(encoded, skipped, None)
        if not self.batch_size:
            return map(self._sample, encoded)
        if self.transform is None:  # fast path: stack HxWxC arrays, one layout change per batch
            return batched(((self._pixels(item), item[1], item[2]) for item in encoded), self.batch_size, stack_pixels)
        return batched(map(self._sample, encoded), self.batch_size, torch.stack)

    def _pixels(self, item: tuple[memoryview, int, str, str]) -> np.ndarray:
        data, _, key, shard = item
        try:
            if self.image_transform is not None:
                return self.image_transform(data, key, self.epoch)
            return decode_pixels(data, self.channels)
        except DecodeError as error:
            raise DatasetDamaged(f"{self.shards_at.url}/{shard}: member {key}.* does not decode: {error}") from error

    def _sample(self, item: tuple[memoryview, int, str, str]) -> Sample:
        # one copy to CHW: writable, whatever the strides (a mirrored crop is a view) or read-only decode
        image = torch.from_numpy(self._pixels(item).transpose(2, 0, 1).copy())
        if self.transform is not None:
            image = self.transform(image)
        return image, item[1], item[2]

    def _encoded(self, segments: list[Segment]) -> Iterator[tuple[memoryview, int, str, str]]:
        """Encoded samples of the segments, read in ranged chunks of bounded size."""
        limit = math.inf if self.verify == "shards" else READ_CHUNK_BYTES  # whole-shard check: one chunk
        chunks = [(segment.shard, lo, hi) for segment in segments
                  for lo, hi in chunk_bounds(self.shard_rows[segment.shard].offsets,
                                             self.shard_rows[segment.shard].sizes,
                                             segment.start, segment.stop, limit, self.max_gap)]
        for (shard, lo, hi), data in zip(chunks, self._read_ahead(chunks)):
            rows = self.shard_rows[shard]
            base = self._chunk_start(rows, lo)
            view = memoryview(data)  # samples are views into the chunk: no per-sample copy
            keys = rows.keys.slice(lo, hi - lo).to_pylist()
            starts = (rows.offsets[lo:hi] - base).tolist()
            stops = (rows.offsets[lo:hi] - base + rows.sizes[lo:hi]).tolist()
            labels = rows.labels[lo:hi].tolist()
            members = [view[a:b] for a, b in zip(starts, stops)]
            if self.verify == "members":
                headers = [view[a - TAR_HEADER:a] for a in starts]
                names = (rows.member_names.slice(lo, hi - lo).to_pylist() if rows.member_names is not None
                         else repeat(None))
                self._check_members(shard, members, headers, keys, rows.sha256.slice(lo, hi - lo).to_pylist(), names)
            yield from zip(members, labels, keys, repeat(shard))

    def _read_ahead(self, chunks: list[tuple[str, int, int]]) -> Iterator[bytes]:
        """The chunks' bytes in order, with up to READ_AHEAD further reads already in flight."""
        with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="onion-read") as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.submit(self._read_chunk, *chunk))
                if len(pending) > READ_AHEAD:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _read_chunk(self, shard: str, lo: int, hi: int) -> bytes:
        rows = self.shard_rows[shard]
        base, end = self._chunk_start(rows, lo), int(rows.offsets[hi - 1] + rows.sizes[hi - 1])
        try:
            data = (self._verified_shard(shard)[base:end] if self.verify == "shards"
                    else self.shards_at.read_range(shard, base, end))
        except FileNotFoundError as error:
            raise DatasetDamaged(f"{self.shards_at.url}/{shard}: missing (the manifest lists it)") from error
        if len(data) != end - base:
            raise DatasetDamaged(f"{self.shards_at.url}/{shard}: truncated: members {rows.keys[lo]}.* "
                                 f"to {rows.keys[hi - 1]}.* "
                                 f"need bytes {base}-{end} but the shard ends at byte {base + len(data)}")
        return data

    def _chunk_start(self, rows: ShardRows, lo: int) -> int:
        """Where a chunk's read starts: at its first image, or at that image's tar header when checked."""
        return int(rows.offsets[lo]) - (TAR_HEADER if self.verify == "members" else 0)

    def _check_members(self, shard: str, members: list[memoryview], headers: list[memoryview], keys: list[str],
                       expected: list[str], names: Iterable[str | None]) -> None:
        """Each image's tar header names it as a regular file of the indexed size, and its bytes hash to the index's
        sha256: a shard edited, reordered or damaged after it was written gives an error, never wrong samples.
        The name checked is ``<key>.<ext>`` in onion's shards, the indexed member name in shards indexed in place."""
        for member, header, key, digest, name in zip(members, headers, keys, expected, names):
            problem = header_problem(header, key, len(member), name)
            if problem is None and hashlib.sha256(member).hexdigest() != digest:
                problem = "its bytes do not match the sha256 in the index"
            if problem:
                shown = f"{name!r} (key {key})" if name is not None else f"{key}.*"
                raise DatasetDamaged(f"{self.shards_at.url}/{shard}: member {shown}: {problem}: the shard is corrupt "
                                     "or does not match its index (onion verify lists every problem)")

    def _verified_shard(self, name: str) -> bytes:
        data = self.shards_at.read_bytes(name)
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.shard_sha256.get(name):
            raise DatasetDamaged(
                f"{self.shards_at.url}/{name}: sha256 {actual[:16]}... does not match the manifest "
                f"({str(self.shard_sha256.get(name))[:16]}...): the shard is corrupt or was replaced"
            )
        return data


def header_name(header: bytes | memoryview) -> str:
    """The member name a USTAR header holds: prefix and name joined with ``/`` (bytes that are not
    UTF-8 shown as U+FFFD, as the index records them)."""
    name, prefix = (bytes(header[a:b]).split(b"\0", 1)[0] for a, b in ((0, 100), (345, 500)))
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def header_problem(header: memoryview, key: str, size: int, member_name: str | None = None) -> str | None:
    """What is wrong with the USTAR header in front of an image member of ``size`` bytes, if anything.

    In onion's own shards the header names ``<key>.<ext>``, without a folder. In shards indexed in place
    it must name ``member_name`` exactly, USTAR prefix and name joined with ``/``: for a name too long
    for those fields, that is the shortened form its writer (PAX, GNU) put in this header, which the
    index recorded (the full name is in the extended header before it, which the reader does not read)."""
    name, prefix = (bytes(header[a:b]).split(b"\0", 1)[0] for a, b in ((0, 100), (345, 500)))
    full = prefix + b"/" + name if prefix else name
    if (header_name(header) != member_name if member_name is not None
            else prefix or name.split(b".", 1)[0] != key.encode()):
        return f"the tar header there names {full.decode(errors='replace')!r}"
    if header[156:157] not in (b"0", b"\0"):
        return f"the tar header there is of type {bytes(header[156:157])!r}, not a regular file"
    try:
        declared = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
    except ValueError:
        return "the tar header's size field is not a number"
    return None if declared == size else f"the tar header says {declared} bytes, the index {size}"


def chunk_bounds(offsets: np.ndarray, sizes: np.ndarray, start: int, stop: int, limit: float,
                 max_gap: float = math.inf) -> Iterator[tuple[int, int]]:
    """Split rows ``[start, stop)`` into runs, each one ranged read: its byte span stays within
    ``limit`` and no two neighbouring rows in it are more than ``max_gap`` bytes apart (at least one row)."""
    lo = start
    while lo < stop:
        ends = offsets[lo:stop] + sizes[lo:stop] - offsets[lo]
        hi = lo + max(1, int(np.searchsorted(ends, limit, side="right")))
        gaps = offsets[lo + 1:hi] - (offsets[lo:hi - 1] + sizes[lo:hi - 1])
        far = np.flatnonzero(gaps > max_gap)
        if len(far):
            hi = lo + 1 + int(far[0])
        yield lo, hi
        lo = hi


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator, draws: int = 4096) -> Iterator:
    """Seeded buffer shuffle: holds ``size`` items, emits a random one as each new one arrives."""
    buffer: list = []
    slots = iter(())
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = next(slots, None)
        if j is None:  # random slots are drawn in blocks: one numpy call per ``draws`` items
            slots = iter(rng.integers(size, size=draws).tolist())
            j = next(slots)
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def stack_pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        first, second = sorted(shapes)[:2]
        raise DatasetError(f"images of different sizes in one batch ({first[1]}x{first[0]} and {second[1]}x{second[0]} "
                           "pixels): give ShardDataset an image_transform that makes them one size "
                           "(onion train does: see --augment and --img-size)")
    height, width, channels = arrays[0].shape
    batch = np.empty((len(arrays), channels, height, width), dtype=np.uint8)
    for slot, array in zip(batch, arrays):  # one copy per image, HWC to CHW (not a stack and then a transpose);
        slot[...] = array.transpose(2, 0, 1)  # any strides (a mirrored crop is a view)
    return torch.from_numpy(batch)


def batched(samples: Iterator, batch_size: int,
            stack: Callable[[list], torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``(images, labels, keys)`` batches of ``batch_size`` (the last may be short)."""
    batch: list[tuple] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield _collate(batch, stack)
            batch = []
    if batch:
        yield _collate(batch, stack)


def _collate(batch: list[tuple], stack: Callable[[list], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, keys = zip(*batch)
    return stack(list(images)), torch.tensor(labels), list(keys)


@dataclass(frozen=True)
class Example:
    key: str
    label: int | None  # None in an unlabelled dataset
    image_ext: str  # png, jpg or webp
    image: bytes  # the stored (encoded) file, byte for byte; to_pil() or decode_image() to see it

    def to_pil(self) -> Image.Image:
        """The image, decoded (a PIL image: ``.show()``, ``.save(...)``, ``numpy.asarray(...)``)."""
        with Image.open(io.BytesIO(self.image)) as image:
            image.load()
            return image


def index_row(dataset: Location, key: str) -> dict:
    """The index row of ``key`` in a complete dataset (an :class:`UnknownKey` error if there is none)."""
    read_manifest(dataset)
    index = read_index(dataset)
    rows = index.filter(pc.equal(index["key"], key)).to_pylist()
    if not rows:
        raise UnknownKey(f"{dataset.url}: no example with key {key!r}")
    return rows[0]


def read_example(url: str, key: str) -> Example:
    """One example by key, read by byte range from its shard through the index (no scan). Its tar header
    and sha256 are checked as the streaming reader checks them: a changed shard gives an error naming
    it, never another image's bytes."""
    dataset = location(url)
    row = index_row(dataset, key)
    if row["status"] != STATUS_OK:
        raise DatasetError(f"{dataset.url}: example {key!r} is {row['status']}: {row['reason']}")
    start, size, shard = row["image_offset"], row["image_size"], row["shard"]
    shards_at = shard_location(dataset)
    try:
        data = shards_at.read_range(shard, start - TAR_HEADER, start + size)
    except FileNotFoundError as error:
        raise DatasetDamaged(f"{shards_at.url}/{shard}: missing (the manifest lists it)") from error
    name = row.get(MEMBER_NAME)
    problem = (f"the shard ends at byte {start - TAR_HEADER + len(data)}, before the member's end ({start + size})"
               if len(data) != TAR_HEADER + size else header_problem(memoryview(data)[:TAR_HEADER], key, size, name))
    if problem is None and hashlib.sha256(memoryview(data)[TAR_HEADER:]).hexdigest() != row["sha256"]:
        problem = "its bytes do not match the sha256 in the index"
    if problem:
        shown = f"{name!r} (key {key})" if name is not None else f"{key}.*"
        raise DatasetDamaged(f"{shards_at.url}/{shard}: member {shown}: {problem}: the shard is corrupt or does not "
                             "match its index (onion verify lists every problem)")
    return Example(key=key, label=row["label"], image_ext=row["image_ext"], image=data[TAR_HEADER:])
