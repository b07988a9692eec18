"""``onion inspect --sql``: DuckDB over a dataset's index, scores and selections.

Tables: ``index``; ``scores_<name>`` for each score file; ``selections`` (every version, with a
``version`` column). They are loaded through fsspec, so object-store datasets work too.
"""
from __future__ import annotations

import io

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from shards import location, read_index

from pipeline.scoring import SCORES
from pipeline.selection import read_selection
from pipeline.selection_report import versions


def query(url: str, sql: str) -> pa.Table:
    dataset = location(url)
    connection = duckdb.connect()
    tables = {"index": read_index(dataset)}
    scores = dataset.child(SCORES)
    for name in scores.list_names():
        if name.endswith(".parquet"):
            tables[f"scores_{name[:-len('.parquet')].replace('-', '_')}"] = pq.read_table(io.BytesIO(scores.read_bytes(name)))
    selections = [_with_version(read_selection(dataset, v), v) for v in versions(dataset)]
    if selections:
        tables["selections"] = pa.concat_tables(selections)
    for name, table in tables.items():
        connection.register(name, table)
    try:
        relation = connection.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as error:
        raise ValueError(f"SQL error: {error} (tables: {', '.join(tables)})") from None


def _with_version(table: pa.Table, version: str) -> pa.Table:
    return table.append_column("version", pa.array([version] * table.num_rows, pa.string()))
