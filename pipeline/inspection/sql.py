"""``onion inspect --sql``: DuckDB over a dataset's index, scores and selections.

Tables: ``index``; ``scores_<name>`` for each score file; ``selections`` (every version, with a
``version`` column). They are loaded through fsspec, so object-store datasets work too. ``index`` is
a ``pyarrow.dataset`` over the index parts, which DuckDB scans lazily (projection and filters pushed
down), so a query over a large index does not load it whole.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa

from pipeline.curation.scoring.stored import read_scores, score_names
from shards import UsageError, location
from shards.index import index_dataset
from shards.selections import read_selection, selection_versions


def query(url: str, sql: str) -> pa.Table:
    dataset = location(url)
    connection = duckdb.connect()
    tables = {"index": index_dataset(dataset)}
    for name in score_names(dataset):
        tables[f"scores_{name.replace('-', '_')}"] = read_scores(dataset, name)
    selections = [_with_version(read_selection(dataset, v), v) for v in selection_versions(dataset)]
    if selections:
        tables["selections"] = pa.concat_tables(selections)
    for name, table in tables.items():
        connection.register(name, table)
    try:
        relation = connection.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as error:
        raise UsageError(f"SQL error: {error} (tables: {', '.join(tables)})") from None


def _with_version(table: pa.Table, version: str) -> pa.Table:
    return table.append_column("version", pa.array([version] * table.num_rows, pa.string()))
