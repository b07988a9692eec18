"""img2dataset's sidecars: beside each ``NNNNN.tar`` it writes ``NNNNN.parquet`` (one row per URL it
attempted: ``key``, ``url``, ``caption``, ``status``, ``width``/``height``, ``original_width``/
``original_height`` and the columns its options add) and ``NNNNN_stats.json`` (its counts for the
shard: ``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``, ...).

When they are there, ``wds:`` takes each sample's URL, caption and size before img2dataset's resize
from them instead of re-deriving them (the stored image only knows its resized size), and records
img2dataset's own counts, so a user sees how many URLs it attempted beside the samples the tars hold.
Both are optional, and so is every column but ``key``: img2dataset's options decide which it writes.
"""
from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.sources.base import SourceError
from shards.urls import Location, join_url

STATS_COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")
COLUMNS = ("key", "url", "caption", "original_width", "original_height")  # all that is read of a sidecar
READ_THREADS = 16  # sidecars read at once (each is one request on an object store)


@dataclass(frozen=True)
class SidecarRow:
    """What img2dataset recorded of one sample; None where its sidecar has no such column or value."""

    url: str | None = None
    caption: str | None = None
    original_size: tuple[int, int] | None = None  # (width, height) as downloaded, before img2dataset's resize


@dataclass(frozen=True)
class Sidecar:
    """One shard's sidecars: ``rows`` by source key (None: no ``.parquet``), ``stats`` the counts of its
    ``_stats.json`` (None: no such file)."""

    rows: dict[str, SidecarRow] | None
    stats: dict[str, int] | None

    def row(self, key: str | None) -> SidecarRow | None:
        return self.rows.get(key) if self.rows and key is not None else None


def sidecar_names(shard: str) -> tuple[str, str]:
    """``(parquet, stats)`` names img2dataset gives the sidecars of ``shard`` (``sub/00012.tar`` ->
    ``sub/00012.parquet``, ``sub/00012_stats.json``)."""
    stem = shard[:-4] if shard.lower().endswith(".tar") else shard
    return f"{stem}.parquet", f"{stem}_stats.json"


def read_sidecars(folder: Location, shards: Iterable[str], threads: int = READ_THREADS) -> dict[str, Sidecar]:
    """The sidecars of those ``shards`` (names relative to ``folder``) that have any, by shard name.
    Which exist comes from one listing per folder (not a request per file); each present file is then
    one whole read, concurrently on an object store.

    A sidecar that is there but unreadable is refused (:class:`SourceError` naming it), not skipped:
    skipping it would leave its shard's examples without the URL, caption and original size the others
    carry, with nothing in the index saying why. It is found in the driver before any image is read,
    and the fix is one command: repair the file, or move it away to ingest its shard without it."""
    shards = list(shards)
    present = _listed(folder, {posixpath.dirname(name) for name in shards})
    wanted = {shard: [name if name in present else None for name in sidecar_names(shard)] for shard in shards}
    wanted = {shard: names for shard, names in wanted.items() if any(names)}
    if not wanted:
        return {}

    def read(shard: str) -> Sidecar:
        parquet, stats = wanted[shard]
        return Sidecar(_read_rows(folder, parquet, shard) if parquet else None,
                       _read_stats(folder, stats, shard) if stats else None)

    with ThreadPoolExecutor(1 if folder.is_local else threads) as pool:
        return dict(zip(wanted, pool.map(read, wanted)))


def sidecar_summary(sidecars: dict[str, Sidecar], matched: int) -> dict:
    """What the manifest records (as ``img2dataset``): how many shards had each sidecar, how many tar
    samples found their row, and img2dataset's counts summed over the ``_stats.json`` files. Totals only:
    per-shard figures stay in the sidecars, where they already are."""
    stats = [sidecar.stats for sidecar in sidecars.values() if sidecar.stats is not None]
    return {"parquet_sidecars": sum(sidecar.rows is not None for sidecar in sidecars.values()),
            "samples_with_sidecar_row": matched, "stats_files": len(stats),
            **{name: sum(counts.get(name, 0) for counts in stats) for name in STATS_COUNTS}}


def describe(summary: dict) -> str:
    """One line for the ingest summary."""
    parts = []
    if summary.get("parquet_sidecars"):
        parts.append(f"url, caption and original size of {summary['samples_with_sidecar_row']} samples from "
                     f"{summary['parquet_sidecars']} .parquet")
    if summary.get("stats_files"):
        parts.append(f"its _stats.json of {summary['stats_files']} shard(s) count {summary['count']} URLs "
                     f"attempted: {summary['successes']} successes, {summary['failed_to_download']} failed to "
                     f"download, {summary['failed_to_resize']} failed to resize")
    return "img2dataset sidecars: " + "; ".join(parts)


def _listed(folder: Location, parents: set[str]) -> set[str]:
    """Names (relative to ``folder``) of the files directly under each of ``parents``."""
    names: set[str] = set()
    for parent in sorted(parents):
        try:
            entries = folder.fs.ls(folder.path(parent) if parent else folder.root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        names |= {posixpath.join(parent, posixpath.basename(str(entry).rstrip("/"))) for entry in entries}
    return names


def _refused(folder: Location, name: str, shard: str, what: str) -> SourceError:
    return SourceError(f"wds: {join_url(folder.url, name)} is {what}; as img2dataset's sidecar beside {shard} "
                       f"it would be read for metadata: repair it, or move it away to ingest {shard} without it")


def _read_rows(folder: Location, name: str, shard: str) -> dict[str, SidecarRow]:
    data = folder.read_bytes(name)  # one request; a storage fault propagates as such, not as a bad file
    try:
        table = pq.ParquetFile(io.BytesIO(data))
        present = set(table.schema_arrow.names)
        read = table.read(columns=[column for column in COLUMNS if column in present])
        columns = {column: read.column(column).to_pylist() for column in read.column_names}
    except (pa.ArrowException, OSError, ValueError) as error:  # ArrowInvalid is a ValueError
        why = f"not valid Parquet ({str(error)[:120]}; an img2dataset run stopped mid-shard leaves it so)"
        raise _refused(folder, name, shard, why) from None
    if "key" not in columns:
        raise _refused(folder, name, shard, "a Parquet file without img2dataset's 'key' column")
    empty = [None] * len(columns["key"])
    rows: dict[str, SidecarRow] = {}
    for key, url, caption, width, height in zip(
            columns["key"], *(columns.get(column, empty) for column in COLUMNS[1:])):
        if key is None:
            continue
        width, height = _side(width), _side(height)
        rows.setdefault(str(key), SidecarRow(url if isinstance(url, str) else None,
                                             caption if isinstance(caption, str) else None,
                                             (width, height) if width and height else None))
    return rows


def _read_stats(folder: Location, name: str, shard: str) -> dict[str, int]:
    try:
        stats = json.loads(folder.read_bytes(name))
    except ValueError as error:  # UnicodeDecodeError is a ValueError
        raise _refused(folder, name, shard, f"not valid JSON ({str(error)[:120]})") from None
    if not isinstance(stats, dict):
        raise _refused(folder, name, shard, "JSON but not an object of counts")
    return {count: value for count in STATS_COUNTS  # counts missing or not integers: left out
            if isinstance(value := stats.get(count), int) and not isinstance(value, bool)}


def _side(value: object) -> int | None:
    """A positive whole number of pixels, or None (img2dataset writes null for a failed download)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return None
    return int(value) if float(value).is_integer() else None
