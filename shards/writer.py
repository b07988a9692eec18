"""Writing a dataset: shards first (each atomic), then the index, then the manifest (commit)."""
from __future__ import annotations

import hashlib

import pyarrow as pa

from shards.index import INDEX_NAME, INDEX_SCHEMA, rows_to_table, table_to_parquet_bytes
from shards.manifest import MANIFEST_NAME, DatasetInfo, ShardEntry, build_manifest, manifest_bytes
from shards.tarwriter import ShardExample, WrittenExample, build_shard
from shards.urls import Location


def write_shard(dataset: Location, name: str, split: str,
                examples: list[ShardExample]) -> tuple[ShardEntry, list[WrittenExample]]:
    """Write one tar shard atomically; return its manifest entry and the member spans."""
    data, written = build_shard(examples)
    dataset.write_atomic(name, data)
    entry = ShardEntry(name=name, split=split, examples=len(examples), bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest())
    return entry, written


def commit_dataset(dataset: Location, *, rows: list[dict], shards: list[ShardEntry], info: DatasetInfo,
                   schema: pa.Schema = INDEX_SCHEMA) -> dict:
    """Write ``index.parquet`` and then ``manifest.json``, which makes the dataset complete."""
    table = rows_to_table(rows, schema)
    index_data = table_to_parquet_bytes(table)
    dataset.write_atomic(INDEX_NAME, index_data)
    manifest = build_manifest(index=table, index_sha256=hashlib.sha256(index_data).hexdigest(), shards=shards,
                              info=info)
    dataset.write_atomic(MANIFEST_NAME, manifest_bytes(manifest))
    return manifest
