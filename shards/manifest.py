"""``manifest.json``: the commit point of a dataset.

It is written last. A location without it is an incomplete dataset (an ingest may be running
or was killed) and readers refuse it rather than reading part of it as if it were whole.
"""
from __future__ import annotations

import json
import platform
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata

import pyarrow as pa

from shards.errors import DatasetError
from shards.index import INDEX_FOLDER, INDEX_LAYOUT, INDEX_NAME, IndexPart
from shards.urls import TEMP_MARKER, Location, location

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "onion-dataset"
FORMAT_VERSION = 1
RECORDED_LIBRARIES = ("onion", "numpy", "pillow", "pyarrow", "fsspec", "ray", "torch", "webdataset")


@dataclass(frozen=True)
class ShardEntry:
    name: str
    split: str
    examples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SourceShardEntry(ShardEntry):
    """A WebDataset shard indexed in place: ``bytes`` and ``sha256`` are the whole file's when it was
    indexed, ``mtime`` and ``etag`` what its store said then (None where it says nothing)."""

    mtime: float | str | None = None
    etag: str | None = None


def file_stamp(info: dict) -> dict:
    """``{"mtime": ..., "etag": ...}`` from an fsspec ``info()`` (local disks give mtime, S3 LastModified
    and ETag); a field the store does not give is None."""
    mtime = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    etag = info.get("ETag", info.get("etag"))
    return {"mtime": mtime.isoformat() if hasattr(mtime, "isoformat") else mtime,
            "etag": str(etag).strip('"') if etag else None}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


COUNT_KINDS = ("by_status", "by_split", "by_class", "by_split_status")


def count_rows(index: pa.Table) -> dict:
    """Counts per status, split, class and split/status, from the index (or one part of it)."""
    rows = index.select(["split", "status", "class_name"]).to_pylist()
    by_split_status = Counter(f"{r['split']}/{r['status']}" for r in rows)
    return {
        "total": len(rows),
        "by_status": dict(sorted(Counter(r["status"] for r in rows).items())),
        "by_split": dict(sorted(Counter(r["split"] for r in rows).items())),
        "by_class": dict(sorted(Counter(r["class_name"] for r in rows
                                        if r["status"] == "ok" and r["class_name"] is not None).items())),
        "by_split_status": dict(sorted(by_split_status.items())),
    }


def sum_counts(counts: list[dict]) -> dict:
    """The counts of several parts together, as :func:`count_rows` gives them for the whole."""
    totals = {kind: Counter() for kind in COUNT_KINDS}
    for part in counts:
        for kind in COUNT_KINDS:
            totals[kind].update(part[kind])
    return {"total": sum(part["total"] for part in counts),
            **{kind: dict(sorted(totals[kind].items())) for kind in COUNT_KINDS}}


@dataclass(frozen=True)
class DatasetInfo:
    """What the manifest says about a dataset beyond its index and shards."""

    class_names: list[str]
    source: str
    fingerprint: str  # identity of the output: equal fingerprints mean byte-identical datasets
    command: list[str]
    extra: dict = field(default_factory=dict)
    labelled: bool = True  # False: no example has a label (written as "labelled": false)


def index_entry(parts: list[IndexPart]) -> dict:
    """The manifest's ``index``: the partitioned layout and every part."""
    return {"layout": INDEX_LAYOUT, "folder": INDEX_FOLDER, "rows": sum(part.rows for part in parts),
            "parts": [part.entry() for part in parts]}


def build_manifest(*, parts: list[tuple[IndexPart, dict]], shards: list[ShardEntry], info: DatasetInfo) -> dict:
    """The manifest of a dataset whose index is ``parts`` (each with its :func:`count_rows`)."""
    ordered = sorted(parts, key=lambda p: p[0].name)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "source": info.source,
        "fingerprint": info.fingerprint,
        "class_names": info.class_names,
        **({} if info.labelled else {"labelled": False}),
        "counts": sum_counts([counts for _, counts in ordered]),
        "index": index_entry([part for part, _ in ordered]),
        "shards": [vars(shard) for shard in sorted(shards, key=lambda s: s.name)],
        "command": info.command,
        "versions": library_versions(),
        **info.extra,
    }


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def is_ingest_output(name: str) -> bool:
    """Shards, the index, and an ingest's bookkeeping (names starting with ``_``) or temporaries."""
    return (name.endswith(".tar") or name in (INDEX_NAME, INDEX_FOLDER, MANIFEST_NAME) or name.startswith("_")
            or TEMP_MARKER in name)


