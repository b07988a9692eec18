"""Survivor shards: the kept examples of a selection, repacked as a dataset the trainer streams.

``DATASET/kept/vNNNN/`` holds the kept train examples and the whole val split, in new balanced,
shuffled shards written by Ray tasks (the ingest machinery, so it is resumable and
byte-deterministic too), with its own index and a manifest that records the selection's accounting.

Or, for a user who keeps their own loader, only the kept keys per shard (:func:`write_kept_keys`,
``onion materialize DATASET --selection vNNNN --keys PREFIX``): nothing is copied.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.ingest.job import IngestOptions, IngestReport, ingest
from pipeline.ingest.sources.dataset import DatasetSource
from shards import DatasetError, UsageError, location, read_index, read_manifest
from shards.index import table_to_parquet_bytes
from shards.manifest import shard_location
from shards.selections import kept_keys, read_selection
from shards.urls import Location, join_url

KEPT = "kept"


def kept_url(dataset_url: str, version: str) -> str:
    return join_url(dataset_url, KEPT, version)


def selection_accounting(selection) -> dict:  # noqa: ANN001 - a pyarrow Table
    kept = int(pc.sum(selection["kept"]).as_py() or 0)
    quarantined = int(pc.sum(pc.equal(selection["reason"], "quarantined")).as_py() or 0)
    accounting = {"source_train_examples": selection.num_rows, "kept": kept,
                  "dropped": selection.num_rows - kept - quarantined, "quarantined": quarantined}
    if accounting["kept"] + accounting["dropped"] + accounting["quarantined"] != accounting["source_train_examples"]:
        raise RuntimeError(f"selection accounting broken: {accounting}")
    return accounting


def materialize(dataset_url: str, version: str, options: IngestOptions, command: list[str], *,
                progress: bool = True) -> IngestReport:
    selection = read_selection(location(dataset_url), version)
    kept = frozenset(selection.filter(selection["kept"])["key"].to_pylist())
    source = DatasetSource(dataset_url, only_keys=kept, whole_splits=("val",), label=version)
    accounting = {"version": version, **selection_accounting(selection)}
    return ingest(source, kept_url(dataset_url, version), options, command, progress=progress,
                  extra_manifest={"selection": accounting})


KEYS_SCHEMA = pa.schema([pa.field("shard", pa.string(), nullable=False),  # as webdataset's __url__
                         pa.field("wds_key", pa.string(), nullable=False),  # as webdataset's __key__
                         pa.field("key", pa.string(), nullable=False)])  # onion's key


def shard_url(shards_at: Location, name: str) -> str:
    """A shard's full address, as a user hands it to ``webdataset.WebDataset`` (which yields it back
    unchanged as ``__url__``): an absolute path on a local disk, else its URL."""
    return shards_at.path(name) if shards_at.is_local else shards_at.child(name).url


def wds_key(row: dict, in_place: bool) -> str:
    """The ``__key__`` webdataset yields for an example: for shards indexed in place the source's own
    key (their index's ``source_ref`` is ``<shard>[<key>]``, the key grouped as webdataset groups it);
    onion's own shards name their members ``<onion key>.<ext>``, so there it is the onion key."""
    if not in_place:
        return row["key"]
    prefix, ref = f"{row['shard']}[", row["source_ref"]
    if not (ref.startswith(prefix) and ref.endswith("]")):
        raise DatasetError(f"example {row['key']}: source_ref {ref!r} does not name a key of {row['shard']}")
    return ref[len(prefix):-1]


def kept_keys_by_shard(dataset_url: str, version: str) -> tuple[pa.Table, dict[str, list[str]]]:
    """The kept train examples of a selection as ``(table, {shard URL: [webdataset keys]})``: the table
    one row per kept example (:data:`KEYS_SCHEMA`), sorted by shard then key; the mapping names every
    shard of the dataset, those with nothing kept with an empty list, each list sorted."""
    dataset = location(dataset_url)
    manifest = read_manifest(dataset)
    shards_at, in_place = shard_location(dataset, manifest), bool(manifest.get("shard_root"))
    kept = kept_keys(dataset, version)
    index = read_index(dataset, columns=["key", "shard", "source_ref"])
    rows = index.filter(pc.is_in(index["key"], value_set=kept)).to_pylist()
    if len(rows) != len(kept):
        raise DatasetError(f"{dataset.url}: selection {version} keeps {len(kept) - len(rows)} keys the index "
                           "does not hold")
    by_shard: dict[str, list[str]] = {shard_url(shards_at, entry["name"]): [] for entry in manifest["shards"]}
    table = sorted((shard_url(shards_at, row["shard"]), wds_key(row, in_place), row["key"]) for row in rows)
    for shard, key, _ in table:
        by_shard.setdefault(shard, []).append(key)
    columns = list(zip(*table)) if table else [(), (), ()]
    return (pa.table([pa.array(c, pa.string()) for c in columns], schema=KEYS_SCHEMA),
            {shard: sorted(keys) for shard, keys in sorted(by_shard.items())})


def keys_prefix(prefix: str) -> tuple[Location, str]:
    """The folder and file stem of ``--keys PREFIX`` (a trailing .json or .parquet is dropped)."""
    prefix = prefix.removesuffix(".json").removesuffix(".parquet")
    head, slash, stem = prefix.rpartition("/")
    if not stem:
        raise UsageError(f"--keys {prefix!r}: name a file prefix, e.g. kept/v0001 (not a folder)")
    return location(head or slash or "."), stem


def write_kept_keys(dataset_url: str, version: str, prefix: str) -> tuple[list[str], pa.Table, dict]:
    """Write ``PREFIX.parquet`` and ``PREFIX.json`` (see :func:`kept_keys_by_shard`); the same selection
    gives the same bytes. Returns the two files' URLs, the table and the mapping."""
    table, by_shard = kept_keys_by_shard(dataset_url, version)
    folder, stem = keys_prefix(prefix)
    folder.write_atomic(f"{stem}.parquet", table_to_parquet_bytes(table))
    folder.write_atomic(f"{stem}.json", (json.dumps(by_shard, indent=1, ensure_ascii=False) + "\n").encode())
    return [folder.child(f"{stem}.parquet").url, folder.child(f"{stem}.json").url], table, by_shard
