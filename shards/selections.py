"""Where selections live: immutable versions under ``DATASET/selections/``.

The pipeline decides who is kept; this module only stores and reads its decisions, so the
reader (``ShardDataset(selection="v0003")``) and the trainer can use a selection without
importing the pipeline. A version has one row per train-split example (``key, kept, reason,
round, parent, ...``); the same rows chosen by the same rule are always the same version.

Two layouts, both read by :func:`read_selection` as one table:

* ``vNNNN.parquet``: every row in one file, written by one process (datasets with a single-file
  index, curation rounds and per-epoch pruning).
* ``vNNNN.json``: a *partitioned* version, written by many tasks: one Parquet part per index part
  (``selections/parts/<fingerprint>/<index part's name>``, the train rows of that part's shards, by
  key), listed in the JSON with rows, kept and sha256. A reader assigned a few shards reads only their
  parts (:func:`read_selection_part`). The folder is named by the rows' fingerprint, so writing the
  same selection twice writes the same bytes to the same place; the JSON is the commit point.

A version's identity is everything its rows store, the scores the decisions were made by and the
strategy included: two runs that happen to make the same decisions from different losses (two
arms of one seed whose first epoch is the same model, say) get versions of their own, each with
its own scores (the loss weights of a planned epoch are read back from them).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.errors import UsageError
from shards.index import (
    STATUS_OK,
    IndexPart,
    matching_rows,
    parquet_bytes_to_table,
    read_index,
    read_index_part,
    read_listed_part,
    read_parquet,
    table_to_parquet_bytes,
)
from shards.urls import Location

SELECTIONS = "selections"
FINGERPRINTS = "fingerprints"  # selections/fingerprints/vNNNN.<sha256 of the rows>: empty markers
VERSION = re.compile(r"v\d{4,}")
RULE = b"rule"  # Parquet metadata: the rule random choices were made by (absent: the earlier, order-dependent one)
PARTS = "parts"  # selections/parts/<fingerprint>/: the parts of partitioned versions
PART_COLUMNS = ("key", "label", "kept", "score", "reason", "round", "parent", "strategy")  # no rank: it is global


@dataclass(frozen=True)
class SourceExamples:
    """The train split of a dataset: every example a selection must account for."""

    keys: np.ndarray
    labels: np.ndarray
    ok: np.ndarray  # False for quarantined rows

    @classmethod
    def of(cls, dataset: Location) -> SourceExamples:
        index = read_index(dataset, columns=["key", "label", "split", "status"])
        train = index.filter(pc.equal(index["split"], "train")).sort_by("key")
        labels = train["label"].to_numpy(zero_copy_only=False)
        return cls(np.array(train["key"].to_pylist(), dtype=object),
                   np.nan_to_num(labels.astype(np.float64), nan=-1).astype(np.int64),
                   np.array([s == STATUS_OK for s in train["status"].to_pylist()]))


def selection_table(source: SourceExamples, kept: np.ndarray, reasons: np.ndarray, score: np.ndarray,
                    round_number: int, parent: str | None, strategy: str, rule: str | None = None) -> pa.Table:
    """Rows for every source example; ``rank`` orders the scored ones from easiest (0). ``rule`` names how
    random choices were made; it travels in the table's metadata to the stored version."""
    scored = ~np.isnan(score)
    table = pa.table({
        "key": pa.array(source.keys.tolist(), pa.string()), "label": source.labels, "kept": kept,
        "score": pa.array(score, mask=~scored), "rank": score_rank(source.keys, score),
        "reason": pa.array(reasons.tolist(), pa.string()), "round": np.full(len(kept), round_number, np.int32),
        "parent": pa.array([parent] * len(kept), pa.string()),
        "strategy": pa.array([strategy] * len(kept), pa.string()),
    })
    return table.replace_schema_metadata({RULE: rule.encode()}) if rule else table


