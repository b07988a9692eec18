"""``onion report``: a static web page of a dataset, its selections, scores, duplicates and runs."""
from __future__ import annotations

import argparse

from rich.console import Console

from pipeline.cli.common import positive_int

NAME = "report"
HELP = "write a static web page to browse kept and dropped examples, why, and what it cost"


def add_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        NAME, help=HELP,
        description="Write DIR/index.html and its files: a page that opens from file:// with no network (open it "
                    "in any browser). It shows the dataset (split x status, classes, quarantined inputs and why), "
                    "a selection (kept/dropped/quarantined per class and reason, score histograms, a gallery of "
                    "thumbnails filterable by class, reason, round and scorer), each example (image, label, every "
                    "score, its lineage across all selection versions), what changed between two selections, "
                    "duplicate groups (exact, phash or embed scores), training curves (--run) and a bench (--bench). "
                    "Thumbnails are read from the shards by byte range, at most --max-thumbnails of them and "
                    "--max-thumbnail-mib in all (a deterministic sample beyond that). The same inputs give the "
                    "same files; DIR is replaced only when the new report is complete.",
    )
    report.add_argument("dataset", help="dataset location (path or fsspec URL)")
    which = report.add_mutually_exclusive_group()
    which.add_argument("--selection", metavar="VERSION", help="the selection to show, e.g. v0003 (default: the latest)")
    which.add_argument("--all-selections", action="store_true",
                       help="show every selection version (larger page; lineage always covers them all)")
    report.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN",
                        help="a training run folder: loss, top-1 and keep-rate curves (repeat for several)")
    report.add_argument("--bench", metavar="DIR", help="an onion bench train folder: its table and plot")
    report.add_argument("--out", required=True, metavar="DIR", help="where to write the site (a local folder)")
    report.add_argument("--max-thumbnails", type=positive_int, default=6000,
                        help="thumbnails at most (default 6000); beyond, a deterministic sample")
    report.add_argument("--max-thumbnail-mib", type=positive_int, default=24,
                        help="total size of the thumbnails at most, in MiB (default 24)")
    report.add_argument("--thumbnail-size", type=positive_int, default=64,
                        help="longest side of a thumbnail in pixels; smaller images are kept as they are (default 64)")
    report.add_argument("--workers", type=positive_int, help="threads making thumbnails (default: the CPUs, at most 8)")
    report.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    import sys

    from pipeline.report import ReportOptions, build_report
    from pipeline.report.thumbnails import ThumbnailLimits

    limits = ThumbnailLimits(count=args.max_thumbnails, bytes=args.max_thumbnail_mib << 20, side=args.thumbnail_size)
    options = ReportOptions(args.dataset, args.out, args.selection, args.all_selections, tuple(args.runs), args.bench,
                            limits, args.workers, progress=sys.stderr.isatty())
    path = build_report(options)
    console.print(f"report: {path / 'index.html'} (open it in a browser: file://{path / 'index.html'})", soft_wrap=True)
