"""``onion upgrade``: rewrite a dataset an earlier onion wrote in this onion's format, in place.

Today that is one change: a single-file ``index.parquet`` becomes the partitioned index (one part
per shard, see :mod:`shards.index`). The parts are written first, then the manifest (the commit
point: a reader sees the old dataset or the new one, never a mix), then the old file is removed.
Shards, scores and selections are not touched, so nothing that refers to the dataset changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from shards.index import INDEX_NAME, index_parts, read_index
from shards.manifest import MANIFEST_NAME, index_entry, manifest_bytes, read_manifest
from shards.urls import location
from shards.writer import write_index_by_shard


@dataclass(frozen=True)
class Upgrade:
    url: str
    changed: bool  # False: the dataset was already in this onion's format
    parts: int
    rows: int


def upgrade_dataset(url: str) -> Upgrade:
    dataset = location(url)
    manifest = read_manifest(dataset)
    parts = index_parts(manifest)
    if parts is not None:
        return Upgrade(dataset.url, False, len(parts), sum(part.rows for part in parts))
    index = read_index(dataset, manifest=manifest)
    written = [part for part, _ in write_index_by_shard(dataset, index)]
    upgraded = {**manifest, "index": index_entry(written),
                "upgraded_from": {"index": manifest.get("index", {"name": INDEX_NAME})}}
    dataset.write_atomic(MANIFEST_NAME, manifest_bytes(upgraded))
    dataset.remove(INDEX_NAME)
    return Upgrade(dataset.url, True, len(written), len(index))
