"""Where scores live: ``DATASET/scores/<name>``, one table per scorer run, rewritten when scored again.

Two layouts, both read by :func:`read_scores` as one table sorted by key:

* ``<name>.parquet``: every row in one file (datasets with a single-file index, and scores an earlier
  onion wrote).
* ``<name>.json``: *partitioned*, for datasets with a partitioned index: one Parquet part per index
  part that holds scored keys (``scores/parts/<name>/<fingerprint>/<index part's name>``, rows by
  key), listed in the JSON with rows and sha256. A job that needs the scores of a few index parts
  (a ``select`` actor) reads those parts alone (:func:`read_scores_part`). The JSON is the commit
  point: it is replaced atomically, then the parts of the scores it replaced are removed; the folder
  is named by the parts' checksums, so scoring again to the same values writes the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards import UsageError
from shards.index import (
    IndexPart,
    index_parts,
    matching_rows,
    parquet_bytes_to_table,
    read_index_part,
    read_listed_part,
    read_parquet,
    table_to_parquet_bytes,
)
from shards.manifest import read_manifest
from shards.urls import Location

SCORES = "scores"
PARTS = "parts"  # scores/parts/<name>/<fingerprint>/: the parts of partitioned scores
METADATA = b"onion"  # the table metadata that names the scorer (kept in the JSON too)


def scorer_metadata(scorer: str) -> dict[bytes, bytes]:
    """The table metadata naming the scorer (what a drop is called depends on it, never on the file's name)."""
    return {METADATA: json.dumps({"scorer": scorer}).encode()}


def score_names(dataset: Location) -> list[str]:
    """The stored score tables, either layout, sorted."""
    names = (name.rsplit(".", 1) for name in dataset.child(SCORES).list_names() if "." in name)
    return sorted({stem for stem, suffix in names if suffix in ("parquet", "json")})


def write_scores(dataset: Location, name: str, table: pa.Table) -> str:
    """Store ``table`` as ``scores/<name>``: one part per index part on a dataset with a partitioned index,
    else one file. Returns where it went (the JSON or the file)."""
    folder = dataset.child(SCORES)
    parts = index_parts(read_manifest(dataset))
    if parts is None:
        folder.write_atomic(f"{name}.parquet", table_to_parquet_bytes(table))
        return f"{dataset.url}/{SCORES}/{name}.parquet"
    written = [(part.name, table_to_parquet_bytes(rows)) for part, rows in _by_index_part(dataset, parts, table)]
    if not written and parts:  # nothing scored: one empty part keeps the table's columns
        written = [(parts[0].name, table_to_parquet_bytes(table))]
    entries = [score_part_entry(part_name, data) for part_name, data in written]
    identity = scores_identity(entries)
    for part_name, data in written:
        write_score_part(dataset, name, identity, part_name, data)
    return commit_scores(dataset, name, identity, entries, (table.schema.metadata or {}).get(METADATA, b"{}"))


def score_part_entry(part_name: str, data: bytes) -> dict:
    """How the JSON lists one part: its index part's name, rows and checksum."""
    return {"name": part_name, "rows": _rows(data), "sha256": hashlib.sha256(data).hexdigest()}


def scores_identity(entries: list[dict]) -> str:
    """The parts folder's name: the checksum of the parts' checksums (the same values, the same name)."""
    return hashlib.sha256("\n".join(entry["sha256"] for entry in entries).encode()).hexdigest()


def write_score_part(dataset: Location, name: str, identity: str, part_name: str, data: bytes) -> None:
    """One part, written before the JSON that lists it (by whichever process computed it)."""
    dataset.child(SCORES, PARTS, name, identity).write_atomic(part_name, data)


def commit_scores(dataset: Location, name: str, identity: str, entries: list[dict], metadata: bytes) -> str:
    """Point ``scores/<name>.json`` at the parts already written under ``identity`` (the commit), then
    remove what it replaced. Returns the JSON's URL."""
    folder = dataset.child(SCORES)
    layout = {"layout": PARTS, "folder": f"{PARTS}/{name}/{identity}", "rows": sum(entry["rows"] for entry in entries),
              "metadata": metadata.decode(), "parts": entries}
    folder.write_atomic(f"{name}.json", json.dumps(layout, indent=1, sort_keys=True).encode())
    if folder.exists(f"{name}.parquet"):  # an earlier onion's single file of the same name: replaced
        folder.remove(f"{name}.parquet")
    for stale in folder.child(PARTS, name).list_names():
        if stale != identity:
            folder.child(PARTS, name).remove(stale, recursive=True)
    return f"{dataset.url}/{SCORES}/{name}.json"


def _rows(data: bytes) -> int:
    return parquet_bytes_to_table(data, columns=[]).num_rows


def _by_index_part(dataset: Location, parts: list[IndexPart], table: pa.Table) -> Iterator[tuple[IndexPart, pa.Table]]:
    """``table``'s rows by the index part holding each key (in the manifest's order), each by key."""
    keys, numbers = [], []
    for number, part in enumerate(parts):
        part_keys = read_index_part(dataset, part, ["key"])["key"].combine_chunks()
        keys.append(part_keys)
        numbers.append(np.full(len(part_keys), number, np.int64))
    at = pc.index_in(table["key"], value_set=pa.concat_arrays(keys) if keys else pa.array([], pa.string()))
    if at.null_count:
        unknown = table["key"].filter(pc.is_null(at))[0].as_py()
        raise UsageError(f"{dataset.url}: scores name {at.null_count} key(s) the index does not hold "
                         f"(first: {unknown!r})")
    part_of = np.concatenate(numbers)[at.to_numpy(zero_copy_only=False)] if len(table) else np.zeros(0, np.int64)
    ordered = table.append_column("_part", pa.array(part_of)).sort_by([("_part", "ascending"), ("key", "ascending")])
    bounds = np.searchsorted(ordered["_part"].to_numpy(), np.arange(len(parts) + 1))
    for number, part in enumerate(parts):
        if bounds[number + 1] > bounds[number]:
            rows = ordered.slice(bounds[number], bounds[number + 1] - bounds[number]).drop_columns(["_part"])
            yield part, rows.replace_schema_metadata(table.schema.metadata)


def scores_layout(dataset: Location, name: str) -> dict | None:
    """Partitioned scores' JSON, or None when ``name`` is one file (or missing)."""
    folder = dataset.child(SCORES)
    return json.loads(folder.read_bytes(f"{name}.json")) if folder.exists(f"{name}.json") else None


def read_scores(dataset: Location, name: str, columns: list[str] | None = None) -> pa.Table:
    """``scores/<name>`` whole, sorted by key (``columns=[]``: no column, only the metadata naming the scorer)."""
    layout = scores_layout(dataset, name)
    if layout is None:
        if not dataset.child(SCORES).exists(f"{name}.parquet"):
            known = ", ".join(score_names(dataset)) or "none yet"
            raise UsageError(f"{dataset.url}: no scores/{name}.parquet (scores: {known}; "
                             f"make one with: onion score {dataset.url} SCORER ...)")
        return read_parquet(dataset.child(SCORES), name, columns)
    tables = [read_scores_part(dataset, name, layout, entry, columns) for entry in layout["parts"]]
    if not tables or columns == []:  # no scored key, or no column asked for: the metadata alone
        return pa.table({}).replace_schema_metadata({METADATA: layout["metadata"].encode()})
    table = pa.concat_tables(tables)
    return table.sort_by("key") if columns is None or "key" in columns else table


def read_scores_part(dataset: Location, name: str, layout: dict, entry: dict,
                     columns: list[str] | None = None) -> pa.Table:
    """One part of partitioned scores, checked against its sha256: a missing or changed part is named."""
    data = read_listed_part(dataset.child(SCORES, *layout["folder"].split("/")), entry, f"scores/{name}.json")
    return parquet_bytes_to_table(data, columns=columns)


def matching_score_rows(dataset: Location, name: str, condition: pc.Expression,
                        columns: list[str] | None = None) -> pa.Table:
    """The rows of ``scores/<name>`` where ``condition`` holds, one file or one part at a time."""
    layout = scores_layout(dataset, name)
    if layout is None:
        return matching_rows(dataset.child(SCORES), name, condition, columns)
    found = []  # parts are a shard's rows each: read whole, filtered, then the columns asked for
    for entry in layout["parts"]:
        rows = read_scores_part(dataset, name, layout, entry).filter(condition)
        if len(rows):
            found.append(rows if columns is None else rows.select(columns))
    return pa.concat_tables(found) if found else pa.table({})


def column_parts(dataset: Location, name: str, column: str) -> Iterator[pa.ChunkedArray]:
    """``column`` of ``scores/<name>``, one part (or the one file) at a time: what is held is one part."""
    layout = scores_layout(dataset, name)
    if layout is None:
        yield read_scores(dataset, name, columns=[column])[column]
        return
    for entry in layout["parts"]:
        yield read_scores_part(dataset, name, layout, entry, [column])[column]
