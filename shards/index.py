"""The Arrow/Parquet index: one row per example, queryable as is by pyarrow, DuckDB or Polars.

Rows of quarantined examples carry the reason and the source reference but no shard.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
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
        pa.field("original_width", pa.int32()),  # the input's size (after EXIF orientation) before any resize
        pa.field("original_height", pa.int32()),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("planted", pa.string()),
    ]
)
# Columns added after datasets were first written: an index without them reads them as nulls.
ADDED_COLUMNS = ("original_width", "original_height")
# Only in the index of shards indexed in place (``onion ingest wds:PATTERN OUT --in-place``): the name the
# tar header in front of each image holds (``dir.v1/000123.jpg``; for a name longer than a USTAR header
# takes, the shortened form a PAX or GNU writer put there), which the reader checks instead of ``<key>.<ext>``.
MEMBER_NAME = "member_name"
IN_PLACE_SCHEMA = INDEX_SCHEMA.append(pa.field(MEMBER_NAME, pa.string()))


def rows_to_table(rows: list[dict], schema: pa.Schema = INDEX_SCHEMA) -> pa.Table:
    """Rows (dicts with the schema's names) to a table sorted by key, so output is canonical."""
    table = pa.Table.from_pylist(rows, schema=schema)
    return table.sort_by("key") if len(table) else table


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def parquet_bytes_to_table(data: bytes, columns: list[str] | None = None,
                           optional: tuple[str, ...] = ()) -> pa.Table:
    """A Parquet file's bytes to a table.

    The bytes are first copied into Arrow-owned memory and read through a native ``BufferReader``,
    never through a Python file object (``io.BytesIO``) or a buffer wrapping Python ``bytes``.
    ``pq.read_table`` reads through async generators whose last references (the file reader, its
    pre-buffer ``ReadRangeCache`` and the buffers it read) may be released on one of Arrow's
    IO/CPU pool threads *after* ``read_table`` has returned. When those buffers wrap Python objects
    their destructor calls ``PyGILState_Ensure``; if that happens while the interpreter is
    finalizing, CPython ends the thread with ``pthread_exit``, whose forced unwind through a
    ``noexcept`` C++ destructor calls ``std::terminate``: "terminate called without an active
    exception", exit 134, in up to half of short scripts that read an index and exit (gdb: the
    aborting thread is in ``arrow::py::PyBuffer::~PyBuffer`` <- ``ReadRangeCache::LazyImpl``
    dtor). Arrow-owned memory frees without the GIL, so a late release is harmless. One memcpy.

    Names in ``optional`` are left out of ``columns`` when the file does not hold them.
    """
    stream = pa.BufferOutputStream()
    stream.write(data)
    buffer = stream.getvalue()
    if columns is not None and optional:
        names = set(pq.read_schema(pa.BufferReader(buffer)).names)
        columns = [name for name in columns if name in names or name not in optional]
    return pq.read_table(pa.BufferReader(buffer), columns=columns)


def read_index(dataset: Location, columns: list[str] | None = None) -> pa.Table:
    """The index, or the named ``columns`` of it; a column of :data:`ADDED_COLUMNS` that an older
    dataset's index lacks comes back as nulls, so readers need not care which version wrote it.
    :data:`MEMBER_NAME`, asked for by name, is simply left out where the index has none (copied shards)."""
    table = parquet_bytes_to_table(dataset.read_bytes(INDEX_NAME), columns=columns,
                                   optional=(*ADDED_COLUMNS, MEMBER_NAME))
    missing = [name for name in ADDED_COLUMNS if name not in table.column_names
               and (columns is None or name in columns)]
    for name in missing:
        field = INDEX_SCHEMA.field(name)
        table = table.append_column(field, pa.nulls(len(table), field.type))
    if missing:
        table = table.select([n for n in columns if n in table.column_names] if columns is not None else
                             [n for n in INDEX_SCHEMA.names if n in table.column_names]
                             + [n for n in table.column_names if n not in INDEX_SCHEMA.names])
    return table


def usable_train(index: pa.Table) -> pa.Table:
    """The rows a selection chooses among: train split, status ok."""
    return index.filter(pc.and_(pc.equal(index["split"], "train"), pc.equal(index["status"], STATUS_OK)))


def parquet_names(folder: Location) -> list[str]:
    """Sorted names (without ``.parquet``) of the tables in ``folder`` (scores/, selections/, ...)."""
    return sorted(name[: -len(".parquet")] for name in folder.list_names() if name.endswith(".parquet"))


def read_parquet(folder: Location, name: str, columns: list[str] | None = None) -> pa.Table:
    """``folder/name.parquet`` read whole (tables here are small; one request on object stores)."""
    return parquet_bytes_to_table(folder.read_bytes(f"{name}.parquet"), columns=columns)
