"""``onion inspect``: what a dataset holds, and who a selection kept or dropped and why."""
from __future__ import annotations

import argparse

from rich.console import Console

from shards import UsageError

NAME = "inspect"
HELP = "show what a dataset holds, and who a selection kept or dropped and why"


def add_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        NAME, help=HELP,
        description="Without a mode: counts by split, class and status, quarantined examples with their "
                    "reasons, shards with sizes. One mode at a time: --selection (kept/dropped/quarantined per "
                    "class and reason, score quantiles, optional pictures), --key, --diff or --sql.",
    )
    inspect.add_argument("dataset", help="dataset location (path or fsspec URL)")
    modes = inspect.add_mutually_exclusive_group()
    modes.add_argument("--selection", metavar="VERSION", help="summarise a selection, e.g. v0001")
    modes.add_argument("--key", help="one example: split, label, status, its scores and its lineage across selections")
    modes.add_argument("--diff", nargs=2, metavar=("OLD", "NEW"), help="what changed between two selections")
    modes.add_argument("--sql", help="DuckDB query over tables index, scores_<name>, selections")
    inspect.add_argument("--plot", metavar="FILE.png", help="with --selection: score histogram of kept vs dropped")
    inspect.add_argument("--grid", metavar="FILE.png",
                         help="with --selection: thumbnails of the highest and lowest scored")
    inspect.add_argument("--format", dest="output_format", choices=("table", "json", "csv"), default="table",
                         help="table for people (default), json or csv for scripts")
    inspect.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from pipeline.inspection.dataset import emit, inspect_dataset

    if (args.plot or args.grid) and not args.selection:
        raise UsageError("--plot and --grid draw a selection: add --selection VERSION")
    if args.sql:
        from pipeline.inspection.sql import query

        emit(query(args.dataset, args.sql).to_pylist(), args.output_format, console, "query")
    elif args.key:
        from pipeline.inspection.selections import describe_key

        emit(describe_key(args.dataset, args.key), args.output_format, console, f"example {args.key}")
    elif args.diff:
        from pipeline.inspection.selections import selection_diff

        emit(selection_diff(args.dataset, *args.diff), args.output_format, console, f"{args.diff[0]} -> {args.diff[1]}")
    elif args.selection:
        run_selection(args, console)
    else:
        inspect_dataset(args.dataset, args.output_format, console)


def run_selection(args: argparse.Namespace, console: Console) -> None:
    from pipeline.inspection.dataset import emit
    from pipeline.inspection.selections import selection_summary

    summary = selection_summary(args.dataset, args.selection)
    emit(summary, args.output_format, console, f"selection {args.selection}")
    if summary.get("all_scores_tied") and args.output_format == "table":
        console.print(f"[bold]every scored example in {args.selection} has the same score "
                      f"({summary['all_scores_tied']:g}): the scores carried no signal, and the drops were decided "
                      "by the tie-break alone[/bold]", soft_wrap=True)
    if args.plot or args.grid:
        from pipeline.inspection.plots import extremes_grid, score_histogram

        if args.plot:
            score_histogram(args.dataset, args.selection, args.plot)
            console.print(f"wrote {args.plot}", soft_wrap=True)
        if args.grid:
            extremes_grid(args.dataset, args.selection, args.grid)
            console.print(f"wrote {args.grid}", soft_wrap=True)
