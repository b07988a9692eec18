"""Writing the site: data as JSON inside ``.js`` files (``fetch()`` of ``file://`` is blocked in
Chromium, ``<script src>`` is not), the static assets, and the thumbnails, all into a temporary
folder next to the output that is moved into place only when complete.

The bytes depend only on the inputs: JSON with sorted keys, no timestamps, thumbnails in a fixed
order, so building twice gives the same files. Data never reaches the page as HTML: the script
builds the page with text nodes, and ``<``, ``>`` and ``&`` are escaped in the JSON as well.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.report.gather import Gathered, gather
from pipeline.report.thumbnails import ThumbnailLimits, gallery_heads, make_thumbnails, sample
from shards import UsageError, location
from shards.manifest import shard_location

ASSETS = ("index.html", "report.css", "report.js")
MARKER = "data/report.js"  # what makes a folder an earlier report that may be replaced
STAGING = ".report-tmp-"  # temporary folders: ".<out>.report-tmp-<pid>", ".<out>.report-old-<pid>"


@dataclass(frozen=True)
class ReportOptions:
    dataset: str
    out: str
    selection: str | None = None  # the version shown; None: the latest
    all_selections: bool = False  # show every version (lineage always covers them all)
    runs: tuple[str, ...] = ()
    bench: str | None = None
    limits: ThumbnailLimits = field(default_factory=ThumbnailLimits)
    workers: int | None = None  # thumbnail threads (default: the CPUs, at most 8)
    progress: bool = True


def js_data(name: str, value: object) -> bytes:
    """``ONION.<name> = <JSON>;`` in ASCII, with the characters that mean something to HTML escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"window.ONION = window.ONION || {{}};\nONION.{name} = {text};\n".encode("ascii")


def output_folder(out: str) -> Path:
    """The report's folder: local, and either new, empty, or an earlier report (never anything else)."""
    if "://" in out:
        raise UsageError(f"--out {out}: a report is a local folder (it is opened from file://)")
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the report")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise UsageError(f"--out {out} holds other files, not an onion report; choose another folder")
    return path


def remove_stale_staging(path: Path) -> None:
    """Temporary folders of report builds that were killed (their process is gone)."""
    for leftover in path.parent.glob(f".{path.name}.report-*-*"):
        try:
            os.kill(int(leftover.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def thumbnail_priorities(gathered: Gathered) -> list[np.ndarray]:
    examples = gathered.examples
    quarantined = np.flatnonzero(~examples.ok)
    tiers = [quarantined]
    for version in gathered.versions:
        if version.meta["shown"]:
            tiers.extend(gallery_heads(examples, version))
    tiers.extend(scorer.order for scorer in gathered.scorers)
    return tiers


def write_site(folder: Path, gathered: Gathered, thumbnails: dict[int, bytes], meta: dict) -> None:
    (folder / "data").mkdir(parents=True)
    (folder / "thumbs").mkdir()
    for position, png in thumbnails.items():
        (folder / "thumbs" / f"{position}.png").write_bytes(png)
    report = {**gathered.report, "thumbnails": meta}
    (folder / "data" / "report.js").write_bytes(js_data("report", report))
    (folder / "data" / "examples.js").write_bytes(js_data("examples", gathered.examples.payload(sorted(thumbnails))))
    codes = {v.version: {"codes": v.codes, "details": v.details} for v in gathered.versions}
    (folder / "data" / "selections.js").write_bytes(js_data("selections", codes))
    members = {s.name: s.members for s in gathered.scorers if s.members is not None}
    (folder / "data" / "scores.js").write_bytes(js_data("scores", {"arrays": gathered.arrays.arrays,
                                                                    "members": members}))
    if gathered.bench_plot is not None:
        (folder / "bench.png").write_bytes(gathered.bench_plot)
    assets = resources.files("pipeline.report") / "assets"
    for name in ASSETS:
        (folder / name).write_bytes((assets / name).read_bytes())


def build_report(options: ReportOptions) -> Path:
    """Build the report of ``options.dataset`` into ``options.out``; returns the folder.

    Nothing appears at ``out`` until the whole site is written: a missing or damaged dataset ends
    with its one-line error and leaves ``out`` as it was."""
    path = output_folder(options.out)
    gathered = gather(options.dataset, options.selection, options.all_selections, list(options.runs), options.bench)
    examples, limits = gathered.examples, options.limits
    chosen = sample(examples, thumbnail_priorities(gathered), limits.count)
    thumbnails = make_thumbnails(shard_location(location(options.dataset)), examples, chosen, limits, options.workers,
                                 options.progress)
    meta = {"count": len(thumbnails), "bytes": sum(map(len, thumbnails.values())),
            "with_images": int((examples.shard_code >= 0).sum()), "limit_count": limits.count,
            "limit_bytes": limits.bytes, "side": limits.side}
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = path.parent / f".{path.name}{STAGING}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_site(staging, gathered, thumbnails, meta)
        if path.exists():
            old = path.parent / f".{path.name}.report-old-{os.getpid()}"
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