def is_ingest_bookkeeping(name: str) -> bool:
    """What only onion writes next to its shards: the index, an ingest's claim and parts (``_``
    names), temporaries. A folder of .tar files without any of these is not an onion ingest."""
    return name in (INDEX_NAME, INDEX_FOLDER, MANIFEST_NAME) or name.startswith("_") or TEMP_MARKER in name


def foreign_shards(names: list[str]) -> list[str]:
    """The .tar files among a folder's ``names`` when nothing else there is onion's: plain
    WebDataset (or other) shards that no onion ingest wrote. Empty otherwise."""
    if any(is_ingest_bookkeeping(name) for name in names):
        return []
    return [name for name in names if name.endswith(".tar")]


def foreign_shards_message(url: str, tars: list[str], advice: str | None = None) -> str:
    """What a folder of someone else's shards is, and what to do (by default: the way into onion)."""
    advice = advice or (f"Copy them into an onion dataset with: onion ingest wds:'{url.rstrip('/')}/*.tar' OUT "
                        "(or index them where they are: add --in-place)")
    listed = repr(tars[0]) + (", ..." if len(tars) > 1 else "")
    return (f"{url} holds {len(tars)} .tar file{'s' if len(tars) != 1 else ''} ({listed}) but no {MANIFEST_NAME}, "
            f"{INDEX_NAME} or _ingest.json: plain WebDataset shards that onion did not write, not an onion dataset "
            f"(nor an unfinished ingest). {advice}")


def read_manifest(dataset: Location) -> dict:
    """The manifest of a complete dataset, or a :class:`DatasetError` that says what is wrong."""
    if not dataset.exists(MANIFEST_NAME):
        if not dataset.exists():
            raise DatasetError(f"{dataset.url}: no such dataset")
        names = dataset.list_names()
        if not any(is_ingest_output(name) for name in names):
            raise DatasetError(f"{dataset.url}: not an onion dataset (no {MANIFEST_NAME}, "
                               "and nothing an ingest writes; make one with: onion ingest SOURCE OUT)")
        tars = foreign_shards(names)
        if tars:
            raise DatasetError(foreign_shards_message(dataset.url, sorted(tars)))
        raise DatasetError(
            f"{dataset.url}: no {MANIFEST_NAME}, so the dataset is incomplete "
            "(an ingest is running or was interrupted; run the same command again to finish it)"
        )
    try:
        manifest = json.loads(dataset.read_bytes(MANIFEST_NAME))
    except ValueError as error:
        raise DatasetError(f"{dataset.url}/{MANIFEST_NAME}: not valid JSON ({error})") from error
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{dataset.url}/{MANIFEST_NAME}: not an onion dataset manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{dataset.url}/{MANIFEST_NAME}: format version {manifest.get('format_version')} "
            f"is not supported (this onion reads version {FORMAT_VERSION})"
        )
    return manifest


def is_labelled(manifest: dict) -> bool:
    """Whether a dataset's examples carry labels. An unlabelled dataset (shards of images with captions,
    no classes) has a null label column; whatever learns or checks a label refuses it (:func:`require_labels`)."""
    return manifest.get("labelled", True)


def require_labels(manifest: dict, url: str, what: str) -> None:
    """A one-line :class:`DatasetError` when ``what`` (e.g. "onion train") meets an unlabelled dataset."""
    if not is_labelled(manifest):
        raise DatasetError(f"{url} is unlabelled (its examples carry no class): {what} needs labels. Ingest "
                           "the data with them (a .cls member or --label-field for wds:, --label-column for "
                           "parquet:); unlabelled data can be scored with exact, phash, embed --model NAME|pixels "
                           "or random, and selected with --dedup")


def shard_location(dataset: Location, manifest: dict | None = None) -> Location:
    """Where a dataset's shards are read from: its own folder, or, for WebDataset shards indexed in
    place (``onion ingest wds:PATTERN OUT --in-place``), the folder the manifest's ``shard_root``
    names. Shard names in the manifest and the index are relative to it."""
    manifest = read_manifest(dataset) if manifest is None else manifest
    root = manifest.get("shard_root")
    return location(root) if root else dataset
