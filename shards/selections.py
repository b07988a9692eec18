"""Where selections live: immutable versions ``DATASET/selections/vNNNN.parquet``.

The pipeline decides who is kept; this module only stores and reads its decisions, so the
reader (``ShardDataset(selection="v0003")``) and the trainer can use a selection without
importing the pipeline. A version has one row per train-split example (``key, kept, reason,
round, parent, ...``); the same rows chosen by the same rule are always the same version.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.errors import UsageError
from shards.index import (
    STATUS_OK,
    parquet_bytes_to_table,
    parquet_names,
    read_index,
    read_parquet,
    table_to_parquet_bytes,
)
from shards.urls import Location

SELECTIONS = "selections"
FINGERPRINTS = "fingerprints"  # selections/fingerprints/vNNNN.<sha256 of the rows>: empty markers
VERSION = re.compile(r"v\d{4,}")
RULE = b"rule"  # Parquet metadata: the rule random choices were made by (absent: the earlier, order-dependent one)


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
    order = np.lexsort((source.keys, np.where(scored, score, np.inf)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    table = pa.table({
        "key": pa.array(source.keys.tolist(), pa.string()), "label": source.labels, "kept": kept,
        "score": pa.array(score, mask=~scored), "rank": pa.array(rank, mask=~scored),
        "reason": pa.array(reasons.tolist(), pa.string()), "round": np.full(len(kept), round_number, np.int32),
        "parent": pa.array([parent] * len(kept), pa.string()),
        "strategy": pa.array([strategy] * len(kept), pa.string()),
    })
    return table.replace_schema_metadata({RULE: rule.encode()}) if rule else table


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
    rule = selection_rule(table)
    if rule:
        digest.update(f"rule={rule}".encode())
    return digest.hexdigest()


def save_selection(dataset: Location, table: pa.Table, parameters: dict) -> str:
    """Store ``table`` as the next version, or return the version that already holds the same rows
    (chosen by the same rule: see :func:`fingerprint`).

    Versions are created exclusively: when two jobs save at once, the second sees the first's
    version appear and takes the next number, so no version is ever overwritten."""
    folder = dataset.child(SELECTIONS)
    identity = fingerprint(table)
    metadata = {b"fingerprint": identity.encode(), b"parameters": json.dumps(parameters, sort_keys=True).encode(),
                **({RULE: rule.encode()} if (rule := selection_rule(table)) else {})}
    data = table_to_parquet_bytes(table.replace_schema_metadata(metadata))
    while True:
        versions = selection_versions(dataset)
        stored = version_of_fingerprint(dataset, versions)
        if identity in stored:
            return stored[identity]
        version = f"v{int(versions[-1][1:]) + 1 if versions else 1:04d}"
        if folder.create_exclusive(f"{version}.parquet", data):
            folder.child(FINGERPRINTS).write_atomic(f"{version}.{identity}", b"")
            return version


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
            stored = parquet_bytes_to_table(folder.read_bytes(f"{version}.parquet"), columns=[])  # metadata only
            found[version] = (stored.schema.metadata or {}).get(b"fingerprint", b"").decode()
            marks.write_atomic(f"{version}.{found[version]}", b"")
    return {identity: version for version, identity in sorted(found.items(), reverse=True) if identity}


def selection_versions(dataset: Location) -> list[str]:
    """Every stored selection version, oldest first (``v0001``, ``v0002``, ...)."""
    return [name for name in parquet_names(dataset.child(SELECTIONS)) if VERSION.fullmatch(name)]


def read_selection(dataset: Location, version: str, columns: list[str] | None = None) -> pa.Table:
    folder = dataset.child(SELECTIONS)
    if not VERSION.fullmatch(version) or not folder.exists(f"{version}.parquet"):
        known = ", ".join(selection_versions(dataset)) or "none yet"
        raise UsageError(f"{dataset.url}: no selection {version!r} (selections: {known})")
    return read_parquet(folder, version, columns)


def selection_parameters(table: pa.Table) -> dict:
    """The parameters a selection version was made with (strategy or round, scores, seed...)."""
    return json.loads((table.schema.metadata or {}).get(b"parameters", b"{}"))


def kept_keys(dataset: Location, version: str) -> pa.Array:
    """The keys a selection version keeps."""
    table = read_selection(dataset, version, columns=["key", "kept"])
    return table.filter(table["kept"])["key"].combine_chunks()
