"""The Arrow/Parquet index: one row per example, queryable as is by pyarrow, DuckDB or Polars.

Rows of quarantined examples carry the reason and the source reference but no shard.

The index is **partitioned**: one Parquet part per shard under ``index/`` (``index/train-000003.parquet``
beside ``train-000003.tar``; ``index/part-000003.parquet`` for tars indexed in place), rows sorted by
key, each written by the task that wrote or indexed the shard, and listed in the manifest with its
row count, sha256, the shard(s) it covers (a part with no shard holds only quarantined rows) and
their usable examples per split. A reader that is assigned a few shards opens only their parts, so
nothing it holds is sized by the dataset. Datasets written before hold one ``index.parquet``; every
function here reads both layouts, and ``onion upgrade DATASET`` rewrites the old one as parts.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shards.errors import DatasetDamaged, DatasetError
from shards.urls import Location

INDEX_NAME = "index.parquet"  # the single-file index of datasets written before the index was partitioned
INDEX_FOLDER = "index"  # the partitioned index: index/part-000000.parquet, ...
INDEX_LAYOUT = "parts"  # the manifest's ``index.layout`` for a partitioned index
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


@dataclass(frozen=True)
class IndexPart:
    """One file of a partitioned index, as the manifest lists it."""

    name: str  # under index/
    rows: int
    sha256: str
    shards: tuple[str, ...]  # the shards whose rows it holds (none: quarantined rows only)
    examples: dict = field(default_factory=dict, compare=False)  # usable rows: {shard: {split: count}}

    def entry(self) -> dict:
        return {"name": self.name, "rows": self.rows, "sha256": self.sha256, "shards": list(self.shards),
                "examples": self.examples}

    @classmethod
    def of_entry(cls, entry: dict) -> IndexPart:
        return cls(entry["name"], entry["rows"], entry["sha256"], tuple(entry["shards"]), entry.get("examples", {}))


def usable_examples(table: pa.Table) -> dict[str, dict[str, int]]:
    """``{shard: {split: count}}`` of a part's usable (status ok) rows: what a reader cuts an epoch by."""
    usable = table.filter(pc.equal(table["status"], STATUS_OK)).group_by(["shard", "split"]).aggregate(
        [("key", "count")])
    examples: dict[str, dict[str, int]] = {}
    for row in sorted(usable.to_pylist(), key=lambda r: (r["shard"], r["split"])):
        examples.setdefault(row["shard"], {})[row["split"]] = row["key_count"]
    return examples


def part_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


def index_parts(manifest: dict) -> list[IndexPart] | None:
    """The parts the manifest lists, or None for a single-file ``index.parquet`` (an earlier onion's)."""
    index = manifest.get("index", {})
    if index.get("layout") != INDEX_LAYOUT:
        return None
    return [IndexPart.of_entry(entry) for entry in index["parts"]]


def read_part_bytes(dataset: Location, part: IndexPart) -> bytes:
    """A part's bytes, checked against the manifest: a missing or changed part is an error naming it."""
    where = f"{dataset.url}/{INDEX_FOLDER}/{part.name}"
    try:
        data = dataset.read_bytes(INDEX_FOLDER, part.name)
    except FileNotFoundError as error:
        raise DatasetDamaged(f"{where}: missing (the manifest lists it, with {part.rows} index rows)") from error
    if hashlib.sha256(data).hexdigest() != part.sha256:
        raise DatasetDamaged(f"{where}: sha256 {hashlib.sha256(data).hexdigest()[:16]}... does not match the "
                             f"manifest ({part.sha256[:16]}...): the index part is corrupt or was replaced")
    return data


def read_listed_part(folder: Location, entry: dict, listed_by: str) -> bytes:
    """The bytes of a part that a listing (``listed_by``: a selection version, a scores JSON) names with its
    rows and sha256: a missing or changed part is an error naming it."""
    where = f"{folder.url}/{entry['name']}"
    try:
        data = folder.read_bytes(entry["name"])
    except FileNotFoundError as error:
        raise DatasetDamaged(f"{where}: missing ({listed_by} lists it, with {entry['rows']} rows)") from error
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DatasetDamaged(f"{where}: sha256 does not match {listed_by}: the part is corrupt or was replaced")
    return data


def parts_of_shards(parts: list[IndexPart], shards: Iterable[str]) -> list[IndexPart]:
    """The parts holding the rows of ``shards`` (each once, in the manifest's order)."""
    wanted = set(shards)
    return [part for part in parts if wanted.intersection(part.shards)]


