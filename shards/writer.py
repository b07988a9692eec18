"""Writing a dataset: shards first (each atomic), then the index parts, then the manifest (commit)."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from shards.index import (
    INDEX_FOLDER,
    INDEX_SCHEMA,
    IndexPart,
    part_name,
    rows_to_table,
    table_to_parquet_bytes,
    usable_examples,
)
from shards.manifest import (
    MANIFEST_NAME,
    DatasetInfo,
    ShardEntry,
    build_manifest,
    count_rows,
    manifest_bytes,
)
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


def write_index_part(dataset: Location, name: str, rows: list[dict] | pa.Table,
                     schema: pa.Schema = INDEX_SCHEMA) -> tuple[IndexPart, dict]:
    """Write one part of the partitioned index (``index/<name>``, rows sorted by key) atomically; return
    its manifest entry and its row counts (summed into the manifest's by :func:`commit_dataset`)."""
    table = rows if isinstance(rows, pa.Table) else rows_to_table(rows, schema)
    if isinstance(rows, pa.Table) and len(table):
        table = table.sort_by("key")
    data = table_to_parquet_bytes(table)
    dataset.child(INDEX_FOLDER).write_atomic(name, data)
    shards = sorted({shard for shard in table["shard"].to_pylist() if shard is not None})
    return (IndexPart(name, len(table), hashlib.sha256(data).hexdigest(), tuple(shards), usable_examples(table)),
            count_rows(table))


def write_index_by_shard(dataset: Location, index: pa.Table) -> list[tuple[IndexPart, dict]]:
    """Write a whole index as one part per shard (``part-000000.parquet`` ... in shard order), the rows
    without a shard (quarantined) in a last part: how an index written in one piece is partitioned."""
    shards = sorted(set(index["shard"].drop_null().to_pylist()))
    groups = [index.filter(pc.equal(index["shard"], shard)) for shard in shards]
    orphans = index.filter(pc.is_null(index["shard"]))
    return [write_index_part(dataset, part_name(number), group)
            for number, group in enumerate([*groups, *([orphans] if len(orphans) else [])])]


def commit_dataset(dataset: Location, *, parts: list[tuple[IndexPart, dict]], shards: list[ShardEntry],
                   info: DatasetInfo) -> dict:
    """Write ``manifest.json`` over the index parts already written, which makes the dataset complete."""
    manifest = build_manifest(parts=parts, shards=shards, info=info)
    dataset.write_atomic(MANIFEST_NAME, manifest_bytes(manifest))
    return manifest
