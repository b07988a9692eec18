"""An existing onion dataset as a source: re-shard it (other shard size or image format).

Keys, labels, splits and planted marks are kept; quarantined rows stay quarantined with their
original reason, so the accounting carries over.
"""
from __future__ import annotations

from pipeline.ingest.sources.base import Record, Source, SourceError
from shards import STATUS_OK, DatasetError, location, read_index, read_manifest
from shards.manifest import is_labelled, shard_location
from shards.reader import READ_CHUNK_BYTES
from shards.urls import Location


class DatasetSource(Source):
    """All of a dataset, or (``only_keys``) just those examples plus whole ``whole_splits``."""

    def __init__(self, url: str, only_keys: frozenset[str] | None = None, whole_splits: tuple[str, ...] = (),
                 label: str | None = None) -> None:
        self.spec = f"dataset:{url}" + (f"#{label}" if label else "")
        self.only_keys, self.whole_splits = only_keys, whole_splits
        self.dataset = location(url)
        try:
            manifest = read_manifest(self.dataset)
        except DatasetError as error:
            raise SourceError(str(error)) from error
        self.class_names = list(manifest["class_names"])
        self.labelled = is_labelled(manifest)
        self.shards_at = shard_location(self.dataset, manifest)  # shards indexed in place are elsewhere
        self._fetched: dict[str, bytes] = {}

    def records(self) -> list[Record]:
        records = []
        for row in read_index(self.dataset).to_pylist():
            if (self.only_keys is not None and row["key"] not in self.only_keys
                    and row["split"] not in self.whole_splits):
                continue
            ok = row["status"] == STATUS_OK
            records.append(Record(
                key=row["key"], split=row["split"], label=row["label"], source_ref=row["source_ref"],
                est_bytes=(row["image_size"] or 0) + 1024,
                locator=(row["shard"], row["image_offset"], row["image_size"]) if ok else None,
                planted=row["planted"], quarantine=None if ok else row["reason"],
                original_size=(row["original_width"], row["original_height"])
                if ok and row["original_width"] is not None else None,
            ))
        return records

    def prefetch(self, records: list[Record]) -> None:
        """Read the records' members as a few ranges of neighbouring members, concurrently."""
        self._fetched = read_members(self.shards_at, [record.locator + (record.key,) for record in records])

    def load(self, record: Record) -> bytes:
        shard, offset, size = record.locator
        fetched = self._fetched.pop(record.key, None)
        return fetched if fetched is not None else self.shards_at.read_range(shard, offset, offset + size)


def coalesce(members: list[tuple[str, int, int, str]], gap: int = 64 << 10,
             limit: int = READ_CHUNK_BYTES) -> list[tuple[str, int, int, list[tuple[str, int, int]]]]:
    """Sorted ``(shard, offset, size, key)`` members merged into ranges ``(shard, start, end, members)``:
    neighbours less than ``gap`` bytes apart share one range of at most ``limit`` bytes."""
    runs: list[tuple[str, int, int, list]] = []
    for shard, offset, size, key in members:
        if runs and runs[-1][0] == shard and offset - runs[-1][2] < gap and offset + size - runs[-1][1] <= limit:
            shard_, start, _, grouped = runs[-1]
            runs[-1] = (shard_, start, offset + size, grouped)
        else:
            runs.append((shard, offset, offset + size, []))
        runs[-1][3].append((key, offset, size))
    return runs


def read_members(folder: Location, members: list[tuple[str, int, int, str]]) -> dict[str, bytes]:
    """``(file, offset, size, key)`` byte ranges of files under ``folder``, read as a few coalesced
    ranges, concurrently where the filesystem can: ``{key: bytes}``."""
    runs = coalesce(sorted(members))
    chunks = folder.read_ranges([(name, start, end) for name, start, end, _ in runs])
    return {key: chunk[offset - start:offset - start + size]
            for (_, start, _, grouped), chunk in zip(runs, chunks) for key, offset, size in grouped}