def read_index(dataset: Location, columns: list[str] | None = None, *, manifest: dict | None = None,
               shards: Iterable[str] | None = None) -> pa.Table:
    """The index, or the named ``columns`` of it; a column of :data:`ADDED_COLUMNS` that an older
    dataset's index lacks comes back as nulls, so readers need not care which version wrote it.
    :data:`MEMBER_NAME`, asked for by name, is simply left out where the index has none (copied shards).

    ``shards``: only the rows of these shards, read from their parts alone (in a single-file index,
    the whole file is read and filtered). Without it, every row, sorted by key as the single file is.
    """
    if manifest is None:
        from shards.manifest import read_manifest  # the manifest module imports this one

        manifest = read_manifest(dataset)
    parts = index_parts(manifest)
    optional = (*ADDED_COLUMNS, MEMBER_NAME)
    if parts is None:
        table = parquet_bytes_to_table(dataset.read_bytes(INDEX_NAME), columns=columns, optional=optional)
        if shards is not None:
            table = _only_shards(table, shards, columns)
    else:
        chosen = parts if shards is None else parts_of_shards(parts, shards)
        # the shard column to filter by; the key to put the rows of several parts in key order
        needed = "shard" if shards is not None else "key"
        wanted = columns if columns is None or needed in columns else [*columns, needed]
        tables = [_read_part(dataset, part, wanted, optional) for part in chosen]
        table = (pa.concat_tables(tables, promote_options="permissive") if tables
                 else _empty(wanted, dataset))
        if shards is not None and any(not set(part.shards) <= set(shards) for part in chosen):
            table = _only_shards(table, shards, wanted)
        elif shards is None and len(chosen) > 1:
            table = table.sort_by("key")
        if wanted is not columns:
            table = table.drop_columns([needed])
    return with_added_columns(table, columns)


def index_dataset(dataset: Location, manifest: dict | None = None) -> pads.Dataset | pa.Table:
    """The index for a query engine (DuckDB's ``index`` in ``inspect --sql``): on a local disk a
    ``pyarrow.dataset`` over its parts, scanned lazily with projection and filters pushed down, so a
    query does not load the index whole (parts read this way are not checked against the manifest's
    sha256; ``read_index`` and the reader check them). Elsewhere the whole index, read as ``read_index``
    reads it: a scan through fsspec file objects would hand Arrow buffers owned by Python, which can
    abort the interpreter at exit (see :func:`parquet_bytes_to_table`)."""
    if manifest is None:
        from shards.manifest import read_manifest

        manifest = read_manifest(dataset)
    if not dataset.is_local:
        return read_index(dataset, manifest=manifest)
    parts = index_parts(manifest)
    paths = ([dataset.path(INDEX_NAME)] if parts is None
             else [dataset.path(INDEX_FOLDER, part.name) for part in parts])
    return pads.dataset(paths, filesystem=pafs.LocalFileSystem(), format="parquet")


def find_rows(dataset: Location, condition: pc.Expression, manifest: dict) -> pa.Table:
    """The index rows where ``condition`` holds (``pc.field("key") == key``), reading one part at a time
    (each checked against the manifest): never the whole index in memory."""
    parts = index_parts(manifest)
    if parts is None:
        return read_index(dataset, manifest=manifest).filter(condition)
    found = [_read_part(dataset, part, None, (*ADDED_COLUMNS, MEMBER_NAME)).filter(condition) for part in parts]
    found = [table for table in found if len(table)]
    return with_added_columns(pa.concat_tables(found, promote_options="permissive"), None) if found else \
        _empty(None, dataset)


def read_index_part(dataset: Location, part: IndexPart, columns: list[str] | None = None) -> pa.Table:
    """One part of a partitioned index (quarantined rows included), checked against the manifest."""
    return with_added_columns(_read_part(dataset, part, columns, (*ADDED_COLUMNS, MEMBER_NAME)), columns)


def _read_part(dataset: Location, part: IndexPart, columns: list[str] | None,
               optional: tuple[str, ...]) -> pa.Table:
    try:
        return parquet_bytes_to_table(read_part_bytes(dataset, part), columns=columns, optional=optional)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetDamaged(f"{dataset.url}/{INDEX_FOLDER}/{part.name}: not a readable Parquet index part "
                             f"({error})") from error


def _only_shards(table: pa.Table, shards: Iterable[str], columns: list[str] | None) -> pa.Table:
    table = table.filter(pc.is_in(table["shard"], value_set=pa.array(sorted(set(shards)), pa.string())))
    return table if columns is None or "shard" in columns else table.drop_columns(["shard"])


def _empty(columns: list[str] | None, dataset: Location) -> pa.Table:
    names = columns if columns is not None else INDEX_SCHEMA.names
    fields = [IN_PLACE_SCHEMA.field(name) for name in names if name in IN_PLACE_SCHEMA.names]
    if len(fields) != len(names):
        raise DatasetError(f"{dataset.url}: the index has no column {sorted(set(names) - set(IN_PLACE_SCHEMA.names))}")
    return pa.schema(fields).empty_table()


def with_added_columns(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """``table`` with the :data:`ADDED_COLUMNS` it lacks (of those asked for) as nulls."""
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


def matching_rows(folder: Location, name: str, condition: pc.Expression,
                  columns: list[str] | None = None) -> pa.Table:
    """The rows of ``folder/name.parquet`` where ``condition`` holds (``pc.field("key") == key``): a scan that
    holds one batch at a time and skips row groups whose statistics rule them out (a selection or score
    table sorted by key is read one row group deep for a key), never the whole table."""
    if not folder.is_local:  # see index_dataset: no scans through Python file objects
        return read_parquet(folder, name, columns).filter(condition)
    table = pads.dataset(folder.path(f"{name}.parquet"), filesystem=pafs.LocalFileSystem(), format="parquet")
    return table.to_table(columns=columns, filter=condition)


def read_parquet(folder: Location, name: str, columns: list[str] | None = None) -> pa.Table:
    """``folder/name.parquet`` read whole (tables here are small; one request on object stores)."""
    return parquet_bytes_to_table(folder.read_bytes(f"{name}.parquet"), columns=columns)
