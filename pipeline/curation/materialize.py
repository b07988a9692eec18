"""Survivor shards: the kept examples of a selection, repacked as a dataset the trainer streams.

``DATASET/kept/vNNNN/`` holds the kept train examples and the whole val split, in new balanced,
shuffled shards written by Ray tasks (the ingest machinery, so it is resumable and
byte-deterministic too), with its own index and a manifest that records the selection's accounting.
"""
from __future__ import annotations

import pyarrow.compute as pc

from pipeline.ingest.job import IngestOptions, IngestReport, ingest
from pipeline.ingest.sources.dataset import DatasetSource
from shards import location
from shards.selections import read_selection
from shards.urls import join_url

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
