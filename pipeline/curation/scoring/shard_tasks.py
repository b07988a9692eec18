"""What the Ray scorers share: the train shards, and how each task gets its shard's index rows.

A task opens ``ShardDataset(url, shards=[shard])``. With a partitioned index (every dataset this onion
writes) that reads only the shard's own index part, in the task: the driver reads no index at all.
With the single-file ``index.parquet`` of an earlier onion, every task would read and parse the whole
index to find its shard's rows: n rows per task, n^2 / shard size in all (measured at 1,000,000
examples in 100 shards, that made ``exact`` 6.6x slower than at 300,000). For those the driver reads
the index once and puts each shard's rows in Ray's object store instead.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from shards import location, read_index, read_manifest
from shards.index import index_parts, read_index_part
from shards.reader import READ_COLUMNS

INDEX_COLUMNS = [*READ_COLUMNS, "split", "status"]


def train_shards(dataset_url: str) -> list[str]:
    return [s["name"] for s in read_manifest(location(dataset_url))["shards"] if s["split"] == "train"]


def shard_index_rows(dataset_url: str, shards: list[str]) -> dict[str, ray.ObjectRef | None]:
    """What each shard's task passes as ``ShardDataset(index=...)``: None (the task reads its shard's index
    part itself), or for a single-file index the shard's rows in Ray's object store (a task given the
    reference as an argument receives the table)."""
    dataset = location(dataset_url)
    manifest = read_manifest(dataset)
    if index_parts(manifest) is not None:
        return dict.fromkeys(shards)
    index = read_index(dataset, columns=INDEX_COLUMNS, manifest=manifest)
    index = index.sort_by([("shard", "ascending")])
    names = index["shard"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]]) if len(names) else np.zeros(0, np.int64)
    stops = np.r_[starts[1:], len(names)]
    parts = {str(names[a]): index.slice(a, b - a) for a, b in zip(starts, stops)}
    empty = index.slice(0, 0)
    return {shard: ray.put(parts.get(shard, empty)) for shard in shards}


def index_row_ids(dataset_url: str, keys: np.ndarray) -> np.ndarray:
    """Each key's row in the dataset's index, its parts read in the manifest's order (a single-file
    index: its row in the file): the id a grouping scorer gives the group a key represents. A task
    that holds one part knows its rows' ids from the manifest alone (the rows of the parts before it)."""
    dataset = location(dataset_url)
    manifest = read_manifest(dataset)
    parts = index_parts(manifest)
    every_key = (read_index(dataset, columns=["key"], manifest=manifest)["key"] if parts is None else
                 pa.chunked_array([read_index_part(dataset, part, ["key"])["key"] for part in parts], pa.string()))
    return pc.index_in(pa.array(list(keys), pa.string()), value_set=every_key).to_numpy(zero_copy_only=False)