def score_rank(keys: np.ndarray, score: np.ndarray) -> pa.Array:
    """Each scored row's place from easiest (0), ties by key; null where the row has no score."""
    scored = ~np.isnan(score)
    order = np.lexsort((keys, np.where(scored, score, np.inf)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return pa.array(rank, mask=~scored)


def selection_rule(table: pa.Table) -> str | None:
    """The rule a selection's random choices were made by (``key-hash-v1``), or None for the earlier one."""
    rule = (table.schema.metadata or {}).get(RULE)
    return rule.decode() if rule else None


def fingerprint(table: pa.Table) -> str:
    """The identity of a selection's rows; with a rule, of the rule too. Versions chosen by the earlier
    rule keep their row-only fingerprints, so a selection made by another rule never resolves to one of
    them just because the rows match: its version would say it was chosen by the earlier rule."""
    digest = hashlib.sha256()
    for column in ("key", "kept", "reason", "round", "parent"):
        digest.update(json.dumps(table[column].to_pylist()).encode())
    for column in ("label", "score", "strategy"):  # what else the rows store (rank follows from score)
        if column in table.column_names:
            digest.update(json.dumps([column, table[column].to_pylist()]).encode())
    rule = selection_rule(table)
    if rule:
        digest.update(f"rule={rule}".encode())
    return digest.hexdigest()


def save_selection(dataset: Location, table: pa.Table, parameters: dict) -> str:
    """Store ``table`` as the next version, or return the version that already holds the same rows
    (chosen by the same rule: see :func:`fingerprint`)."""
    identity = fingerprint(table)
    metadata = {b"fingerprint": identity.encode(), b"parameters": json.dumps(parameters, sort_keys=True).encode(),
                **({RULE: rule.encode()} if (rule := selection_rule(table)) else {})}
    return _claim_version(dataset, identity, ".parquet",
                          table_to_parquet_bytes(table.replace_schema_metadata(metadata)))


def _claim_version(dataset: Location, identity: str, suffix: str, data: bytes) -> str:
    """The version already holding ``identity``, or the next number, claimed with ``data`` as its file.

    Versions are created exclusively: when two jobs save at once, the second sees the first's
    version appear and takes the next number, so no version is ever overwritten."""
    folder = dataset.child(SELECTIONS)
    while True:
        versions = selection_versions(dataset)
        stored = version_of_fingerprint(dataset, versions)
        if identity in stored:
            return stored[identity]
        version = f"v{int(versions[-1][1:]) + 1 if versions else 1:04d}"
        if folder.create_exclusive(f"{version}{suffix}", data):
            folder.child(FINGERPRINTS).write_atomic(f"{version}.{identity}", b"")
            return version


# -- partitioned versions -------------------------------------------------------------------------------

def part_digest(table: pa.Table) -> str:
    """The identity of one part as stored (every column: keys, decisions, reasons, the scores they were
    made by): two writers of one identity write the same bytes, so neither changes a committed part."""
    digest = hashlib.sha256()
    for column in table.column_names:
        digest.update(json.dumps([column, table[column].to_pylist()]).encode())
    return digest.hexdigest()


def parts_fingerprint(digests: list[str], round_number: int, parent: str | None, rule: str) -> str:
    """A partitioned version's identity: its parts' digests in index-part order, its round, parent and rule."""
    return hashlib.sha256(json.dumps({"parts": digests, "round": round_number, "parent": parent, "rule": rule},
                                     sort_keys=True).encode()).hexdigest()


def selection_part_table(decided: pa.Table, round_number: int, parent: str | None, strategy: str) -> pa.Table:
    """One part's rows as stored: ``decided`` (key, label, kept, score, reason, by key) and the version's
    constants (round, parent, strategy), in :data:`PART_COLUMNS` order."""
    n = decided.num_rows
    return pa.table({"key": decided["key"], "label": decided["label"].cast(pa.int64()), "kept": decided["kept"],
                     "score": decided["score"].cast(pa.float64()), "reason": decided["reason"],
                     "round": pa.array(np.full(n, round_number, np.int32)),
                     "parent": pa.array([parent] * n, pa.string()), "strategy": pa.array([strategy] * n, pa.string())})


def write_selection_part(dataset: Location, identity: str, name: str, table: pa.Table) -> dict:
    """Write one part of the version whose fingerprint is ``identity``; its entry for the version's JSON."""
    data = table_to_parquet_bytes(table)
    dataset.child(SELECTIONS, PARTS, identity).write_atomic(name, data)
    return {"name": name, "rows": table.num_rows, "kept": int(pc.sum(table["kept"]).as_py() or 0),
            "sha256": hashlib.sha256(data).hexdigest()}


def train_rows_of_part(dataset: Location, part: IndexPart) -> pa.Table:
    """``key, label, ok`` of one index part's train rows, by key: what a version's part accounts for."""
    index = read_index_part(dataset, part, ["key", "label", "split", "status"])
    train = index.filter(pc.equal(index["split"], "train")).sort_by("key")
    return pa.table({"key": train["key"], "label": train["label"].cast(pa.int64()).fill_null(-1),
                     "ok": pc.equal(train["status"], STATUS_OK)})


def with_parent_decisions(dataset: Location, parent: str, part: IndexPart, rows: pa.Table, layout: dict | None,
                          whole: pa.Table | None) -> pa.Table:
    """``rows`` (one part's, by key) with ``parent``'s ``parent_kept, parent_reason``: its part of ``part``
    (``layout``: a partitioned parent), or those of its ``whole`` rows (a parent stored as one file)."""
    if layout is not None:
        entry = next((e for e in layout["parts"] if e["name"] == part.name), None)
        if entry is None:
            raise UsageError(f"{parent} does not cover this dataset's train examples (it has no part {part.name})")
        decided = read_selection_part(dataset, parent, entry, layout, ["key", "kept", "reason"])
    else:  # a single-file parent (a curation round's, say): its rows of this part's keys
        decided = whole.filter(pc.is_in(whole["key"], value_set=rows["key"]))
    decided = decided.sort_by("key")
    if decided["key"].to_pylist() != rows["key"].to_pylist():
        raise UsageError(f"{parent} does not cover this dataset's train examples")
    return rows.append_column("parent_kept", decided["kept"]).append_column("parent_reason", decided["reason"])


def stored_version(dataset: Location, identity: str) -> str | None:
    """The version that already holds the fingerprint ``identity``, if any."""
    return version_of_fingerprint(dataset, selection_versions(dataset)).get(identity)


def commit_partitioned_selection(dataset: Location, identity: str, parts: list[dict], parameters: dict,
                                 rule: str) -> str:
    """Claim a version for parts already written (or return the version holding them): the commit point."""
    body = {"layout": PARTS, "folder": f"{PARTS}/{identity}", "fingerprint": identity, "rule": rule,
            "parameters": parameters, "rows": sum(p["rows"] for p in parts), "kept": sum(p["kept"] for p in parts),
            "parts": parts}
    return _claim_version(dataset, identity, ".json", json.dumps(body, indent=1, sort_keys=True).encode())


def partitioned_version(dataset: Location, version: str) -> dict | None:
    """A partitioned version's JSON, or None when ``version`` is stored as one file."""
    folder = dataset.child(SELECTIONS)
    if not folder.exists(f"{version}.json"):
        return None
    return json.loads(folder.read_bytes(f"{version}.json"))


def unlisted_part_folders(dataset: Location) -> list[str]:
    """``selections/parts/<fingerprint>`` folders that no version's JSON lists: left by a select or a
    planned epoch that was killed before its commit (a re-run with the same inputs reuses its folder;
    with other inputs it stays). Nothing reads them; they are safe to delete."""
    listed = set()
    for version in selection_versions(dataset):
        layout = partitioned_version(dataset, version)
        if layout is not None:
            listed.add(layout["folder"])
    found = dataset.child(SELECTIONS, PARTS).list_names()
    return [f"{SELECTIONS}/{PARTS}/{name}" for name in sorted(found) if f"{PARTS}/{name}" not in listed]


def read_selection_part(dataset: Location, version: str, entry: dict, layout: dict,
                        columns: list[str] | None = None) -> pa.Table:
    """One part of a partitioned version, checked against its sha256: a missing or changed part is named."""
    data = read_listed_part(dataset.child(SELECTIONS, *layout["folder"].split("/")), entry, f"selection {version}")
    return parquet_bytes_to_table(data, columns=columns)


def _read_partitioned(dataset: Location, version: str, layout: dict, columns: list[str] | None) -> pa.Table:
    tables = [read_selection_part(dataset, version, entry, layout) for entry in layout["parts"]]
    rows = pa.concat_tables(tables) if tables else _empty_part()
    rows = rows.sort_by("key")
    score = rows["score"].fill_null(np.nan).to_numpy()
    rows = rows.add_column(rows.column_names.index("score") + 1, "rank",
                           score_rank(np.array(rows["key"].to_pylist(), dtype=object), score))
    metadata = {b"fingerprint": layout["fingerprint"].encode(),
                b"parameters": json.dumps(layout["parameters"], sort_keys=True).encode(), RULE: layout["rule"].encode()}
    rows = rows.replace_schema_metadata(metadata)
    return rows if columns is None else rows.select(columns)


def _empty_part() -> pa.Table:
    return pa.schema([("key", pa.string()), ("label", pa.int64()), ("kept", pa.bool_()), ("score", pa.float64()),
                      ("reason", pa.string()), ("round", pa.int32()), ("parent", pa.string()),
                      ("strategy", pa.string())]).empty_table()


def version_of_fingerprint(dataset: Location, versions: list[str]) -> dict[str, str]:
    """The oldest version holding each stored fingerprint. Fingerprints are read from the names of
    empty marker files (one listing), not from every version's footer: per-epoch pruning saves a
    version per epoch, and reading them all on each save made saving grow with the history. A
    version without a marker (saved before markers existed, or by a job that died in between) has
    its footer read once and gets its marker."""
    folder = dataset.child(SELECTIONS)
    marks = folder.child(FINGERPRINTS)
    found = dict(name.split(".", 1) for name in marks.list_names() if "." in name)
    for version in versions:
        if version not in found:
            layout = partitioned_version(dataset, version)
            if layout is not None:
                found[version] = layout["fingerprint"]
            else:
                stored = parquet_bytes_to_table(folder.read_bytes(f"{version}.parquet"), columns=[])  # metadata only
                found[version] = (stored.schema.metadata or {}).get(b"fingerprint", b"").decode()
            marks.write_atomic(f"{version}.{found[version]}", b"")
    return {identity: version for version, identity in sorted(found.items(), reverse=True) if identity}


def selection_versions(dataset: Location) -> list[str]:
    """Every stored selection version, oldest first (``v0001``, ``v0002``, ...), of either layout."""
    names = (name.rsplit(".", 1) for name in dataset.child(SELECTIONS).list_names() if "." in name)
    return sorted({stem for stem, suffix in names if suffix in ("parquet", "json") and VERSION.fullmatch(stem)})


def read_selection(dataset: Location, version: str, columns: list[str] | None = None) -> pa.Table:
    """A version's rows (both layouts), sorted by key, with ``rank`` and the version's metadata."""
    if VERSION.fullmatch(version) and (layout := partitioned_version(dataset, version)) is not None:
        return _read_partitioned(dataset, version, layout, columns)
    require_version(dataset, version)
    return read_parquet(dataset.child(SELECTIONS), version, columns)


def selection_row(dataset: Location, version: str, key: str) -> dict | None:
    """The row of ``key`` in a version (with its ``rank``), or None: never the whole version in memory.

    A single file is scanned with its row-group statistics; a partitioned version part by part, and the
    rank of a scored row counted part by part over the rows easier than it (score, then key)."""
    layout = partitioned_version(dataset, version)
    if layout is None:
        found = matching_rows(dataset.child(SELECTIONS), version, pc.field("key") == key).to_pylist()
        return found[0] if found else None
    row = None
    for entry in layout["parts"]:
        part = read_selection_part(dataset, version, entry, layout)
        found = part.filter(pc.equal(part["key"], key)).to_pylist()
        if found:
            row = found[0]
            break
    if row is None:
        return None
    rank = None
    if row["score"] is not None and not np.isnan(row["score"]):
        rank = 0
        for entry in layout["parts"]:
            part = read_selection_part(dataset, version, entry, layout, ["key", "score"])
            score = part["score"].fill_null(np.nan).to_numpy()
            keys = np.array(part["key"].to_pylist(), dtype=object)
            rank += int(((score < row["score"]) | ((score == row["score"]) & (keys < key))).sum())
    return {**{name: row[name] for name in PART_COLUMNS[:4]}, "rank": rank,
            **{name: row[name] for name in PART_COLUMNS[4:]}}


def selection_parts(dataset: Location, version: str,
                    columns: list[str]) -> Iterator[tuple[str | None, pa.Table]]:
    """``columns`` of a version, one part at a time: ``(the index part's name, its rows)``; a version
    stored as one file comes whole, named None. What is held is one part."""
    layout = partitioned_version(dataset, version)
    if layout is None:
        require_version(dataset, version)
        yield None, read_parquet(dataset.child(SELECTIONS), version, columns)
        return
    for entry in layout["parts"]:
        yield entry["name"], read_selection_part(dataset, version, entry, layout, columns)


def version_parameters(dataset: Location, version: str) -> dict:
    """The parameters a version was made with, without reading its rows."""
    layout = partitioned_version(dataset, version)
    if layout is not None:
        return layout["parameters"]
    require_version(dataset, version)
    return selection_parameters(read_parquet(dataset.child(SELECTIONS), version, []))


def require_version(dataset: Location, version: str) -> None:
    """A usage error naming the stored versions when ``version`` is not one of them."""
    folder = dataset.child(SELECTIONS)
    if not VERSION.fullmatch(version) or not (folder.exists(f"{version}.parquet") or folder.exists(f"{version}.json")):
        known = ", ".join(selection_versions(dataset)) or "none yet"
        raise UsageError(f"{dataset.url}: no selection {version!r} (selections: {known})")


def selection_parameters(table: pa.Table) -> dict:
    """The parameters a selection version was made with (strategy or round, scores, seed...)."""
    return json.loads((table.schema.metadata or {}).get(b"parameters", b"{}"))


def kept_keys(dataset: Location, version: str) -> pa.Array:
    """The keys a selection version keeps."""
    table = read_selection(dataset, version, columns=["key", "kept"])
    return table.filter(table["kept"])["key"].combine_chunks()
