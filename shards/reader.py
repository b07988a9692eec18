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
from shards.index import (
    INDEX_FOLDER,
    MEMBER_NAME,
    STATUS_OK,
    find_rows,
    index_parts,
    parts_of_shards,
    read_index,
)
from shards.manifest import read_manifest, shard_location
from shards.partition import Segment, epoch_segments, rank_size
from shards.restriction import SharedFlags
from shards.selections import VERSION, kept_keys, partitioned_version, read_selection_part
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


@dataclass(frozen=True)
class SelectionParts:
    """A partitioned selection version as the reader uses it: its JSON and its part of each shard."""

    version: str
    layout: dict
    by_shard: dict[str, dict]  # shard -> its part's entry in the version's JSON


@dataclass
class ShardRows:
    """The rows of one shard in stored order, as arrays (no per-row Python objects)."""

    keys: pa.Array
    labels: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    sha256: pa.Array
    member_names: pa.Array | None = None  # the name each image's tar header holds, for shards indexed in place

    def __len__(self) -> int:
        return len(self.labels)

    def chosen(self, keep: np.ndarray) -> ShardRows:
        """The rows where ``keep`` (one bool per row) is true."""
        if keep.all():
            return self
        at = pa.array(np.flatnonzero(keep))
        return ShardRows(keys=self.keys.take(at), labels=self.labels[keep], offsets=self.offsets[keep],
                         sizes=self.sizes[keep], sha256=self.sha256.take(at),
                         member_names=None if self.member_names is None else self.member_names.take(at))

    @classmethod
    def of(cls, table: pa.Table) -> ShardRows:
        """One shard's rows (``READ_COLUMNS``), already in stored order."""
        return cls(keys=table["key"].combine_chunks(), labels=table["label"].fill_null(UNLABELLED).to_numpy(),
                   offsets=table["image_offset"].to_numpy(), sizes=table["image_size"].to_numpy(),
                   sha256=table["sha256"].combine_chunks(),
                   member_names=table[MEMBER_NAME].combine_chunks() if MEMBER_NAME in table.column_names else None)


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

    Memory: with a partitioned index (every dataset an onion of this version wrote), no ``index`` and
    either no ``selection`` or a partitioned selection version (what ``onion select`` writes on such a
    dataset), the reader holds only per-shard counts (from the manifest, or the selection's JSON) and
    the rows of the shards it is reading in the current epoch, read from those shards' index parts
    (and selection parts) when first needed (only the columns it uses); beyond the per-shard counts,
    what it holds does not grow with the dataset. ``keys()`` and ``restrict(keys)`` read the whole
    split's keys when called (and ``restrict(keys)`` then shares one bit per example with the workers:
    see :mod:`shards.restriction`); ``restrict(version)`` with a partitioned version reads it per shard.
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
        # (epoch, start_batch, restriction generation, restriction version number or 0) in shared memory:
        # persistent DataLoader workers see set_epoch's and restrict's values when the next epoch's
        # iteration starts, without being re-created (re-creating them costs a fraction of a second per
        # epoch: 20% of a short one).
        self._position = torch.zeros(4, dtype=torch.int64).share_memory_()
        self._restriction_parts: SelectionParts | None = None  # this process's copy of restrict()'s version
        self.shard_sha256 = {s["name"]: s["sha256"] for s in self.manifest["shards"]}
        self.max_gap = READ_GAP_BYTES["local" if self.shards_at.is_local else "remote"]
        # a partitioned selection version, by shard: read per shard with the index parts (see Memory above)
        self.selection_parts = self._selection_parts(selection) if index is None else None
        # lazy: rows are read per shard from the index parts when an epoch needs them (see Memory above)
        self.lazy = (index is None and index_parts(self.manifest) is not None
                     and (selection is None or self.selection_parts is not None))
        self.all_rows = {} if self.lazy else self._load_rows(selection, index)
        # usable examples per shard of the split (selection applied), in stored (name) order
        self.all_counts = (self._manifest_counts() if self.lazy
                           else {name: len(rows) for name, rows in self.all_rows.items()})
        if shards is not None:
            unknown = set(shards) - set(self.all_counts)
            if unknown:
                raise DatasetError(f"{self.dataset.url}: no shard {sorted(unknown)[0]!r} in split {split!r}")
            self.all_counts = {name: self.all_counts[name] for name in sorted(shards)}
            self.all_rows = {name: rows for name, rows in self.all_rows.items() if name in self.all_counts}
        self._flag_start = dict(zip(self.all_counts, np.r_[0, np.cumsum(list(self.all_counts.values()))].tolist()))
        # restrict(keys)'s choice: one flag per example in keys() order (shards by name, rows in stored order),
        # in a file made when it is called (see shards.restriction), so nothing per example is allocated before
        self._flags = SharedFlags()
        # per process: (generation, examples per shard this epoch, the rows of shards read so far this epoch)
        self._restricted: tuple[int, dict[str, int], dict[str, ShardRows]] = (0, dict(self.all_counts), {})

    def _selection_parts(self, selection: Selection | None) -> SelectionParts | None:
        """For a partitioned selection version (see shards.selections) over a partitioned index, whose parts
        each hold one shard: its part of each shard. None otherwise (the selection is then read whole)."""
        parts = index_parts(self.manifest)
        if not isinstance(selection, str) or parts is None or self.split != "train":
            return None
        layout = partitioned_version(self.dataset, selection) if VERSION.fullmatch(selection) else None
        if layout is None or any(len(part.shards) > 1 for part in parts):
            return None
        shard_of = {part.name: part.shards[0] for part in parts if part.shards}
        return SelectionParts(selection, layout, {shard_of[entry["name"]]: entry for entry in layout["parts"]
                                                  if entry["name"] in shard_of})

    def _manifest_counts(self) -> dict[str, int]:
        """Usable examples of the split per shard, as the index parts' manifest entries give them (with a
        partitioned selection: the examples it keeps per shard, as its parts' entries give them)."""
        if self.selection_parts is not None:
            return {shard: entry["kept"] for shard, entry in sorted(self.selection_parts.by_shard.items())
                    if entry["kept"]}
        counts: dict[str, int] = {}
        for part in index_parts(self.manifest) or []:
            for shard, by_split in part.examples.items():
                if by_split.get(self.split):
                    counts[shard] = counts.get(shard, 0) + by_split[self.split]
        if not counts and self.split not in self.manifest["counts"]["by_split"]:
            known = ", ".join(self.manifest["counts"]["by_split"]) or "none"
            raise DatasetError(f"{self.dataset.url}: no split {self.split!r} (splits: {known})")
        return dict(sorted(counts.items()))

    def _load_shard(self, shard: str, restriction: SelectionParts | None = None) -> ShardRows:
        """One shard's rows of the split, read from its index part alone (lazy mode): those the
        constructor's selection keeps, and of them those ``restriction`` (restrict()'s version) keeps."""
        table = read_index(self.dataset, READ_COLUMNS + ["split", "status"], manifest=self.manifest, shards=[shard])
        table = self._shard_tables(table).get(shard)
        for chosen in (self.selection_parts, restriction):
            if chosen is not None and table is not None:
                table = self._selected(chosen, shard, table)
        rows = ShardRows.of(table) if table is not None and len(table) else None
        last = restriction or self.selection_parts
        expected = last.by_shard[shard]["kept"] if last is not None else self.all_counts[shard]
        if rows is None or len(rows) != expected:
            parts = ", ".join(f"{INDEX_FOLDER}/{part.name}"
                              for part in parts_of_shards(index_parts(self.manifest) or [], [shard]))
            says = (f"selection {last.version} keeps {expected}" if last is not None
                    else f"the manifest says {expected}")
            raise DatasetDamaged(f"{self.dataset.url}/{parts}: holds {0 if rows is None else len(rows)} usable "
                                 f"{self.split} rows of {shard}, {says}")
        return rows

    def _selected(self, chosen: SelectionParts, shard: str, table: pa.Table) -> pa.Table:
        """The rows of ``shard`` that its part of the partitioned selection ``chosen`` keeps, each checked to
        be one of ``table``'s (usable rows of the split, and of the constructor's selection)."""
        part = read_selection_part(self.dataset, chosen.version, chosen.by_shard[shard], chosen.layout,
                                   ["key", "kept"])
        return table.filter(pc.is_in(table["key"], value_set=self._selected_keys(part, table["key"])))

    def _load_rows(self, selection: Selection | None, index: pa.Table | None) -> dict[str, ShardRows]:
        if index is None:
            index = read_index(self.dataset, columns=READ_COLUMNS + ["split", "status"], manifest=self.manifest)
        mask = pc.and_(pc.equal(index["split"], self.split), pc.equal(index["status"], STATUS_OK))
        table = index.filter(mask).select([name for name in READ_COLUMNS if name in index.column_names])
        if len(table) == 0 and self.split not in self.manifest["counts"]["by_split"]:
            known = ", ".join(self.manifest["counts"]["by_split"]) or "none"
            raise DatasetError(f"{self.dataset.url}: no split {self.split!r} (splits: {known})")
        if selection is not None:
            table = table.filter(pc.is_in(table["key"], value_set=self._selected_keys(selection, table["key"])))
        return self._shard_rows(table)

    def _shard_rows(self, table: pa.Table) -> dict[str, ShardRows]:
        """Usable rows of the split, by shard (in name order), each in stored order."""
        return {shard: ShardRows.of(rows) for shard, rows in self._shard_tables(table).items()}

    def _shard_tables(self, table: pa.Table) -> dict[str, pa.Table]:
        """Usable rows of the split, by shard (in name order), each in stored order, as tables."""
        if "split" in table.column_names:
            table = table.filter(pc.and_(pc.equal(table["split"], self.split), pc.equal(table["status"], STATUS_OK)))
        table = table.sort_by([("shard", "ascending"), ("image_offset", "ascending")])
        rows: dict[str, pa.Table] = {}
        shard_column = table["shard"].to_numpy(zero_copy_only=False)
        boundaries = np.flatnonzero(shard_column[1:] != shard_column[:-1]) + 1
        for start, stop in zip(np.r_[0, boundaries], np.r_[boundaries, len(table)]):
            if start < stop:
                rows[str(shard_column[start])] = table.slice(start, stop - start)
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
        A partitioned selection version (over a partitioned index with one shard per part) is read per
        shard, like the constructor's: its JSON gives the counts, and each shard's part is read only
        when that shard is (no key list of the whole split is made).
        """
        version = self._selection_parts(selection) if self.lazy else None
        self._restriction_parts = version
        self._position[3] = int(version.version[1:]) if version is not None else 0
        if version is not None or selection is None:
            self._flags.set(None)
        else:
            every = pa.array(self.keys(), pa.string())
            self._flags.set(pc.is_in(every, value_set=self._selected_keys(selection, every))
                            .to_numpy(zero_copy_only=False))
        self._position[2] += 1

    def _epoch_counts(self) -> dict[str, int]:
        """Examples per shard an epoch reads: ``all_counts`` less what ``restrict`` left out (empty shards dropped)."""
        generation = int(self._position[2])
        if self._restricted[0] != generation:
            version = self._restricted_version()
            if version is not None:
                missing = [name for name in self.all_counts if name not in version.by_shard]
                if missing:
                    raise DatasetDamaged(f"{self.dataset.url}/selections/{version.version}.json: no part for shard "
                                         f"{missing[0]} (of {len(missing)} shard(s) without one)")
                counts = {name: int(version.by_shard[name]["kept"]) for name in self.all_counts}
            elif (chosen := self._restriction_flags()) is not None:
                counts = {name: int(chosen[self._flag_start[name]:self._flag_start[name] + count].sum())
                          for name, count in self.all_counts.items()}
            else:
                counts = dict(self.all_counts)
            self._restricted = (generation, {name: count for name, count in counts.items() if count}, {})
        return self._restricted[1]

    def _rows_of(self, shard: str) -> ShardRows:
        """The rows of ``shard`` this epoch reads (restriction applied), read from its index part when lazy."""
        rows = self._restricted[2].get(shard)
        version = self._restricted_version()
        if rows is None and version is not None:
            rows = self._restricted[2][shard] = self._load_shard(shard, version)
        if rows is None:
            whole = self.all_rows[shard] if shard in self.all_rows else self._load_shard(shard)
            start, chosen = self._flag_start[shard], self._restriction_flags()
            rows = whole if chosen is None else whole.chosen(chosen[start:start + len(whole)])
            self._restricted[2][shard] = rows
        return rows

    def _restriction_flags(self) -> np.ndarray | None:
        """restrict(keys)'s flags over keys() (None: no such restriction)."""
        return self._flags.get(sum(self.all_counts.values()))

    def _restricted_version(self) -> SelectionParts | None:
        """restrict()'s partitioned version, as this process knows it (a persistent DataLoader worker learns
        the version's number through shared memory and reads its JSON itself); None without one."""
        number = int(self._position[3])
        if not number:
            return None
        if self._restriction_parts is None or int(self._restriction_parts.version[1:]) != number:
            self._restriction_parts = self._selection_parts(f"v{number:04d}")
        return self._restriction_parts

    @property
    def shard_rows(self) -> dict[str, ShardRows]:
        """The rows an epoch reads, by shard: all rows less what ``restrict`` left out (empty shards dropped).
        With a partitioned index this reads every shard's part: the reader itself reads only its own."""
        return {name: self._rows_of(name) for name in self._epoch_counts()}

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
        return sum(self._epoch_counts().values())

    def keys(self) -> np.ndarray:
        """Every key the split (or selection) holds, over all ranks, in stored order (``restrict`` aside).
        Sized by the whole split: with a partitioned index it reads the key column of every part."""
        if self.lazy and self.selection_parts is not None:
            parts = [self._load_shard(shard).keys.to_numpy(zero_copy_only=False) for shard in self.all_counts]
            return np.concatenate(parts) if parts else np.array([], dtype=object)
        if self.lazy:
            table = read_index(self.dataset, ["key", "shard", "image_offset", "split", "status"],
                               manifest=self.manifest, shards=list(self.all_counts))
            table = table.filter(pc.and_(pc.equal(table["split"], self.split), pc.equal(table["status"], STATUS_OK)))
            return table.sort_by([("shard", "ascending"), ("image_offset", "ascending")])["key"].to_numpy(
                zero_copy_only=False)
        parts = [rows.keys.to_numpy(zero_copy_only=False) for rows in self.all_rows.values()]
        return np.concatenate(parts) if parts else np.array([], dtype=object)

    def __len__(self) -> int:
        """Examples this rank yields per epoch (not batches)."""
        return rank_size(self.total_examples, self.rank, self.world_size)

    def segments(self, worker: int = 0, num_workers: int = 1) -> list[Segment]:
        return epoch_segments(
            self._epoch_counts(), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, rank=self.rank,
            world_size=self.world_size, worker=worker, num_workers=num_workers,
        )

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # A resumed DataLoader asks worker 0 first, so worker 0 takes the part whose batch is next.
        part = (worker + self.start_batch) % num_workers
        segments = self.segments(part, num_workers)
        reading = {segment.shard for segment in segments}
        loaded = self._restricted[2]
        for shard in [name for name in loaded if name not in reading]:  # an earlier epoch's: not needed again
            del loaded[shard]
        encoded = self._encoded(segments)
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
        chunks = ((segment.shard, lo, hi) for segment in segments  # a shard's rows are read when reached
                  for lo, hi in chunk_bounds(self._rows_of(segment.shard).offsets, self._rows_of(segment.shard).sizes,
                                             segment.start, segment.stop, limit, self.max_gap))
        for (shard, lo, hi), data in self._read_ahead(chunks):
            rows = self._rows_of(shard)
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

    def _read_ahead(self, chunks: Iterable[tuple[str, int, int]]) -> Iterator[tuple[tuple[str, int, int], bytes]]:
        """Each chunk with its bytes, in order, with up to READ_AHEAD further reads already in flight."""
        with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="onion-read") as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append((chunk, pool.submit(self._read_chunk, *chunk, self._rows_of(chunk[0]))))
                if len(pending) > READ_AHEAD:
                    chunk, future = pending.popleft()
                    yield chunk, future.result()
            while pending:
                chunk, future = pending.popleft()
                yield chunk, future.result()

    def _read_chunk(self, shard: str, lo: int, hi: int, rows: ShardRows) -> bytes:
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
    """The index row of ``key`` in a complete dataset (an :class:`UnknownKey` error if there is none), found
    part by part: never the whole index in memory."""
    rows = find_rows(dataset, pc.field("key") == key, read_manifest(dataset)).to_pylist()
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
