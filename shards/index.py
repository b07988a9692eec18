"""The Arrow/Parquet index: one row per example, queryable as is by pyarrow, DuckDB or Polars.

Rows of quarantined examples carry the reason and the source reference but no shard.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from shards.urls import Location

INDEX_NAME = "index.parquet"
STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"

INDEX_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("image_ext", pa.string()),
        pa.field("image_offset", pa.int64()),
        pa.field("image_size", pa.int64()),
        pa.field("cls_offset", pa.int64()),
        pa.field("cls_size", pa.int64()),
        pa.field("json_offset", pa.int64()),
        pa.field("json_size", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("planted", pa.string()),
    ]
)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with the schema's names) to a table sorted by key, so output is canonical."""
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    return table.sort_by("key") if len(table) else table


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def parquet_bytes_to_table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def read_index(dataset: Location, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(dataset.read_bytes(INDEX_NAME)), columns=columns)
